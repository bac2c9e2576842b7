"""SD1.5-size models with random weights, built in code (no downloads), and a tiny "smoke" size.

Timing does not depend on weight values, so random weights measure the real cost. The
"smoke" size keeps SD1.5's block structure at toy widths, to run the whole benchmark on a
CPU in seconds before spending GPU time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Size = Literal["sd15", "smoke"]


@dataclass(frozen=True)
class Dims:
    unet_channels: tuple[int, ...]
    cross_dim: int
    head_dim: int  # diffusers' attention_head_dim (SD1.5: 8, read as the number of heads)
    groups: int
    vae_channels: tuple[int, ...]
    text: dict
    vision: dict


DIMS: dict[str, Dims] = {
    # SD1.5 UNet / VAE / CLIP ViT-L text encoder, and the OpenCLIP ViT-H/14 image encoder (method.md).
    "sd15": Dims(
        unet_channels=(320, 640, 1280, 1280), cross_dim=768, head_dim=8, groups=32,
        vae_channels=(128, 256, 512, 512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14, image_size=224, hidden_act="gelu"),
    ),
    "smoke": Dims(
        unet_channels=(32, 64, 64, 64), cross_dim=64, head_dim=2, groups=8,
        vae_channels=(16, 32, 32, 32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="quick_gelu"),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=14, image_size=224, hidden_act="gelu"),
    ),
}


def build_unet(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """UNet2DConditionModel with SD1.5's layout (CrossAttnDownBlock2D x3 + DownBlock2D, mirrored up)."""
    from diffusers import UNet2DConditionModel

    d = DIMS[size]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=d.unet_channels, cross_attention_dim=d.cross_dim, attention_head_dim=d.head_dim,
            norm_num_groups=d.groups,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def build_vae(size: Size, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    d = DIMS[size]
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=d.vae_channels, norm_num_groups=d.groups,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512, scaling_factor=0.18215,
        )
    return vae.to(dtype=dtype).eval().requires_grad_(False)


def build_backbone(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """model.backbone.Backbone with every part at SD1.5 size (the tokenizer is the project's offline one)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from model.backbone import TEXT_MAX_LENGTH, Backbone, build_tiny_tokenizer

    d = DIMS[size]
    unet = build_unet(size, device, dtype, seed)
    vae = build_vae(size, device, dtype)
    tokenizer = build_tiny_tokenizer()
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=d.text["hidden_size"],
            bos_token_id=0, eos_token_id=1, pad_token_id=1, **d.text,
        ))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=1024, **d.vision))
    for m in (text_encoder, image_encoder):
        m.to(dtype=dtype).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    return Backbone(unet, vae, text_encoder, tokenizer, image_encoder, scheduler, Path("."))


def model_params(size: Size):
    """ModelParams of the sd15 profile (trainable-part dims of method.md); smoke shrinks them."""
    from model.config import FaceEncoderParams, IMRParams, ModelParams

    params = ModelParams(profile="sd15")
    if size == "smoke":
        params.sd15.face_encoder = FaceEncoderParams(depth=1, heads=2, dim_head=16, ff_mult=2)
        params.sd15.imr = IMRParams(depth=1, width=32, heads=2, landmark_feature_dim=32, ff_mult=2)
        params.sd15.lora_rank = 4
    return params


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())

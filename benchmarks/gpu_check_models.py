"""Random-weight SD1.5 models in the formats users hand us: a diffusers folder and a single LDM-layout file.

Used by ``benchmarks/gpu_check.sh`` (SD1.5 size) and by tests/test_single_file.py (``scale="shaped"``: the SD1.5
block structure with small channel counts, so a round trip runs on a CPU in seconds). Both build the models from
the configuration the package ships (model/sd15_config), so what is written is exactly what the loader expects.

The single-file writer is the inverse of diffusers' LDM conversion, written from the layout of the original CompVis
code (input_blocks / middle_block / output_blocks, encoder.down.N.block.M, cond_stage_model.transformer.*): an
independent statement of the layout, so a round trip through diffusers' converter checks both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.single_file import SD15_CONFIG

# "shaped": SD1.5's blocks (4 levels, 2 layers, cross-attention in the first three) with tiny widths.
SHAPED = {
    "unet": {"block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "sample_size": 8},
    "vae": {"block_out_channels": [32, 32, 64, 64], "sample_size": 64},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "projection_dim": 32},
}
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def write_config_dir(out: Path, scale: str = "sd15") -> Path:
    """The shipped SD1.5 configuration, or its shaped-down copy (same structure, small widths)."""
    out.mkdir(parents=True, exist_ok=True)
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (out / part).mkdir(exist_ok=True)
        for f in (SD15_CONFIG / part).glob("*.json"):
            cfg = json.loads(f.read_text())
            if scale == "shaped":
                cfg.update(SHAPED.get(part, {}))
            (out / part / f.name).write_text(json.dumps(cfg, indent=1))
    return out


def build_models(config_dir: Path, tokenizer, seed: int = 0):
    """(unet, vae, text_encoder) with seeded random weights (non-zero everywhere, so a dropped key shows)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    cfg = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    cfg.vocab_size = max(cfg.vocab_size, len(tokenizer))  # SD1.5's 49408 rows; the offline tokenizer uses fewer
    text = CLIPTextModel(cfg)
    with torch.no_grad():  # zero-initialised parameters (conv_out, biases) get values, so a missed key is visible
        for m in (unet, vae, text):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return unet.eval(), vae.eval(), text.eval()


def _unet_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    per = config["layers_per_block"] + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        k = k.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
        k = re.sub(r"^conv_in\.", "input_blocks.0.0.", k)
        k = re.sub(r"^conv_norm_out\.", "out.0.", k)
        k = re.sub(r"^conv_out\.", "out.2.", k)
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            k = f"input_blocks.{1 + b * per + j}.{0 if kind == 'resnets' else 1}.{rest}"
            kind_resnet = kind == "resnets"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
            k, kind_resnet = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}", False
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k):
            idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
            k, kind_resnet = f"middle_block.{idx}.{m[3]}", m[1] == "resnets"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            k, kind_resnet = f"output_blocks.{b * per + j}.{0 if kind == 'resnets' else 1}.{rest}", kind == "resnets"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
            b = int(m[1])
            has_attn = "CrossAttn" in config["up_block_types"][b]
            k, kind_resnet = f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{m[2]}", False
        else:
            kind_resnet = False
        if kind_resnet:
            for name, ldm in _RESNET_LDM.items():
                if f".{name}." in k:
                    k = k.replace(f".{name}.", f".{ldm}.")
                    break
        out["model.diffusion_model." + k] = value
    return out


def _vae_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid_block.attentions.0." in k:
            k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for name, ldm in _VAE_ATTN_LDM.items():
                k = k.replace(f".attn_1.{name}.", f".attn_1.{ldm}.")
            if value.dim() == 2:  # the LDM attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def ldm_state_dict(unet, vae, text) -> dict[str, torch.Tensor]:
    """The three models' weights in the single-file (CompVis/LDM) key layout."""
    state = {**_unet_ldm(unet.state_dict(), dict(unet.config)), **_vae_ldm(vae.state_dict(), dict(vae.config))}
    for k, v in text.state_dict().items():
        state["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def write_single_file(path: Path, unet, vae, text) -> Path:
    """``.safetensors`` (safetensors) or ``.ckpt`` (torch.save of {"state_dict": ...}, as LDM training wrote it)."""
    state = ldm_state_dict(unet, vae, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def write_sd15(out: Path, scale: str = "sd15", seed: int = 0) -> dict[str, Path]:
    """A random-weight SD1.5 (or shaped-down) base as a diffusers folder, a .safetensors and a .ckpt file, plus the
    configuration folder it was built from. The tokenizer is the project's offline one (tiny vocabulary)."""
    from diffusers import DDPMScheduler

    from model.backbone import build_tiny_tokenizer, save_base

    cfg = write_config_dir(out / "config", scale)
    tokenizer = build_tiny_tokenizer()
    unet, vae, text = build_models(cfg, tokenizer, seed)
    folder = save_base(out / "diffusers", unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                       image_encoder=None, scheduler=DDPMScheduler.from_pretrained(cfg / "scheduler"),
                       profile="sd15")
    return {"config": cfg, "diffusers": folder, "tokenizer": folder / "tokenizer",
            "safetensors": write_single_file(out / "model.safetensors", unet, vae, text),
            "ckpt": write_single_file(out / "model.ckpt", unet, vae, text)}


# OpenCLIP ViT-H/14 image encoder (IP-Adapter's image_encoder layout) and the CLIP ViT-L/14 of CLIP-T, with small
# stand-ins of the same interfaces for a CPU dry run.
VISION = {"sd15": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu"),
          "shaped": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         patch_size=14, image_size=224, projection_dim=32, hidden_act="gelu")}
CLIP_L = {"sd15": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                   dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        patch_size=14, image_size=224), 768),
          "shaped": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          patch_size=14, image_size=224), 32)}


def write_image_encoder(out: Path, scale: str = "sd15", seed: int = 0) -> Path:
    """A random CLIPVisionModelWithProjection folder (ViT-H/14 at ``sd15`` scale)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION[scale])).save_pretrained(out)
    return out


def write_clip(out: Path, scale: str = "sd15", seed: int = 0) -> Path:
    """A random CLIPModel + CLIPProcessor folder (ViT-L/14 at ``sd15`` scale), what evaluate.clip_model names."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from model.backbone import build_tiny_tokenizer

    text, vision, proj = CLIP_L[scale]
    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(text, vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1), vision_config=vision, projection_dim=proj)
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224},
                                                     crop_size={"height": 224, "width": 224}),
                  tokenizer=tok).save_pretrained(out)
    return out


def write_face_pack(root: Path, det_size: int, name: str = "buffalo_check") -> Path:
    """An insightface pack under <root>/models/<name>/ whose three models have the signatures insightface routes
    by (SCRFD detector with 9 outputs, 2d106 landmarks [1, 212], ArcFace [1, 512] from 112 x 112): the tests'
    pack builder (tests/fixtures/insightface_pack.py), with one centred face that any non-flat picture shows."""
    import numpy as np

    from tests.fixtures.insightface_pack import PackFace, build_insightface_pack

    c, r = det_size / 2, det_size * 0.22
    kps = np.array([[c - 0.4 * r, c - 0.3 * r], [c + 0.4 * r, c - 0.3 * r], [c, c + 0.05 * r],
                    [c - 0.3 * r, c + 0.45 * r], [c + 0.3 * r, c + 0.45 * r]], np.float32)
    build_insightface_pack(root, (PackFace((c - r, c - 1.2 * r, c + r, c + r), kps, 0.95),), name=name,
                           det_size=det_size)
    return root / "models" / name


__all__ = ["SHAPED", "build_models", "ldm_state_dict", "write_config_dir", "write_single_file", "write_sd15",
           "write_image_encoder", "write_clip", "write_face_pack"]

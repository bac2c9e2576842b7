"""The trainable parts of DynamicID on top of a frozen backbone, and the encoder helpers
shared by the trainers, the pipeline and evaluation (so no encoder code is written twice).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch
from torch import nn

from model.backbone import Backbone
from model.checkpoint import ModelDims, architecture, check_dims, load_state_strict, training_settings
from model.config import ModelParams, ProfileParams, SAAParams

# Identity-embedding width of each face-analysis backend (ArcFace 512, dlib ResNet 128).
EMBEDDING_DIMS = {"insightface": 512, "dlib": 128}

# CLIP image normalisation (OpenAI / OpenCLIP ViT-H/14 use the same constants).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def model_dims(backbone: Backbone, profile: ProfileParams, profile_name: str, face_backend: str,
               saa: SAAParams | None = None) -> ModelDims:
    """The checkpoint's shape contract, plus the training settings inference must repeat (``saa`` given)."""
    return ModelDims(
        profile=profile_name,
        cross_attention_dim=backbone.cross_attention_dim,
        id_dim=EMBEDDING_DIMS[face_backend],
        clip_dim=backbone.clip_dim,
        text_dim=backbone.text_dim,
        num_tokens=profile.num_id_tokens,
        lora_rank=profile.lora_rank,
        face_encoder=profile.face_encoder.model_dump(),
        imr=profile.imr.model_dump(),
        face_backend=face_backend,
        settings=training_settings(saa.gating, saa.tau, profile.face_crop_size) if saa is not None else {},
    )


class DynamicID(nn.Module):
    """Face encoder, IMR + keypoint encoder, and the SAA processors installed in the UNet.

    ``saa`` is the ModuleDict returned by ``install_saa``: registering it here makes
    ``self.parameters()`` cover exactly the trainable parts (the backbone stays outside).
    """

    def __init__(self, backbone: Backbone, dims: ModelDims):
        super().__init__()
        from model.saa.install import install_saa

        self.dims = dims
        # Inference conventions the loaded weights were made with ("dynamicid" or "release"); load_parts sets it
        # from the checkpoint's settings, and model.saa.compat may override it (model.release.compat).
        self.compat = str(dims.settings.get("model.saa.compat", "dynamicid"))
        self.face_encoder = _face_encoder(dims)
        self.keypoint_encoder = _keypoint_encoder(dims)
        self.imr = _imr(dims)
        self.saa = install_saa(backbone.unet, lora_rank=dims.lora_rank)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---------------------------------------------------------------- checkpoint parts
    def state_parts(self, unet: nn.Module, parts: Sequence[str] = ("saa", "face_encoder", "imr", "keypoint_encoder")):
        from model.saa.install import saa_state_dict

        out = {}
        for name in parts:
            out[name] = saa_state_dict(unet) if name == "saa" else getattr(self, name).state_dict()
        return out

    def load_parts(self, unet: nn.Module, manifest: dict, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        from model.saa.install import load_saa_state_dict

        self._adopt_architecture(architecture(manifest["dims"]))
        check_dims(manifest, self.dims)
        self.compat = str((manifest["dims"].get("settings") or {}).get("model.saa.compat", "dynamicid"))
        for name, state in parts.items():
            if name == "saa":
                try:
                    load_saa_state_dict(unet, state, strict=True)
                except ValueError as err:
                    from model.checkpoint import CheckpointError

                    raise CheckpointError(f"saa: {err}") from None
            else:
                load_state_strict(getattr(self, name), state, name)

    def _adopt_architecture(self, arch: dict[str, dict]) -> None:
        """Rebuild the parts whose architecture variant differs from the checkpoint's (e.g. imported release
        weights on the default params): the variant is a property of the weights, so every consumer loads such a
        checkpoint without configuring it. Shapes and every other dim are still checked by check_dims."""
        mine = architecture(asdict(self.dims))
        if arch == mine:
            return
        for part, values in arch.items():
            getattr(self.dims, part).update(values)
        ref = next(self.face_encoder.parameters())
        if arch["face_encoder"] != mine["face_encoder"]:
            self.face_encoder = _face_encoder(self.dims).to(ref.device, ref.dtype)
        if arch["imr"] != mine["imr"]:
            self.imr = _imr(self.dims).to(ref.device, ref.dtype)
            self.keypoint_encoder = _keypoint_encoder(self.dims).to(ref.device, ref.dtype)


def _face_encoder(dims: ModelDims) -> nn.Module:
    from model.face_encoder import FaceEncoder

    fe = dims.face_encoder
    return FaceEncoder(
        id_dim=dims.id_dim, clip_dim=dims.clip_dim, token_dim=dims.cross_attention_dim,
        num_tokens=dims.num_tokens, depth=fe["depth"], heads=fe["heads"], dim_head=fe["dim_head"],
        ff_mult=fe["ff_mult"], shortcut=fe["shortcut"], shortcut_scale=fe["shortcut_scale"],
        proj_out=bool(fe.get("proj_out", False)),
    )


def _keypoint_encoder(dims: ModelDims) -> nn.Module:
    im = dims.imr
    if im.get("keypoint_encoder", "dynamicid") == "release":
        from model.release.keypoint_encoder import ReleaseKeypointEncoder

        return ReleaseKeypointEncoder(image_size=im["landmark_size"], feature_dim=im["landmark_feature_dim"])
    from model.imr import KeypointEncoder

    return KeypointEncoder(image_size=im["landmark_size"], feature_dim=im["landmark_feature_dim"])


def _imr(dims: ModelDims) -> nn.Module:
    from model.imr import IMR

    im = dims.imr
    return IMR(
        token_dim=dims.cross_attention_dim, width=im["width"], landmark_dim=im["landmark_feature_dim"],
        text_dim=dims.text_dim, num_latents=im["num_latents"], depth=im["depth"], heads=im["heads"],
        dim_head=max(1, im["width"] // im["heads"]), ff_mult=im["ff_mult"],
        norm_in=bool(im.get("norm_in", False)), motion_mlp=str(im.get("motion_mlp", "dynamicid")),
    )


# -------------------------------------------------------------------- encoder helpers


def normalize_for_clip(crops: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in [0, 1] -> CLIP-normalised."""
    mean = crops.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = crops.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (crops - mean) / std


@torch.no_grad()
def clip_image_features(backbone: Backbone, crops: torch.Tensor) -> torch.Tensor:
    """Penultimate hidden states of the CLIP image encoder: [B, 3, S, S] in [0, 1] -> [B, L, clip_dim]."""
    enc = backbone.image_encoder
    size = backbone.image_size
    if crops.shape[-1] != size or crops.shape[-2] != size:
        crops = torch.nn.functional.interpolate(crops, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
    pixels = normalize_for_clip(crops).to(device=enc.device, dtype=enc.dtype)
    out = enc(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2]


def tokenize(backbone: Backbone, prompts: Sequence[str]) -> torch.Tensor:
    tok = backbone.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


@torch.no_grad()
def text_embeddings(backbone: Backbone, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (last hidden states [B, 77, D], pooled EOS embedding [B, D]) of the base text encoder."""
    ids = tokenize(backbone, prompts).to(backbone.text_encoder.device)
    out = backbone.text_encoder(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


def build_dynamicid(backbone: Backbone, params: ModelParams, face_backend: str) -> DynamicID:
    dims = model_dims(backbone, params.active, params.profile, face_backend, params.saa)
    return DynamicID(backbone, dims)


__all__ = [
    "DynamicID", "EMBEDDING_DIMS", "model_dims", "build_dynamicid", "clip_image_features", "text_embeddings",
    "tokenize", "normalize_for_clip", "asdict",
]

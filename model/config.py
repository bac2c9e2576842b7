"""Typed, validated configuration of the model and of face analysis.

These are the ``model:`` and ``face:`` sections of params.yaml. They live in the model
package (pydantic only, no MLOps imports) so that model code and the stage code read
the same objects. Every model has ``extra="forbid"``: a mistyped key is an error that
names the key path, never a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StrictModel(BaseModel):
    """Base for every params section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class AutoLayoutSettings(StrictModel):
    """``layout: auto`` (model/saa/auto_run.py): how long SAA's maps are observed and how they become regions."""

    switch_step: int = Field(2, ge=1, description="denoising steps observed (no routing) before the regions are "
                             "fixed from SAA's maps; clamped to the step count - 1")
    map_level: int = Field(2, ge=0, description="UNet level whose query grid the maps are read at (2: 16x16 at "
                           "SD1.5's 64x64 latents; the deepest level on smaller UNets)")
    min_cells: int = Field(3, ge=2, le=3, description="shortest side of a region, in cells of the 12x12 grid the "
                           "regions are cut on (3: a quarter of the image, the most that still holds 4 strips)")


class SAAParams(StrictModel):
    """Inference-time knobs of Semantic-Activated Attention (method.md, SAA)."""

    gating: bool = Field(True, description="query activation gating on (the release defaults it off; we do not)")
    tau: float = Field(0.3, ge=0.0, le=1.0, description="activation threshold after min-max normalisation")
    boost: float = Field(4.0, ge=0.0, description="early-step region boost b")
    boost_steps: int = Field(3, ge=0, description="number of first denoising steps with the region boost (E)")
    id_scale: float = Field(1.0, ge=0.0, description="default scale of the ID branch")
    compat: Literal["auto", "dynamicid", "release"] = Field(
        "auto", description="inference conventions: auto = what the checkpoint records (release for weights "
        "imported with `dynamicid import-release`, dynamicid otherwise); docs/release.md")
    auto: AutoLayoutSettings = AutoLayoutSettings()


class FaceEncoderParams(StrictModel):
    """ArcFace embedding -> K ID tokens, refined by a perceiver over CLIP image features."""

    depth: int = Field(4, ge=1)
    heads: int = Field(12, ge=1)
    dim_head: int = Field(64, ge=1)
    ff_mult: int = Field(4, ge=1)
    shortcut: bool = False
    shortcut_scale: float = 1.0
    proj_out: bool = Field(False, description="Linear before the output LayerNorm (the research release has one); "
                           "a checkpoint's own value wins on load")


class IMRParams(StrictModel):
    """Identity-Motion Reconfigurator and its keypoint encoder."""

    depth: int = Field(1, ge=1, le=4, description="disentangle / entangle depth D (release 1, max 4)")
    width: int = Field(1024, ge=8, description="width of motion latents and of the IMR token space")
    heads: int = Field(16, ge=1)
    num_latents: int = Field(4, ge=1, description="motion latents per motion")
    landmark_size: int = Field(96, ge=16, description="side of the rendered landmark image")
    landmark_feature_dim: int = Field(768, ge=8, description="keypoint encoder output width")
    ff_mult: int = Field(4, ge=1)
    # Architecture variants of the research release (docs/release.md); a checkpoint's own values win on load.
    norm_in: bool = Field(False, description="LayerNorm on the incoming ID tokens before proj_in (release: on)")
    motion_mlp: Literal["dynamicid", "release"] = Field(
        "dynamicid", description="dynamicid: LN, Linear, GELU, Linear; release: LN, Linear, GELU, LN, Linear, GELU")
    keypoint_encoder: Literal["dynamicid", "release"] = Field(
        "dynamicid", description="dynamicid: 4 stride-2 convs + Linear; release: 18 Conv-BN-ReLU units (96 px only)")


class TinyUNetParams(StrictModel):
    block_out_channels: list[int] = [32, 64]
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8


class TinyVAEParams(StrictModel):
    block_out_channels: list[int] = [32, 64]
    latent_channels: int = 4
    norm_num_groups: int = 8


class TinyTransformerParams(StrictModel):
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2


class TinyVisionParams(TinyTransformerParams):
    image_size: int = 64
    patch_size: int = 8


class ProfileParams(StrictModel):
    """What both profiles share: trainable-part dimensions and working resolution."""

    resolution: int = Field(512, ge=8, description="default image side in pixels (multiple of 8)")
    num_id_tokens: int = Field(4, ge=1, description="K: ID tokens per identity")
    lora_rank: int = Field(128, ge=0, description="LoRA rank on attention projections (0 = no LoRA)")
    face_encoder: FaceEncoderParams = FaceEncoderParams()
    imr: IMRParams = IMRParams()
    face_crop_size: int = Field(224, ge=16, description="side of the face crop given to the CLIP image encoder")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8")
        return v


class TinyFaceEncoderParams(FaceEncoderParams):
    """Tiny defaults as class defaults, so a partial ``model.tiny.face_encoder`` keeps them."""

    depth: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    dim_head: int = Field(16, ge=1)
    ff_mult: int = Field(2, ge=1)


class TinyIMRParams(IMRParams):
    """Tiny defaults as class defaults, so a partial ``model.tiny.imr`` keeps them."""

    width: int = Field(64, ge=8)
    heads: int = Field(2, ge=1)
    landmark_feature_dim: int = Field(64, ge=8)
    ff_mult: int = Field(2, ge=1)


class TinyProfileParams(ProfileParams):
    """Every model built in code from these small configs; runs on a CPU in seconds."""

    resolution: int = 64
    lora_rank: int = 4
    face_crop_size: int = 64
    base: str | None = Field(
        None,
        description="directory of a trained tiny base (output of `train --stage base`); "
        "null = a seeded random base built in code",
    )
    seed: int = 0
    cross_attention_dim: int = 64
    unet: TinyUNetParams = TinyUNetParams()
    vae: TinyVAEParams = TinyVAEParams()
    text: TinyTransformerParams = TinyTransformerParams()
    vision: TinyVisionParams = TinyVisionParams()
    face_encoder: TinyFaceEncoderParams = TinyFaceEncoderParams()
    imr: TinyIMRParams = TinyIMRParams()


class SD15ProfileParams(ProfileParams):
    """Stable Diffusion 1.5 in diffusers layout plus an OpenCLIP ViT-H/14 image encoder."""

    base: str = Field(
        "/models/stable-diffusion-v1-5",
        description="SD1.5 directory in diffusers layout: local path or s3:// URI (downloaded once into cache_dir); "
        "or a single-file SD1.5 checkpoint (.safetensors / .ckpt, the original LDM key layout, local path), converted "
        "once into cache_dir with the SD1.5 configuration shipped in model/sd15_config",
    )
    tokenizer: str | None = Field(
        None, description="CLIP ViT-L/14 tokenizer folder (vocab.json, merges.txt), local path or s3:// URI; needed "
        "when base is a single file (which holds no tokenizer), e.g. /models/clip-vit-large-patch14; "
        "null = <base>/tokenizer",
    )
    image_encoder: str = Field(
        "/models/clip-vit-h-14/image_encoder",
        description="CLIPVisionModelWithProjection directory (ViT-H/14): local path or s3:// URI",
    )
    cache_dir: str = Field("~/.cache/dynamicid", description="where s3:// weights are downloaded once")


class ModelParams(StrictModel):
    profile: Literal["tiny", "sd15"] = "tiny"
    max_ids: int = Field(4, ge=1, le=16, description="most identities per image")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    saa: SAAParams = SAAParams()
    tiny: TinyProfileParams = TinyProfileParams()
    sd15: SD15ProfileParams = SD15ProfileParams()

    @property
    def active(self) -> TinyProfileParams | SD15ProfileParams:
        """The selected profile's section."""
        return self.tiny if self.profile == "tiny" else self.sd15


class InsightFaceParams(StrictModel):
    root: str = Field("~/.insightface", description="model-pack root (contains models/<name>/)")
    name: str = Field("buffalo_l", description="model pack: buffalo_l | antelopev2 | any pack laid out alike")
    det_size: int = Field(640, ge=32)
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class DlibParams(StrictModel):
    detector: Literal["hog", "cnn"] = "hog"
    upsample: int = Field(1, ge=0, le=3, description="detector upsampling passes (finds smaller faces, slower)")


class FaceParams(StrictModel):
    backend: Literal["auto", "dlib", "insightface"] = Field(
        "auto", description="auto: dlib for the tiny profile, insightface for sd15"
    )
    min_face_size: int = Field(24, ge=1, description="smallest accepted face box side, pixels")
    insightface: InsightFaceParams = InsightFaceParams()
    dlib: DlibParams = DlibParams()

    def resolved_backend(self, profile: str) -> Literal["dlib", "insightface"]:
        if self.backend != "auto":
            return self.backend
        return "dlib" if profile == "tiny" else "insightface"

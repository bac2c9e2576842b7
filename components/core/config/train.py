"""Training section: one DeepSpeed setup shared by the three stages plus per-stage settings.

Step counts are optimizer steps (one step = ``micro_batch x grad_accum x processes`` samples).
The tiny-profile defaults are sized so that base + anchor + reconfigure run in about ten
minutes on a 2-core CPU (docs/training.md has the measured timings); the sd15 profile is
expected to override ``steps``/``micro_batch``/``precision`` in params.yaml.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import StrictModel


class StageParams(StrictModel):
    """What every stage has. Each stage's defaults live on its own class (not on an instance in
    TrainParams), so a params.yaml that sets one key of a stage keeps the stage's other defaults."""

    steps: int = Field(150, ge=1, description="optimizer steps; the cosine schedule spans exactly these")
    lr: float = Field(1e-4, gt=0)
    micro_batch: int = Field(8, ge=1, description="samples per process per forward")
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(10, ge=1, description="linear warm-up steps (DeepSpeed WarmupCosineLR uses at least 2)")
    output: str = Field("runs/stage", description="stage directory: export/, checkpoints/, metrics.json, loss.tsv")


class BaseStageParams(StageParams):
    """Tiny profile only: the text-to-image base (VAE first, then the UNet on its latents)."""

    steps: int = Field(200, ge=1, description="UNet steps; the cosine schedule spans exactly these")
    lr: float = Field(5e-4, gt=0)
    output: str = Field("runs/base", description="stage directory: export/ (the base), checkpoints/, metrics")
    vae_steps: int = Field(80, ge=0, description="autoencoder steps before the UNet (0 = keep the seeded VAE)")
    vae_lr: float = Field(1e-3, gt=0)
    vae_kl_weight: float = Field(1e-6, ge=0, description="KL term of the VAE loss")
    drop_caption: float = Field(0.1, ge=0, le=1, description="empty-caption rate, so the base supports CFG")
    pretrained: str | None = Field(
        None, description="a stored base (diffusers layout + record.json, e.g. model/testbed_base) installed as the "
        "stage's export instead of training one; its data hash must match data.prepared. null trains the base")


class AnchorStageParams(StageParams):
    """Stage 1: face encoder + SAA (+ LoRA)."""

    steps: int = Field(200, ge=1, description="optimizer steps; the cosine schedule spans exactly these")
    lr: float = Field(3e-4, gt=0)
    micro_batch: int = Field(4, ge=1, description="samples per process per forward")
    output: str = Field("runs/anchor", description="stage directory: export/, checkpoints/, metrics.json, loss.tsv")
    init_from: str | None = Field(None, description="a stage-1 (or stage-2) export whose face encoder and SAA "
                                  "weights stage 1 starts from instead of fresh ones: fine-tuning; null = fresh")


class ReconfigureStageParams(StageParams):
    """Stage 2: IMR + keypoint encoder, starting from <train.anchor.output>/export."""

    steps: int = Field(200, ge=1, description="optimizer steps; the cosine schedule spans exactly these")
    lr: float = Field(1e-3, gt=0)
    micro_batch: int = Field(2, ge=1, description="source images per process per forward")
    output: str = Field("runs/reconfigure", description="stage directory: export/, checkpoints/, metrics, loss.tsv")
    targets_per_source: int = Field(2, ge=1, description="target images (other motions) per source image")
    prompt: str = Field("a photo of a person", description="fixed prompt of the denoising-consistency loss")


class TrainParams(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="trainable parts; fp16 needs a GPU")
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="frozen base models: auto = bf16 with bf16 training, else fp16, on GPU; fp32 on CPU"
    )
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")
    warmup_min_ratio: float = Field(0.0, ge=0, le=1, description="lr of the first warm-up step as a fraction of lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor as a fraction of lr")
    gradient_checkpointing: bool | Literal["high_res", "auto"] = Field(
        "auto", description="recompute UNet activations in backward (saves memory): true = every block, high_res = "
        "only the blocks at the latent resolution (down_blocks.0, the last up block), whose activations dominate; "
        "auto = high_res on CUDA (with the compiled UNet: less memory and no slower, docs/benchmarks.md), off on CPU"
    )
    compile_unet: Literal["auto", "on", "off"] = Field(
        "auto", description="stage 1: torch.compile the UNet for gradient steps (auto = on CUDA only; minutes of "
        "compilation at the first step, then ~1.5x faster steps at SD1.5 size, docs/benchmarks.md)"
    )
    cache_features: bool = Field(
        True, description="stage 1: encode every training image once (VAE posterior, CLIP face features, text) before "
        "the first step, reuse the cache on resume, and keep the frozen encoders off the GPU while training"
    )
    seed: int = 0
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per training process")
    holdout_per_identity: int = Field(
        2, ge=0, description="images per training identity kept out of training for the learning check"
    )
    check_images: int = Field(256, ge=0, description="held-out images the end-of-stage learning check uses (0 = skip)")
    check_repeats: int = Field(4, ge=1, description="noise draws per held-out image in the learning check")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1, description="steps between MLflow metric flushes (every step is logged)")
    sample_every: int = Field(50, ge=1, description="steps between sample image grids")
    sample_count: int = Field(4, ge=1, description="images per sample grid")
    sample_steps: int = Field(20, ge=1, description="denoising steps of the sample images")
    drop_text: float = Field(0.05, ge=0, le=1, description="stage 1: text dropped (empty prompt) alone")
    drop_id: float = Field(0.05, ge=0, le=1, description="stage 1: ID dropped (unconditional tokens) alone")
    drop_both: float = Field(0.05, ge=0, le=1, description="stage 1: text and ID dropped together")
    feature_weight: float = Field(1.0, ge=0)
    denoise_weight: float = Field(1.0, ge=0)
    contrastive_weight: float = Field(0.0, ge=0, description="0 reproduces the release")
    contrastive_temperature: float = Field(0.1, gt=0)
    base: BaseStageParams = BaseStageParams()
    anchor: AnchorStageParams = AnchorStageParams()
    reconfigure: ReconfigureStageParams = ReconfigureStageParams()

    @model_validator(mode="after")
    def _drop_rates_fit(self) -> "TrainParams":
        total = self.drop_text + self.drop_id + self.drop_both
        if total > 1.0 - 1e-9:  # at 1, no sample sees text and ID together, the condition generation uses
            raise ValueError(f"drop_text + drop_id + drop_both must be < 1 (the rest trains text and ID together), "
                             f"got {total:g}")
        if self.feature_weight + self.denoise_weight + self.contrastive_weight <= 0:
            raise ValueError("stage 2 needs a positive feature_weight, denoise_weight or contrastive_weight")
        return self

    def checkpointing_for(self, device_type: str) -> bool | str:
        """``gradient_checkpointing`` with ``auto`` resolved for the training device: False, True or "high_res"."""
        if self.gradient_checkpointing == "auto":
            return "high_res" if device_type == "cuda" else False
        return self.gradient_checkpointing

    def stage(self, name: str) -> StageParams:
        if name not in ("base", "anchor", "reconfigure"):
            raise KeyError(f"unknown training stage {name!r}")
        return getattr(self, name)

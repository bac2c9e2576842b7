"""Training section: one DeepSpeed setup shared by the three stages plus per-stage overrides."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from model.config import StrictModel


class StageParams(StrictModel):
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    micro_batch: int = Field(8, ge=1, description="per process")
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(10, ge=0)
    output: str = "runs/stage"


class TrainParams(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor as a fraction of lr")
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1)
    drop_text: float = Field(0.05, ge=0, le=1)
    drop_id: float = Field(0.05, ge=0, le=1)
    drop_both: float = Field(0.05, ge=0, le=1)
    feature_weight: float = 1.0
    denoise_weight: float = 1.0
    contrastive_weight: float = Field(0.0, ge=0, description="0 reproduces the release")
    contrastive_temperature: float = Field(0.1, gt=0)
    base: StageParams = StageParams(steps=300, lr=5e-4, micro_batch=16, output="runs/base")
    anchor: StageParams = StageParams(steps=200, lr=1e-4, micro_batch=8, output="runs/anchor")
    reconfigure: StageParams = StageParams(steps=200, lr=1e-4, micro_batch=4, output="runs/reconfigure")

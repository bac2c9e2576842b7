"""The one place where params.yaml's ``train`` section becomes a DeepSpeed config.

Everything DeepSpeed does for us is decided here: ZeRO stage, precision, micro-batch,
gradient accumulation, clipping, AdamW and the warm-up + cosine schedule
(``WarmupCosineLR``). The global batch is left for DeepSpeed to derive
(micro-batch x accumulation x processes), so one config is valid for any world size.
"""

from __future__ import annotations

from typing import Any

from components.core.config.train import StageParams, TrainParams

# DeepSpeed prints a throughput line every N steps; we log our own (MLflow, progress bar).
_NEVER = 2**31 - 1


def deepspeed_config(
    train: TrainParams,
    stage: StageParams,
    *,
    device_type: str,
    lr: float | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """DeepSpeed config for one training run of ``steps`` optimizer steps at peak ``lr``.

    ``lr``/``steps`` default to the stage's; the tiny base's VAE phase passes its own.
    On a CPU the optimizer is torch's AdamW (``torch_adam``): DeepSpeed's FusedAdam is a
    CUDA kernel and its CPU build would only be compiled to be slower.
    """
    if train.precision == "fp16" and device_type != "cuda":
        raise ValueError("train.precision fp16 needs a GPU (loss scaling on CPU is not supported); use bf16 or fp32")
    peak = stage.lr if lr is None else lr
    total = stage.steps if steps is None else steps
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": peak,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": device_type != "cuda",
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": stage.warmup_steps,
                "warmup_min_ratio": train.warmup_min_ratio,
                "cos_min_ratio": train.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


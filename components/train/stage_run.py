"""StageRun and the helpers every training-stage runner shares: dtypes, placement, inputs, loss summary, exports.

A stage runs end to end as inputs -> task -> loop -> export, checks, metrics, MLflow (the runners:
components.train.base_stage, components.train.dynamicid_stage). Stage outputs
(``train.<stage>.output``)::

    export/          base: the tiny base in diffusers layout (model.backbone.save_base);
                     anchor / reconfigure: the model package's checkpoint (model.checkpoint)
    checkpoints/     resumable DeepSpeed checkpoints (checkpoints.py); not a DVC output
    metrics.json     loss summary, throughput, learning-check numbers
    loss.tsv         one row per optimizer step (``dvc plots``); base also vae_loss.tsv
    samples/         sample grids (also in the MLflow run)
    mlflow_run.json  the run id (a resumed stage continues that run)
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from components.core.errors import UserError
from components.train.distributed import DistInfo

if TYPE_CHECKING:
    from components.core.config import Params
    from components.core.shards import PreparedData
    from components.train.data import Split


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StageRun:
    params: "Params"
    stage: str
    dist: DistInfo
    resume: bool = False
    max_steps: int | None = None

    @property
    def sp(self):
        return self.params.train.stage(self.stage)

    @property
    def out(self) -> Path:
        return Path(self.sp.output)


def train_dtype(params: "Params") -> torch.dtype:
    return DTYPES[params.train.precision]


def frozen_dtype(params: "Params", device: torch.device) -> torch.dtype:
    """Frozen base models: half precision on GPU (bf16 next to bf16 training), fp32 on CPU."""
    name = params.train.frozen_dtype
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if params.train.precision == "bf16" else torch.float16


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move (and cast only when needed: diffusers warns on every dtype-carrying .to())."""
    if getattr(module, "dtype", None) == dtype:
        module.to(device)
    else:
        module.to(device=device, dtype=dtype)


def place_backbone(bb, device: torch.device, dtype: torch.dtype) -> None:
    for m in (bb.unet, bb.vae, bb.text_encoder, bb.image_encoder):
        place(m, device, dtype)


def _first_local(dist: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on local rank 0 first (downloads into a shared cache), then on the others."""
    if dist.local_rank == 0:
        value = fn()
        dist.barrier()
    else:
        dist.barrier()
        value = fn()
    return value


def resolved_params(run: StageRun) -> "Params":
    """s3:// model and data locations made local (downloaded once per machine)."""
    from components.core.runtime import resolve_model_paths
    from components.core.storage import is_s3, resolve_local

    def resolve() -> "Params":
        p = resolve_model_paths(run.params)
        start = p.train.anchor.init_from
        if is_s3(p.data.prepared) or (start and is_s3(start)):
            p = p.model_copy(deep=True)
            p.data.prepared = str(resolve_local(p.data.prepared, p.storage.cache_dir, p.storage))
            if start:
                p.train.anchor.init_from = str(resolve_local(start, p.storage.cache_dir, p.storage))
        return p

    return _first_local(run.dist, resolve)


def open_data(params: "Params") -> tuple[Path, "PreparedData", "Split"]:
    from components.core.shards import PreparedData
    from components.train.data import holdout_split

    root = Path(params.data.prepared)
    try:
        data = PreparedData(root)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data.prepared: {err}") from None
    split = holdout_split(data, params.train.holdout_per_identity)
    if not split.train:
        raise UserError(f"data.prepared = {root}: no samples in split 'train'")
    return root, data, split


def spread(data: "PreparedData", positions: list[int], count: int) -> list[int]:
    """Up to ``count`` positions from distinct identities first (sample grids show several people)."""
    seen: set[str] = set()
    first, rest = [], []
    for p in positions:
        (rest if data.index[p]["identity"] in seen else first).append(p)
        seen.add(data.index[p]["identity"])
    return (first + rest)[:count]


def loss_summary(path: Path, prefix: str = "") -> dict[str, float]:
    """First and final loss (means over 10% of the steps, 1..20) of a loss.tsv, and their ratio."""
    if not path.exists():
        return {}
    with open(path) as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh, delimiter="\t") if r.get("loss")]
    if not losses:
        return {}
    w = min(20, max(1, len(losses) // 10))
    first, final = sum(losses[:w]) / w, sum(losses[-w:]) / w
    return {f"{prefix}loss_first": first, f"{prefix}loss_final": final,
            f"{prefix}loss_ratio": final / first if first else 0.0, f"{prefix}steps": float(len(losses))}


def fp32_parts(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Exports are fp32 whatever the training precision (the loader casts to the serving dtype)."""
    return {name: {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
            for name, state in parts.items()}


def _finish(run: StageRun, tracker, metrics: dict[str, float], export_dir: Path | None) -> None:
    if export_dir is not None:
        tracker.log_artifacts(export_dir, "export")
    tracker.write_metrics(metrics)


def _atomic_dir(final: Path, write: Callable[[Path], Any]) -> Path:
    """Write a directory next to ``final`` and rename it into place (readers never see half of it)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final

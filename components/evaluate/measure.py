"""One measurement of a pipeline on the evaluation set, and the checkpoints measured: the candidate, the champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components.evaluate.evalset import EvalSet
from components.evaluate.generation import Generated, generate
from components.evaluate.scoring import FaceCache, score

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    metrics: dict[str, float | None]
    rows: list[dict]
    generated: list[Generated]
    baselines: dict


def measure(pipe, evalset: EvalSet, params: "Params", clip, faces: FaceCache) -> Measurement:
    """Generate the evaluation set with one pipeline and compute every metric."""
    from components.evaluate.metrics import aggregate

    pipe.set_progress(False)
    generated, baselines = generate(pipe, evalset, params)
    rows = score(evalset, generated, baselines, faces, clip, params.evaluate.expression_estimator)
    return Measurement(metrics=aggregate(rows), rows=rows, generated=generated, baselines=baselines)


# --------------------------------------------------------------------------- checkpoint + champion


def resolve_checkpoint(uri: str, params: "Params", scratch: Path) -> Path:
    """A checkpoint directory from a local dir, an s3:// URI or a registry URI (models:/..., runs:/...)."""
    from components.core.errors import UserError
    from components.core.storage import StorageError, resolve_local
    from model.checkpoint import CheckpointError, find_checkpoint

    try:
        if uri.startswith(("models:/", "runs:/")):
            from components.core.registry import download_checkpoint

            return download_checkpoint(uri, scratch / "model")
        return find_checkpoint(resolve_local(uri, params.storage.cache_dir, params.storage))
    except (CheckpointError, StorageError, FileNotFoundError) as err:
        raise UserError(f"checkpoint {uri}: {err}") from None


def champion_on_this_set(params: "Params", evalset: EvalSet, candidate_digest: str, candidate: Measurement,
                         clip, faces: FaceCache, scratch: Path) -> dict | None:
    """The champion's metrics on this evaluation set: from its registry tags when it was measured
    on the same set, else measured now (download it from the registry and run the same cases)."""
    from components.core import registry
    from components.core.errors import UserError
    from components.core.runtime import pipeline_from_params
    from model.checkpoint import CheckpointError

    name, alias = params.mlflow.registered_model, params.gate.champion_alias
    mv = registry.alias_version(registry.client(), name, alias)
    if mv is None:
        log.info("no %s@%s in the registry: nothing to compare with", name, alias)
        return None
    info = {"version": str(mv.version), "alias": alias, "eval_set_hash": evalset.hash}
    if mv.tags.get("eval_set_hash") == evalset.hash:
        return {**info, "source": "registry tags", "metrics": registry.version_metrics(mv)}
    log.info("champion v%s was measured on another evaluation set: measuring it on this one", mv.version)
    ckpt = registry.download_checkpoint(f"models:/{name}/{mv.version}", scratch / "champion")
    if registry.checkpoint_digest(ckpt) == candidate_digest:
        return {**info, "source": "same checkpoint", "metrics": candidate.metrics}
    try:
        pipe = pipeline_from_params(params, ckpt, face_analyzer=faces.analyzer)
    except CheckpointError as err:
        raise UserError(f"champion v{mv.version} cannot be evaluated with these params: {err}") from None
    m = measure(pipe, evalset, params, clip, FaceCache(faces.analyzer))  # a fresh cache: new images
    return {**info, "source": "measured", "metrics": m.metrics}

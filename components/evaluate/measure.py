"""One measurement of a pipeline on the evaluation set, the checkpoint it measures, and the learning-check
records that checkpoint carries (bound to its weights).
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


def measure(pipe, evalset: EvalSet, params: "Params", clip, faces: FaceCache, reader) -> Measurement:
    """Generate the evaluation set with one pipeline and compute every metric (``reader``: the expression and
    pose reader of components.evaluate.estimators)."""
    from components.evaluate.metrics import aggregate

    pipe.set_progress(False)
    generated, baselines = generate(pipe, evalset, params)
    rows = score(evalset, generated, baselines, faces, clip, reader)
    return Measurement(metrics=aggregate(rows), rows=rows, generated=generated, baselines=baselines)


# --------------------------------------------------------------------------- the checkpoint and its records


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


def learning_check_records(ckpt: Path) -> dict[str, dict]:
    """The checkpoint's learning-check records (written by `dynamicid train`), each with ``weights_match``: whether
    the weights it was measured on (its ``weights`` digest over its ``parts``) are the weights of this checkpoint.
    A record without a digest, or whose parts are missing here, does not match."""
    from model.checkpoint import load_parts, parts_digest

    manifest, parts = load_parts(ckpt, verify=False)  # the pipeline's load just verified every file's sha256
    out: dict[str, dict] = {}
    for stage, record in (manifest.get("learning_checks") or {}).items():
        names = record.get("parts") or []
        try:
            match = bool(names) and parts_digest(parts, names) == record.get("weights")
        except KeyError:
            match = False
        out[stage] = {**record, "weights_match": match}
    return out

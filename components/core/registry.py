"""Reading the MLflow model registry: a version's checkpoint (downloaded and digested), aliases and the
metrics recorded on a version's tags. Every stage that compares with or loads a registered model uses it;
publishing lives in components.register.publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)


METRIC_TAG = "metric."


class RegistryError(RuntimeError):
    """A registry operation that did not complete (the version it created has been removed)."""


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def checkpoint_files(ckpt: str | Path) -> dict[str, str]:
    """relative path -> sha256 of every file of a checkpoint directory (bundled base included)."""
    from model.checkpoint import sha256_file

    root = Path(ckpt)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_digest(ckpt: str | Path) -> str:
    """One hash for a whole checkpoint: what was evaluated is exactly what gets registered."""
    blob = json.dumps(checkpoint_files(ckpt), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def download_checkpoint(model_uri: str, dst: str | Path) -> Path:
    """Download a logged/registered model (models:/..., runs:/...) and return its checkpoint dir."""
    from model.checkpoint import find_checkpoint

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    return find_checkpoint(local)


def alias_version(c, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    """Metrics recorded on a version's tags at registration (``metric.<name>``)."""
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG):]] = float(v)
            except ValueError:
                log.warning("version %s tag %s=%r is not a number", mv.version, k, v)
    return out


def metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()}

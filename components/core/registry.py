"""Reading the MLflow model registry: a version's checkpoint (downloaded and digested), aliases and the
metrics recorded on a version's tags, and a checkpoint's provenance (trained here or imported from the research
release) as evaluation and registration record it. Every stage that compares with or loads a registered model
uses it; publishing lives in components.register.publish.
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


# --------------------------------------------------------------------------- where a checkpoint's weights came from


def checkpoint_provenance(ckpt: str | Path) -> dict:
    """Where a checkpoint's weights came from, read from its manifest: the stage that wrote it (``init``, a
    training stage, ``import-release``), the compatibility mode it records (``model.saa.compat``; ``dynamicid``
    when none is recorded, as for every checkpoint we trained) and, for imported research-release weights, the
    import's record (each source file's URI and sha256, the layout version, the hub repository). Evaluation and
    registration carry it so an imported model is never mistaken for one we trained."""
    from model.checkpoint import read_manifest

    manifest = read_manifest(ckpt)
    settings = (manifest.get("dims") or {}).get("settings") or {}
    out = {"stage": str(manifest.get("stage", "unknown")), "compat": str(settings.get("model.saa.compat", "dynamicid"))}
    if isinstance(manifest.get("release"), dict):
        out["release"] = manifest["release"]
    return out


def provenance_tags(provenance: dict) -> dict[str, str]:
    """``checkpoint_provenance`` as flat MLflow tags: ``compat`` and, for imported release weights,
    ``release.weights`` / ``release.layout_version`` / ``release.imported`` and ``release.<file>.uri`` /
    ``.sha256`` / ``.format`` per source file (one tag each, so a search can match a file's sha256). URIs are
    written as given to the import, so credentials in one are masked as for every URI a report shows."""
    from components.core.redact import redact_text

    tags = {"compat": provenance.get("compat", "dynamicid")}
    release = provenance.get("release")
    if release:
        tags.update({f"release.{k}": str(release[k])[:500] for k in ("weights", "layout_version", "imported")
                     if k in release})
        for part, src in (release.get("sources") or {}).items():
            tags.update({f"release.{part}.{k}": str(src[k])[:500] for k in ("sha256", "format") if k in src})
            if "uri" in src:
                tags[f"release.{part}.uri"] = redact_text(str(src["uri"]))[:500]
    return tags


def provenance_description(provenance: dict) -> str | None:
    """A registered version's description for imported release weights (None for our own checkpoints): what the
    weights are and which files, by sha256, they were converted from."""
    release = provenance.get("release")
    if not release:
        return None
    files = "; ".join(f"{Path(str(s.get('uri', part))).name} sha256 {s.get('sha256', '?')}"
                      for part, s in (release.get("sources") or {}).items())
    return (f"Research release weights ({release.get('weights', 'unknown')}), converted by `dynamicid "
            f"import-release` on {release.get('imported', 'unknown')}, compatibility mode "
            f"{provenance.get('compat')}; not trained here. Sources: {files}.")

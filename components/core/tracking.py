"""MLflow setup and lineage facts shared by training, evaluation and registration."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

LOCAL_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(params) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the local sqlite store."""
    return params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI


def public_uri(uri: str) -> str:
    """A tracking/registry URI fit for logs and reports: credentials in its userinfo masked."""
    from components.core.redact import redact_text

    return redact_text(uri)


def loggable_params(flat: dict[str, Any]) -> dict[str, Any]:
    """Flattened params fit for ``mlflow.log_params``: credentials in URIs, secret-named keys and
    the values of secret environment variables masked (see components/core/redact.py)."""
    from components.core.redact import known_secrets, redact_params

    return redact_params(flat, known_secrets())


def setup_mlflow(params, experiment: str | None = None):
    """Point mlflow at the configured tracking/registry URIs and experiment; returns the mlflow module."""
    import mlflow

    from components.core.redact import uri_has_credentials

    uri = tracking_uri(params)
    if uri_has_credentials(uri):
        # MLflow prints "View run ... at: <tracking URI>/#/..." to stdout after each run.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    registry = params.mlflow.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI")
    if registry:
        mlflow.set_registry_uri(registry)
    mlflow.set_experiment(experiment or params.mlflow.experiment)
    return mlflow


def git_commit(cwd: str | os.PathLike = ".") -> str:
    """HEAD commit (with '-dirty' if the tree has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_version(prepared_dir: str | os.PathLike, dvc_lock: str | os.PathLike = "dvc.lock") -> str:
    """The data version of a prepared data set: DVC's md5 of the output if dvc.lock records it,
    else the content hash in the prepared manifest."""
    prepared = Path(prepared_dir)
    lock = Path(dvc_lock)
    if lock.exists():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if Path(out.get("path", "")).resolve() == prepared.resolve() and out.get("md5"):
                    return f"dvc:{out['md5']}"
    manifest = prepared / "manifest.json"
    if manifest.exists():
        return "sha256:" + json.loads(manifest.read_text()).get("data_hash", "unknown")
    return "unknown"

"""Where the served model comes from: ``serve.model_uri`` -> a local checkpoint directory.

Accepted forms:
- ``models:/<name>@<alias>`` / ``models:/<name>/<version>``: the MLflow registry (tracking and
  registry URI from params.mlflow / $MLFLOW_TRACKING_URI), downloaded once per version into
  ``<storage.cache_dir>/registry/<name>/<version>``;
- ``s3://bucket/prefix``: downloaded once through components.core.storage;
- a local directory, including ``/mnt/models`` that KServe's storage initializer fills from the
  InferenceService's ``storageUri``.
In every case the checkpoint is the shallowest directory below holding our manifest
(model.checkpoint.find_checkpoint), so an MLflow model's ``artifacts/checkpoint`` is found as is.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ModelSourceError(RuntimeError):
    """The configured model cannot be found or fetched; the message says where we looked."""


def _download_registered(params, uri: str) -> Path:
    m = _MODELS_URI.match(uri)
    if not m:
        raise ModelSourceError(f"model_uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from components.core.tracking import tracking_uri

    tracking = tracking_uri(params)
    registry = params.mlflow.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    name = m["name"]
    try:
        client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
        version = (client.get_model_version_by_alias(name, m["alias"]).version if m["alias"]
                   else client.get_model_version(name, m["version"]).version)
        dest = Path(params.storage.cache_dir).expanduser() / "registry" / name / str(version)
        if dest.is_dir():
            log.info("%s is version %s, cached in %s", uri, version, dest)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
        log.info("downloading %s (version %s) from %s", uri, version, registry)
        try:
            # The version's own artifact location: download_artifacts("models:/...") resolves the
            # registry through mlflow's global URI, not the one given here.
            source = client.get_model_version_download_uri(name, str(version))
            download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking)
            tmp.rename(dest)  # atomic: a crash never leaves a half-downloaded version in the cache
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest
    except MlflowException as err:
        from components.core.redact import redact_text  # the registry URI may carry user:password@

        raise ModelSourceError(redact_text(f"model_uri {uri!r} (registry {registry}): {err.message}")) from None


def resolve_model_dir(params, uri: str | None = None) -> Path:
    """``uri`` (default params.serve.model_uri) -> the checkpoint directory to load."""
    from model.checkpoint import CheckpointError, find_checkpoint

    uri = uri or params.serve.model_uri
    if uri.startswith("models:/"):
        root = _download_registered(params, uri)
    elif uri.startswith("s3://"):
        from components.core.storage import StorageError, resolve_local

        try:
            root = resolve_local(uri, params.storage.cache_dir, params.storage)
        except StorageError as err:
            raise ModelSourceError(f"model_uri {uri!r}: {err}") from None
    elif _SCHEME.match(uri):
        raise ModelSourceError(f"model_uri {uri!r}: unsupported scheme; use models:/, s3:// or a local directory")
    else:
        root = Path(uri).expanduser()
        if not root.is_dir():
            raise ModelSourceError(
                f"model_uri {uri!r}: no such directory (train and export a model, or try one with "
                "`dynamicid init --out runs/init` and `dynamicid serve --model-uri runs/init`)"
            )
    try:
        return find_checkpoint(root)
    except CheckpointError as err:
        raise ModelSourceError(f"model_uri {uri!r}: {err}") from None


__all__ = ["resolve_model_dir", "ModelSourceError"]

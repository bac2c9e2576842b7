"""Where things are stored and tracked: object store and MLflow."""

from __future__ import annotations

from pydantic import Field

from model.config import StrictModel


class StorageParams(StrictModel):
    """S3-compatible object store. Credentials only ever come from the standard AWS
    environment / profile chain (never from params), so they cannot leak into params
    hashes, MLflow params or logs."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO etc.); null = AWS_ENDPOINT_URL or AWS default")
    region: str | None = Field(None, description="null = AWS_DEFAULT_REGION / AWS_REGION")
    cache_dir: str = Field("~/.cache/dynamicid", description="local cache for s3:// downloads")
    max_attempts: int = Field(8, ge=1, description="retries with backoff on transient S3 errors")


class MlflowParams(StrictModel):
    tracking_uri: str | None = Field(
        None, description="null = $MLFLOW_TRACKING_URI, else the local store sqlite:///mlflow.db"
    )
    registry_uri: str | None = None
    experiment: str = "dynamicid"
    registered_model: str = "dynamicid"

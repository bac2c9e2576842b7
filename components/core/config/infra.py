"""Where things are stored and tracked: object store and MLflow."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from model.config import StrictModel


class StorageParams(StrictModel):
    """S3-compatible object store. Credentials only ever come from the standard AWS
    environment / profile chain (never from params), so they cannot leak into params
    hashes, MLflow params or logs."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO etc.); null = AWS_ENDPOINT_URL or AWS default")
    region: str | None = Field(None, description="null = AWS_DEFAULT_REGION / AWS_REGION")
    cache_dir: str = Field("~/.cache/dynamicid", description="local cache for s3:// downloads")
    max_attempts: int = Field(8, ge=1, description="attempts per S3 request (first try included), with "
                              "exponential backoff + jitter between them, on resets, timeouts, 5xx, throttling")
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode; adaptive adds client-side rate limiting under throttling")
    connect_timeout_s: float = Field(10.0, gt=0, description="per-attempt connect timeout (then retried)")
    read_timeout_s: float = Field(60.0, gt=0, description="per-attempt read timeout: a stalled response "
                                  "is abandoned and retried")


class MlflowParams(StrictModel):
    tracking_uri: str | None = Field(
        None, description="null = $MLFLOW_TRACKING_URI, else the local store sqlite:///mlflow.db"
    )
    registry_uri: str | None = None
    experiment: str = "dynamicid"
    registered_model: str = "dynamicid"

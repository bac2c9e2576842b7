"""Kubeflow pipeline and deployment sections."""

from __future__ import annotations

from pydantic import Field

from model.config import StrictModel


class PipelineParams(StrictModel):
    image: str = Field("ghcr.io/dynamicid/dynamicid:latest", description="project image the components run")
    host: str | None = Field(None, description="KFP API URL; null = $KF_PIPELINES_ENDPOINT")
    namespace: str = "kubeflow"
    experiment: str = "dynamicid"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    pvc: str = "dynamicid-data"
    s3_secret: str = "dynamicid-s3"


class DeployParams(StrictModel):
    namespace: str = "dynamicid"
    name: str = "dynamicid"
    service_account: str = "dynamicid-serving"
    image: str = "ghcr.io/dynamicid/dynamicid-predictor:latest"
    gpus: int = Field(1, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    scale_target: int = Field(4, ge=1, description="concurrency per replica for the autoscaler")
    canary_percent: int | None = Field(None, ge=0, le=100)

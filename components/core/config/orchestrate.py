"""Kubeflow pipeline, cluster training (``dynamicid launch``) and deployment sections.

Everything that differs between a laptop and a GPU cluster is here, so that moving a run to the
cluster is a params change: node/GPU counts, scheduling (node selector, tolerations), the shared
data volume and the name of the credentials Secret. The objects themselves come from the
templates in ``k8s/base`` (one definition of their shape); these values are patched into them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from model.config import StrictModel


class Toleration(StrictModel):
    """A Kubernetes toleration (``key``/``operator``/``value``/``effect``), validated here so
    that a typo fails at ``params`` time instead of leaving a pod Pending on a tainted node."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, description="only with effect NoExecute")

    def to_k8s(self) -> dict[str, object]:
        """The pod-spec form (camelCase keys, unset keys left out)."""
        out: dict[str, object] = {"operator": self.operator}
        for name, key in (("key", "key"), ("value", "value"), ("effect", "effect"),
                          ("toleration_seconds", "tolerationSeconds")):
            if getattr(self, name) is not None:
                out[key] = getattr(self, name)
        return out


class PipelineParams(StrictModel):
    image: str = Field("ghcr.io/dynamicid/dynamicid:latest", description="project image the components and jobs run")
    host: str | None = Field(None, description="KFP API URL; null = $KF_PIPELINES_ENDPOINT")
    kfp_namespace: str | None = Field(
        None, description="KFP profile namespace for runs (multi-user Kubeflow); null = the client's default"
    )
    namespace: str = Field(
        "dynamicid",
        description="namespace of the PyTorchJobs (where the data PVC and the S3 Secret are); inside a pod "
        "`dynamicid launch` uses the pod's own namespace",
    )
    experiment: str = "dynamicid"
    service_account: str | None = Field(
        None,
        description="service account of the run's pods; null = KFP's runner account, which KFP's own launcher "
        "needs (it reads the kfp-launcher ConfigMap and the artefact-store Secret): bind the dynamicid-pipeline "
        "Role of k8s/base/rbac.yaml to it",
    )
    pipeline_root: str | None = Field(None, description="artefact root of cluster runs (s3://...); null = KFP's")
    package: str = Field("runs/pipeline.yaml", description="where `dynamicid pipeline compile` writes the IR YAML")
    local_root: str = Field("runs/kfp-local", description="pipeline root (artefacts) of `pipeline run-local`")
    synth: bool | None = Field(None, description="start from `dynamicid synth` data; null = only with the tiny profile")
    # Training placement. nodes == 1 trains inside the pipeline step's own pod (or this machine);
    # nodes > 1 (or launch: cluster) creates a PyTorchJob from k8s/base/pytorchjob-anchor.yaml.
    launch: Literal["auto", "local", "cluster"] = Field(
        "auto", description="auto: local when nodes == 1, a PyTorchJob otherwise"
    )
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="0 = CPU training (DeepSpeed's CPU accelerator)")
    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of a GPU")
    train_cpu: str | None = Field(None, description="CPU request per training pod; null = the template's")
    train_memory: str | None = Field(None, description="memory request (and limit) per training pod; null = template")
    shm_size: str = Field("16Gi", description="/dev/shm (memory) of a training step's pod: NCCL and data loaders")
    evaluate_gpus: int = Field(0, ge=0, description="GPUs of the evaluation step (it generates images)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="for GPU steps and training pods")
    tolerations: list[Toleration] = Field(default_factory=list, description="for GPU steps and training pods")
    pvc: str = Field("dynamicid-data", description="RWX data volume shared by the pipeline steps and the job pods")
    shared_dir: str = Field("/data", description="where that volume is mounted; the job pods' working directory")
    s3_secret: str = Field("dynamicid-s3", description="Secret with AWS_* keys, passed only by secretKeyRef")
    s3_optional_keys: list[str] = Field(
        default_factory=lambda: ["AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"],
        description="keys of that Secret that may be absent",
    )
    s3_keys: list[str] = Field(default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    env: dict[str, str] = Field(
        default_factory=lambda: {"MLFLOW_TRACKING_URI": "http://dynamicid-mlflow:5000"},
        description="plain environment of every cluster pod (never credentials: those come from s3_secret)",
    )
    job_template: str | None = Field(None, description="PyTorchJob template; null = k8s/base/pytorchjob-anchor.yaml")
    job_timeout_s: int = Field(7 * 24 * 3600, ge=1, description="give up waiting for a PyTorchJob after this")
    poll_s: float = Field(10.0, gt=0, description="status poll interval of launch/deploy --wait")


class DeployParams(StrictModel):
    namespace: str = "dynamicid"
    name: str = "dynamicid"
    alias: str = Field("champion", description="registry alias deployed when no --version/--alias is given")
    artifacts_destination: str | None = Field(
        "s3://dynamicid/mlflow",
        description="MLflow server's --artifacts-destination: maps proxied mlflow-artifacts:/ URIs to the store",
    )
    template: str | None = Field(None, description="InferenceService template; null = k8s/base/inferenceservice.yaml")
    service_account: str = "dynamicid-serving"
    image: str = "ghcr.io/dynamicid/dynamicid-predictor:latest"
    gpus: int = Field(1, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    scale_target: int = Field(4, ge=1, description="concurrency per replica for the autoscaler")
    canary_percent: int | None = Field(None, ge=0, le=100)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    ready_timeout_s: int = Field(1800, ge=1, description="deploy --wait gives up after this")

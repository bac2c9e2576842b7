"""``dynamicid deploy``: serve a registered model version with KServe.

Looks the version up in the MLflow registry (by ``--version`` or ``--alias``), turns its artefact
location into the ``STORAGE_URI`` KServe's storage initializer downloads into ``/mnt/models``,
and creates or replaces the InferenceService (``serving.kserve.io/v1beta1``) shaped by
``k8s/base/inferenceservice.yaml``. ``--canary-percent P`` sends P % of the traffic to the new
revision while the last ready one keeps the rest; deploying again without it promotes it to all
traffic. ``--dry-run`` prints the object instead.

The predictor gets the resolved params as ``-S`` overrides on its command line (what ``dynamicid
launch`` does for training pods), with the two values a pod needs to be reachable forced: it
listens on all interfaces, on the container port of the template.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from components.core.errors import UserError

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
PREDICTOR_CONTAINER = "kserve-container"  # KServe injects the storage initializer for this name
PARAMS_VOLUME = "params"
# URI schemes KServe's storage initializer downloads from.
CLUSTER_SCHEMES = {"s3", "gs", "https", "http", "pvc", "hdfs", "webhdfs", "oci", "hf"}
VERSION_ANNOTATION = "dynamicid.io/model-version"

Obj = dict[str, Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="create or update the KServe InferenceService for a registered model version",
        description="Find a registered model version in MLflow (params mlflow.registered_model), point a "
        "KServe InferenceService at its artefacts and create or update it. Without --version or --alias "
        "the alias deploy.alias is deployed.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", default=None, help="registered model version number")
    which.add_argument("--alias", default=None, help="registry alias, e.g. champion")
    p.add_argument("--canary-percent", type=int, default=None,
                   help="traffic %% for the new revision (default deploy.canary_percent; none = all traffic)")
    p.add_argument("--namespace", default=None, help="default deploy.namespace")
    p.add_argument("--name", default=None, help="InferenceService name; default deploy.name")
    p.add_argument("--image", default=None, help="predictor image; default deploy.image")
    p.add_argument("--dry-run", action="store_true", help="print the InferenceService instead of applying it")
    p.add_argument("--wait", action="store_true", help="wait until the service reports Ready")
    p.add_argument("--timeout", type=float, default=None, help="seconds for --wait; default deploy.ready_timeout_s")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    location: str  # where the registry says the artefacts are
    storage_uri: str  # what the storage initializer downloads


def storage_uri(location: str, artifacts_destination: str | None) -> str:
    """Registry artefact location -> URI the cluster can download.

    A tracking server that proxies artefacts (``mlflow server --serve-artifacts``) hands out
    ``mlflow-artifacts:/<path>`` URIs, which only MLflow understands; they are the object-store
    path ``<--artifacts-destination>/<path>``.
    """
    parsed = urlparse(location)
    if parsed.scheme == "mlflow-artifacts":
        if not artifacts_destination:
            raise UserError(
                f"{location} is proxied by the MLflow server; set deploy.artifacts_destination to the "
                "server's --artifacts-destination so that it can be mapped to the object store"
            )
        return artifacts_destination.rstrip("/") + "/" + parsed.path.lstrip("/")
    return location


def cluster_readable(uri: str) -> bool:
    return urlparse(uri).scheme in CLUSTER_SCHEMES


def find_version(params, version: str | None, alias: str | None) -> ModelRef:
    """The registered version (by number or alias) and its artefact location."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.core.tracking import tracking_uri

    name = params.mlflow.registered_model
    client = MlflowClient(tracking_uri=tracking_uri(params), registry_uri=params.mlflow.registry_uri)
    try:
        if version is not None:
            mv = client.get_model_version(name, str(version))
        else:
            mv = client.get_model_version_by_alias(name, alias or params.deploy.alias)
        location = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as err:
        which = f"version {version}" if version is not None else f"alias {alias or params.deploy.alias!r}"
        raise UserError(f"registered model {name!r} has no {which}: {err.message}") from None
    return ModelRef(name, str(mv.version), location, storage_uri(location, params.deploy.artifacts_destination))


def _predictor_container(predictor: Obj) -> Obj:
    for c in predictor.get("containers", []):
        if c.get("name") == PREDICTOR_CONTAINER:
            return c
    raise UserError(f"InferenceService template: no container named {PREDICTOR_CONTAINER!r}")


def serving_params(params, port: int, cache_home: str | None = None):
    """Params for the predictor pod: reachable on the pod IP, on the template's port, and (the root
    filesystem being read-only) caching under the template's writable ``$XDG_CACHE_HOME``."""
    from components.core.config import params_from_dict

    tree = params.model_dump(mode="json")
    tree["serve"].update(host="0.0.0.0", http_port=port)
    if cache_home:
        cache = cache_home.rstrip("/") + "/dynamicid"
        tree["storage"]["cache_dir"] = cache
        tree["model"]["sd15"]["cache_dir"] = cache
    return params_from_dict(tree, "deploy")


def _env_value(container: Obj, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def build_inference_service(params, model: ModelRef, *, name: str, namespace: str, image: str,
                            canary_percent: int | None) -> Obj:
    """The InferenceService: the k8s/base template with the model and the params patched in."""
    from components.deploy import kube
    from components.deploy.settings import params_settings, settings_args

    from components.core.redact import redact_text, uri_has_credentials

    d = params.deploy
    if uri_has_credentials(model.location) or uri_has_credentials(model.storage_uri):
        raise UserError(f"model version {model.version} is stored at {redact_text(model.storage_uri)}, a URI with "
                        "credentials, which would be written in plain text into the InferenceService; give the "
                        "storage initializer credentials through the Secret on the serving ServiceAccount instead")
    obj = kube.load_template(d.template, "inferenceservice.yaml", "InferenceService")
    meta = obj.setdefault("metadata", {})
    meta["name"], meta["namespace"] = name, namespace
    meta.setdefault("labels", {})["app.kubernetes.io/part-of"] = "dynamicid"
    meta.setdefault("annotations", {}).update({
        "dynamicid.io/registered-model": model.name,
        VERSION_ANNOTATION: model.version,
        "dynamicid.io/model-location": model.location,
    })
    predictor = obj["spec"]["predictor"]
    # containerConcurrency = the server's own queue limit: Knative holds further requests in its
    # activator instead of letting the server answer 503 (see the template).
    predictor.update(serviceAccountName=d.service_account, minReplicas=d.min_replicas,
                     maxReplicas=d.max_replicas, scaleTarget=d.scale_target,
                     containerConcurrency=params.serve.max_queue)
    if canary_percent is None:
        predictor.pop("canaryTrafficPercent", None)
    else:
        predictor["canaryTrafficPercent"] = canary_percent
    c = _predictor_container(predictor)
    c["image"] = image
    ports = c.get("ports") or [{"containerPort": params.serve.http_port}]
    settings = params_settings(serving_params(params, int(ports[0]["containerPort"]),
                                              _env_value(c, "XDG_CACHE_HOME")))
    args = [a for a in c.get("args", [])]
    c["args"] = kube.escape_expansion(settings_args(settings)) + args
    kube.set_env(c, "STORAGE_URI", model.storage_uri)
    kube.drop_env(c, "DYNAMICID_PARAMS")
    kube.drop_volume(predictor, c, PARAMS_VOLUME)
    kube.set_gpus(c, d.gpu_resource, d.gpus)
    kube.schedule(predictor, d.node_selector, [t.to_k8s() for t in d.tolerations])
    return obj


def apply(custom, obj: Obj) -> Obj:
    """Create the InferenceService, or replace the spec of the existing one (keeping its other
    labels and annotations); returns the server's copy."""
    from kubernetes.client.exceptions import ApiException

    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        existing = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except ApiException as err:
        if err.status != 404:
            raise
        created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, obj)
        print(f"deploy: created InferenceService {ns}/{name}", flush=True)
        return created
    meta = obj["metadata"]
    old = existing.get("metadata", {})
    meta["resourceVersion"] = old.get("resourceVersion")
    meta["labels"] = {**(old.get("labels") or {}), **meta.get("labels", {})}
    meta["annotations"] = {**(old.get("annotations") or {}), **meta.get("annotations", {})}
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, obj)
    before = (old.get("annotations") or {}).get(VERSION_ANNOTATION, "?")
    print(f"deploy: updated InferenceService {ns}/{name} (model version {before} -> "
          f"{meta['annotations'][VERSION_ANNOTATION]})", flush=True)
    return replaced


def wait_ready(custom, namespace: str, name: str, generation: int | None, timeout: float, poll_s: float) -> Obj:
    """Poll until KServe reports Ready for this generation of the spec; print condition changes."""
    deadline = time.monotonic() + timeout
    seen: set[tuple] = set()
    while True:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        for cond in status.get("conditions") or []:
            key = (cond.get("type"), str(cond.get("status")), cond.get("reason"))
            if key not in seen:
                seen.add(key)
                print(f"deploy: {cond.get('type')}={cond.get('status')} {cond.get('reason', '')} "
                      f"{cond.get('message', '')}".rstrip(), flush=True)
        current = generation is None or (status.get("observedGeneration") or 0) >= generation
        ready = any(c.get("type") == "Ready" and str(c.get("status")) == "True" for c in status.get("conditions") or [])
        if current and ready:
            return obj
        if time.monotonic() > deadline:
            raise UserError(f"InferenceService {namespace}/{name} not Ready after {timeout:.0f} s "
                            f"(kubectl -n {namespace} describe inferenceservice {name})")
        time.sleep(poll_s)


def run(args: argparse.Namespace, params) -> int:
    from components.deploy import kube

    d = params.deploy
    canary = d.canary_percent if args.canary_percent is None else args.canary_percent
    if canary is not None and not 0 <= canary <= 100:
        raise UserError(f"--canary-percent must be within 0..100 (got {canary})")
    model = find_version(params, args.version, args.alias)
    name, namespace = args.name or d.name, args.namespace or d.namespace
    obj = build_inference_service(params, model, name=name, namespace=namespace, image=args.image or d.image,
                                  canary_percent=canary)
    readable = cluster_readable(model.storage_uri)
    if args.dry_run:
        if not readable:
            print(f"deploy: warning: {model.storage_uri} is not in a store the cluster can download from "
                  "(register with an S3 artefact store to deploy)", file=sys.stderr)
        print(kube.to_yaml(obj), end="")
        return 0
    if not readable:
        raise UserError(f"model version {model.version} is stored at {model.location}, which the cluster cannot "
                        "download; register it with an S3 (or other remote) MLflow artefact store")

    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(kube.api_client())
    try:
        applied = apply(custom, obj)
        if args.wait:
            generation = (applied.get("metadata") or {}).get("generation")
            ready = wait_ready(custom, namespace, name, generation, args.timeout or d.ready_timeout_s,
                               params.pipeline.poll_s)
            print(f"deploy: {namespace}/{name} is Ready at {(ready.get('status') or {}).get('url', '?')}", flush=True)
    except (ApiException, urllib3.exceptions.HTTPError) as err:
        raise kube.api_error(err, f"InferenceService {namespace}/{name}") from None
    print(f"deploy: model {model.name} version {model.version} from {model.storage_uri}"
          + (f", canary {canary}% of traffic" if canary is not None else ""), flush=True)
    return 0

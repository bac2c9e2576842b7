"""Kubernetes access shared by ``dynamicid launch`` and ``dynamicid deploy``.

The objects they create are not defined here: their shape is the one in ``k8s/base`` (the
manifests the cluster operators review and ``tests/test_manifests.py`` validates). These helpers
load such a template, patch values from params into it, and talk to the API server through the
official client (in-cluster service account first, else the kube config).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from components.core.errors import UserError

Obj = dict[str, Any]

# Next to the packages in a source checkout and in the wheel (pyproject force-includes k8s/base).
K8S_BASE = Path(__file__).resolve().parents[2] / "k8s" / "base"  # the repository (or wheel) root
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Kubernetes expands $(VAR) in command/args; params text must reach the CLI verbatim.
_EXPANSION = "$("


def load_template(path: str | os.PathLike | None, default_name: str, kind: str) -> Obj:
    """The one object of ``kind`` in a template file (default: ``k8s/base/<default_name>``)."""
    file = Path(path) if path else K8S_BASE / default_name
    if not file.is_file():
        raise UserError(
            f"{kind} template not found: {file} (set the params key naming it, or install a build that ships k8s/base)"
        )
    docs = [d for d in yaml.safe_load_all(file.read_text()) if isinstance(d, dict) and d.get("kind") == kind]
    if len(docs) != 1:
        raise UserError(f"{file}: expected exactly one {kind}, found {len(docs)}")
    # safe_load resolves YAML anchors into shared objects; patch a private copy of each.
    return copy.deepcopy(docs[0])


def escape_expansion(args: list[str]) -> list[str]:
    """Escape ``$(`` so that Kubernetes passes the argument through unchanged."""
    return [a.replace(_EXPANSION, "$" + _EXPANSION) for a in args]


def set_env(container: Obj, name: str, value: str) -> None:
    """Set a plain env var, replacing any earlier definition (plain or from a secret)."""
    env = [e for e in container.get("env", []) if e["name"] != name]
    env.append({"name": name, "value": value})
    container["env"] = env


def drop_env(container: Obj, name: str) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name]


def secret_env(container: Obj, secret: str, key: str, optional: bool = False) -> None:
    """An env var taken from a Secret's key (the only way credentials enter a pod), replacing any
    earlier definition of that name."""
    ref: Obj = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    env = [e for e in container.get("env", []) if e["name"] != key]
    env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    container["env"] = env


def rename_secret(container: Obj, name: str) -> None:
    """Point every ``secretKeyRef`` of a container at the Secret ``name`` (params choose it)."""
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            ref["name"] = name


def drop_volume(pod_spec: Obj, container: Obj, volume: str) -> None:
    """Remove a volume and its mount (e.g. the kustomize-generated params ConfigMap, whose
    hashed name only kustomize knows; params travel as CLI overrides instead)."""
    pod_spec["volumes"] = [v for v in pod_spec.get("volumes", []) if v["name"] != volume]
    container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] != volume]


def set_gpus(container: Obj, resource: str, count: int) -> None:
    """GPU limit of a container (a device plugin resource is only ever a limit); 0 removes it."""
    limits = container.setdefault("resources", {}).setdefault("limits", {})
    for key in [k for k in limits if k == resource or k.endswith("/gpu")]:
        del limits[key]
    if count:
        limits[resource] = count


def schedule(pod_spec: Obj, node_selector: dict[str, str], tolerations: list[Obj]) -> None:
    """Node selector and tolerations from params; empty params leave the template's."""
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = list(tolerations)


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SA_NAMESPACE_FILE.exists()


def default_namespace(fallback: str) -> str:
    """Inside a pod: the pod's namespace (where the run's PVC and Secrets are); else ``fallback``."""
    if in_cluster():
        return SA_NAMESPACE_FILE.read_text().strip() or fallback
    return fallback


def api_client():
    """A kubernetes ApiClient: the pod's service account in a cluster, else the kube config
    ($KUBECONFIG or ~/.kube/config, current context)."""
    from kubernetes import client, config

    if in_cluster():
        config.load_incluster_config()
        return client.ApiClient()
    try:
        # The client reads $KUBECONFIG once, at import; read it now so a changed value counts.
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    except (config.ConfigException, FileNotFoundError, TypeError) as err:
        raise UserError(f"no Kubernetes access: not in a pod and no usable kube config ({err})") from None


def api_error(err: Exception, what: str) -> UserError:
    """An ApiException as a one-line error naming the object and the server's reason."""
    import json

    status = getattr(err, "status", None)
    reason = getattr(err, "reason", "") or ""
    message = ""
    body = getattr(err, "body", None)
    if body:
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = str(body)[:300]
    if status is None:  # connection refused, DNS, TLS: urllib3 errors
        return UserError(f"{what}: cannot reach the Kubernetes API: {err}")
    return UserError(f"{what}: HTTP {status} {reason}" + (f": {message}" if message else ""))


def to_yaml(obj: Obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=120)

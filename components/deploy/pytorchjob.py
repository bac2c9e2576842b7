"""The PyTorchJob of a multi-node training stage: the stage's paths staged onto the shared volume, the job built.

The job's shape is ``k8s/base/pytorchjob-anchor.yaml``; build_job patches in the stage, image,
node/GPU counts, scheduling, volume and Secret names from params, and ships the resolved params
as ``-S`` overrides on the command line (no ConfigMap to create, so no extra RBAC).

Paths: the job's pods see the shared data volume (``pipeline.pvc`` at ``pipeline.shared_dir``,
also their working directory) and s3:// URIs, nothing else. Relative params paths therefore land
on the volume. When launch runs where that volume is mounted (a pipeline step), absolute local
paths of the stage's inputs (a kfp artefact, say) are copied onto it, and the stage's output is
written there and copied back after success, so the caller sees the same result as a local run.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.core.errors import UserError

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
STAGE_LABEL = "dynamicid.io/stage"
# The stage whose output a stage starts from (its checkpoint is the next stage's init).
UPSTREAM = {"base": None, "anchor": "base", "reconfigure": "anchor"}
TRAINER_CONTAINER = "pytorch"  # the Training Operator finds the rendezvous port by this name
DATA_VOLUME = "data"
PARAMS_VOLUME = "params"

Obj = dict[str, Any]


def _get(tree: Obj, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _put(tree: Obj, dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for key in head:
        tree = tree[key]
    tree[last] = value


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy once: a finished copy carries a marker, a half-finished one is redone."""
    marker = dest / ".dynamicid-staged"
    if marker.exists():
        return
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, partial)
    else:
        partial.mkdir(parents=True)
        shutil.copy2(src, partial / src.name)
    marker_tmp = partial / marker.name
    marker_tmp.write_text(str(src))
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(dest)


@dataclass
class Staging:
    """Params as the job's pods must see them, and the outputs to copy back afterwards."""

    params: Any
    copy_back: list[tuple[Path, Path]]


def stage_paths(params, stage: str, name: str, copy: Callable[[Path, Path], None] = _copy_tree) -> Staging:
    """Put the stage's local inputs and output on the shared volume (see the module docstring)."""
    from components.core.config import params_from_dict
    from components.core.storage import is_s3

    shared = Path(params.pipeline.shared_dir)
    mounted = shared.is_dir()
    tree = params.model_dump(mode="json")
    work = shared / "staging" / name

    def off_volume(value: str) -> bool:
        return not is_s3(value) and Path(value).is_absolute() and not Path(value).is_relative_to(shared)

    def refuse(key: str, value: str) -> UserError:
        return UserError(
            f"{key}={value} is a path on this machine; the job's pods cannot read it. Use a path relative "
            f"to the shared volume ({shared} in the pods), an s3:// URI, or run launch where {shared} is mounted"
        )

    inputs = ["data.prepared"] + ([f"train.{UPSTREAM[stage]}.output"] if UPSTREAM[stage] else [])
    for key in inputs:
        value = _get(tree, key)
        if not off_volume(value) or not Path(value).exists():
            continue  # on the volume, in S3, or an optional input this profile does not use
        if not mounted:
            raise refuse(key, value)
        # Keyed by the source, so the stages of one run copy the prepared data only once.
        dest = shared / "staging" / "inputs" / hashlib.sha256(value.encode()).hexdigest()[:16]
        print(f"launch: staging {key} {value} -> {dest}", file=sys.stderr, flush=True)  # stdout: --dry-run YAML
        copy(Path(value), dest)
        _put(tree, key, str(dest))
    copy_back = []
    out_key = f"train.{stage}.output"
    value = _get(tree, out_key)
    if off_volume(value):
        if not mounted:
            raise refuse(out_key, value)
        dest = work / "output"
        _put(tree, out_key, str(dest))
        copy_back.append((dest, Path(value)))
    return Staging(params_from_dict(tree, "launch"), copy_back)


def _trainer(pod_spec: Obj) -> Obj:
    for c in pod_spec.get("containers", []):
        if c.get("name") == TRAINER_CONTAINER:
            return c
    raise UserError(f"PyTorchJob template: no container named {TRAINER_CONTAINER!r}")


def _train_args(template_args: list[str], stage: str, settings: list[str]) -> list[str]:
    """Template args with the stage set and the params overrides put before the subcommand."""
    from components.deploy.kube import escape_expansion
    from components.deploy.settings import settings_args

    if "dynamicid" not in template_args or "train" not in template_args:
        raise UserError("PyTorchJob template: the trainer args must run `dynamicid train`")
    cli = template_args.index("dynamicid") + 1
    rest: list[str] = []
    tokens = iter(template_args[cli:])
    for arg in tokens:
        if arg == "--stage":
            next(tokens, None)  # "--stage NAME": drop the value too
        elif not arg.startswith("--stage="):
            rest.append(arg)
    sub = rest.index("train") + 1
    return (template_args[:cli] + escape_expansion(settings_args(settings)) + rest[:sub]
            + [f"--stage={stage}"] + rest[sub:])


def build_job(params, *, stage: str, name: str, namespace: str, image: str, nodes: int, gpus: int) -> Obj:
    """The PyTorchJob: the k8s/base template with everything params decide patched in."""
    from components.deploy import kube
    from components.deploy.settings import params_settings

    p = params.pipeline
    job = kube.load_template(p.job_template, "pytorchjob-anchor.yaml", "PyTorchJob")
    meta = job.setdefault("metadata", {})
    meta["name"], meta["namespace"] = name, namespace
    meta.setdefault("labels", {}).update({"app.kubernetes.io/part-of": "dynamicid", STAGE_LABEL: stage})
    spec = job["spec"]
    spec["nprocPerNode"] = str(max(gpus, 1))
    replicas = spec["pytorchReplicaSpecs"]
    master = replicas["Master"]
    master["replicas"] = 1
    if nodes > 1:
        worker = copy.deepcopy(replicas.get("Worker") or master)
        worker["replicas"] = nodes - 1
        replicas["Worker"] = worker
    else:
        replicas.pop("Worker", None)
    settings = params_settings(params)
    tolerations = [t.to_k8s() for t in p.tolerations]
    for role in replicas.values():
        template = role["template"]
        template.setdefault("metadata", {}).setdefault("labels", {})[STAGE_LABEL] = stage
        pod = template["spec"]
        c = _trainer(pod)
        c["image"] = image
        c["args"] = _train_args(c.get("args", []), stage, settings)
        # Params travel in the args; the template's kustomize-generated ConfigMap may not exist.
        kube.drop_env(c, "DYNAMICID_PARAMS")
        kube.drop_volume(pod, c, PARAMS_VOLUME)
        kube.rename_secret(c, p.s3_secret)
        for key, value in p.env.items():
            kube.set_env(c, key, value)
        # The same Secret keys as the pipeline's steps get (kfp-kubernetes use_secret_as_env).
        present = {e["name"] for e in c.get("env", []) if "valueFrom" in e}
        for key in p.s3_keys:
            if key not in present:
                kube.secret_env(c, p.s3_secret, key)
        for key in p.s3_optional_keys:
            if key not in present:
                kube.secret_env(c, p.s3_secret, key, optional=True)
        if gpus == 0:
            kube.set_env(c, "DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise look for CUDA
        else:
            kube.drop_env(c, "DS_ACCELERATOR")
        kube.set_gpus(c, p.gpu_resource, gpus)
        resources = c.setdefault("resources", {})
        if p.train_cpu:
            resources.setdefault("requests", {})["cpu"] = p.train_cpu
        if p.train_memory:
            resources.setdefault("requests", {})["memory"] = p.train_memory
            resources.setdefault("limits", {})["memory"] = p.train_memory
        c["workingDir"] = p.shared_dir
        for vol in pod.get("volumes", []):
            if vol["name"] == DATA_VOLUME and "persistentVolumeClaim" in vol:
                vol["persistentVolumeClaim"]["claimName"] = p.pvc
        for mount in c.get("volumeMounts", []):
            if mount["name"] == DATA_VOLUME:
                mount["mountPath"] = p.shared_dir
        kube.schedule(pod, p.node_selector, tolerations)
    return job

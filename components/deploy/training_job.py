"""``dynamicid launch``: run a training stage on this machine, or as a Kubeflow PyTorchJob.

Why a separate command from ``dynamicid train``: ``train`` is the one code path of a training
stage (one process group, DeepSpeed); ``launch`` only decides *where* it runs. With one node it
runs ``train`` right here (this machine, or the pipeline step's own pod with its GPUs); with more
nodes it creates a PyTorchJob (Training Operator) whose pods run the same ``train`` under
torchrun, streams the job's conditions and pod phases, and exits non-zero when it fails.

The job's shape is ``k8s/base/pytorchjob-anchor.yaml``; launch patches in the stage, image,
node/GPU counts, scheduling, volume and Secret names from params, and ships the resolved params
as ``-S`` overrides on the command line (no ConfigMap to create, so no extra RBAC).

Paths: the job's pods see the shared data volume (``pipeline.pvc`` at ``pipeline.shared_dir``,
also their working directory) and s3:// URIs, nothing else. Relative params paths therefore land
on the volume. When launch runs where that volume is mounted (a pipeline step), absolute local
paths of the stage's inputs (a kfp artefact, say) are copied onto it, and the stage's output is
written there and copied back after success, so the caller sees the same result as a local run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.core.errors import UserError

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
STAGE_LABEL = "dynamicid.io/stage"
STAGES = ("base", "anchor", "reconfigure")
# The stage whose output a stage starts from (its checkpoint is the next stage's init).
UPSTREAM = {"base": None, "anchor": "base", "reconfigure": "anchor"}
TRAINER_CONTAINER = "pytorch"  # the Training Operator finds the rendezvous port by this name
DATA_VOLUME = "data"
PARAMS_VOLUME = "params"

Obj = dict[str, Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run a training stage here (1 node) or as a multi-node PyTorchJob",
        description="Run `dynamicid train --stage S` on this machine when one node is asked for, else "
        "create a Kubeflow PyTorchJob (Training Operator) from k8s/base/pytorchjob-anchor.yaml with the "
        "requested nodes x GPUs, and with --wait stream its status until it succeeds or fails. "
        "Defaults come from the `pipeline` params section.",
    )
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--nodes", type=int, default=None, help="nodes (pods); default pipeline.nodes")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (= processes) per node, 0 = CPU; default pipeline.gpus_per_node")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="where", action="store_const", const="local",
                       help="run on this machine (one node only)")
    where.add_argument("--cluster", dest="where", action="store_const", const="cluster",
                       help="create a PyTorchJob even for one node")
    p.add_argument("--namespace", default=None,
                   help="job namespace; default: this pod's namespace in a cluster, else pipeline.namespace")
    p.add_argument("--image", default=None, help="image of the job's pods; default pipeline.image")
    p.add_argument("--name", default=None, help="job name; default dynamicid-STAGE-<hash of params, size, image>")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish (always, when local)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait; default pipeline.job_timeout_s")
    p.add_argument("--resume", action="store_true",
                   help="local: continue from the newest checkpoint (job pods always resume)")
    p.add_argument("--dry-run", action="store_true", help="print the PyTorchJob instead of creating it")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Placement:
    where: str  # "local" | "cluster"
    nodes: int
    gpus: int


def placement(params, nodes: int | None, gpus: int | None, where: str | None) -> Placement:
    """Where the stage runs: explicit flags, else the ``pipeline`` params (auto: 1 node = here)."""
    p = params.pipeline
    nodes = p.nodes if nodes is None else nodes
    gpus = p.gpus_per_node if gpus is None else gpus
    if nodes < 1 or gpus < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {nodes}, {gpus})")
    mode = where or p.launch
    if mode == "auto":
        mode = "local" if nodes == 1 else "cluster"
    if mode == "local" and nodes > 1:
        raise UserError(f"{nodes} nodes need a cluster: drop --local / set pipeline.launch to auto or cluster")
    return Placement(mode, nodes, gpus)


def run(args: argparse.Namespace, params) -> int:
    where = placement(params, args.nodes, args.gpus_per_node, args.where)
    if where.where == "local":
        return run_local(args, params, where)
    return run_cluster(args, params, where)


# --- on this machine ---------------------------------------------------------------------------


def run_local(args: argparse.Namespace, params, where: Placement) -> int:
    """``dynamicid train`` on this machine: the train stage's own function, with the same params."""
    from components.train.entry import run_stage_command

    nproc = max(where.gpus, 1)
    train_args = argparse.Namespace(stage=args.stage, resume=args.resume, nproc=nproc, max_steps=None,
                                    params=args.params, overrides=args.overrides, verbose=args.verbose)
    print(f"launch: training stage {args.stage} on this machine ({nproc} process(es))", flush=True)
    return run_stage_command(train_args, params)


# --- as a PyTorchJob ---------------------------------------------------------------------------


def _get(tree: Obj, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def _put(tree: Obj, dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for key in head:
        tree = tree[key]
    tree[last] = value


def job_name(params, stage: str, where: Placement, image: str) -> str:
    """Deterministic per configuration: a retried pipeline step finds (and resumes) its job."""
    from components.core.config import params_hash

    key = f"{params_hash(params)}:{stage}:{where.nodes}:{where.gpus}:{image}"
    return f"dynamicid-{stage}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


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


def terminal_state(job: Obj) -> str | None:
    """"Succeeded"/"Failed" once the operator says so (a condition of that type with status True)."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Succeeded", "Failed") and str(cond.get("status")) == "True":
            return cond["type"]
    return None


def _last_condition(job: Obj, kind: str) -> Obj:
    conds = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == kind]
    return conds[-1] if conds else {}


class JobWatcher:
    """Polls a PyTorchJob and its pods; prints each new condition and pod phase once."""

    def __init__(self, custom, core, namespace: str, name: str, out=None):
        self.custom, self.core, self.namespace, self.name = custom, core, namespace, name
        self.out = out or sys.stdout
        self._seen_conditions: set[tuple] = set()
        self._pod_states: dict[str, str] = {}

    def _say(self, text: str) -> None:
        print(f"launch: {text}", file=self.out, flush=True)

    def job(self) -> Obj:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def pods(self) -> list:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={self.name}").items

    @staticmethod
    def pod_state(pod) -> str:
        state = pod.status.phase or "Unknown"
        for cs in pod.status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason:
                state += f" ({waiting.reason})"
            if cs.restart_count:
                state += f" restarts={cs.restart_count}"
        return state

    def poll(self) -> str | None:
        job = self.job()
        for cond in (job.get("status") or {}).get("conditions") or []:
            key = (cond.get("type"), str(cond.get("status")), cond.get("reason"), cond.get("lastTransitionTime"))
            if key not in self._seen_conditions:
                self._seen_conditions.add(key)
                self._say(f"job {self.name}: {cond.get('type')}={cond.get('status')} "
                          f"{cond.get('reason', '')}: {cond.get('message', '')}".rstrip(": "))
        for pod in self.pods():
            state = self.pod_state(pod)
            if self._pod_states.get(pod.metadata.name) != state:
                self._pod_states[pod.metadata.name] = state
                self._say(f"pod {pod.metadata.name}: {state}")
        return terminal_state(job)

    def master_log_tail(self, lines: int = 40) -> str:
        for pod in self.pods():
            if (pod.metadata.labels or {}).get(REPLICA_TYPE_LABEL, "").lower() == "master":
                return self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, tail_lines=lines)
        return ""

    def wait(self, timeout: float, poll_s: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.poll()
            if state:
                return state
            if time.monotonic() > deadline:
                raise UserError(
                    f"PyTorchJob {self.namespace}/{self.name} still running after {timeout:.0f} s; it keeps "
                    f"running (kubectl -n {self.namespace} get pytorchjob {self.name}); wait again with the same "
                    "command, or delete it"
                )
            time.sleep(poll_s)


def _create_or_attach(custom, job: Obj, poll_s: float) -> str | None:
    """Create the job; if one of that name exists, attach to it while it runs, reuse it if it
    succeeded, replace it if it failed (its pods resume from the checkpoints on the volume)."""
    from kubernetes.client.exceptions import ApiException

    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
        print(f"launch: created PyTorchJob {ns}/{name}", flush=True)
        return None
    except ApiException as err:
        if err.status != 409:
            raise
    existing = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    state = terminal_state(existing)
    if state is None:
        print(f"launch: PyTorchJob {ns}/{name} is already running; following it", flush=True)
        return None
    if state == "Succeeded":
        print(f"launch: PyTorchJob {ns}/{name} already succeeded with this configuration; reusing it", flush=True)
        return state
    print(f"launch: PyTorchJob {ns}/{name} failed before; replacing it", flush=True)
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground")
    while True:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                break
            raise
        time.sleep(poll_s)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    print(f"launch: created PyTorchJob {ns}/{name}", flush=True)
    return None


def run_cluster(args: argparse.Namespace, params, where: Placement) -> int:
    from components.deploy import kube

    p = params.pipeline
    image = args.image or p.image
    name = args.name or job_name(params, args.stage, where, image)
    namespace = args.namespace or kube.default_namespace(p.namespace)
    staging = stage_paths(params, args.stage, name, copy=(lambda s, d: None) if args.dry_run else _copy_tree)
    job = build_job(staging.params, stage=args.stage, name=name, namespace=namespace, image=image,
                    nodes=where.nodes, gpus=where.gpus)
    if args.dry_run:
        print(kube.to_yaml(job), end="")
        return 0

    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = kube.api_client()
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    watcher = JobWatcher(custom, core, namespace, name)
    try:
        state = _create_or_attach(custom, job, p.poll_s)
        if not args.wait and state is None:
            print(f"launch: not waiting; follow it with: kubectl -n {namespace} get pytorchjob {name} -w", flush=True)
            return 0
        if state is None:
            state = watcher.wait(args.timeout or p.job_timeout_s, p.poll_s)
        if state == "Failed":
            cond = _last_condition(watcher.job(), "Failed")
            tail = watcher.master_log_tail()
            if tail:
                print(f"launch: last lines of the master pod's log:\n{tail}", file=sys.stderr, flush=True)
            raise UserError(f"PyTorchJob {namespace}/{name} failed: {cond.get('reason', '')}: {cond.get('message', '')}")
    except (ApiException, urllib3.exceptions.HTTPError) as err:
        raise kube.api_error(err, f"PyTorchJob {namespace}/{name}") from None
    for src, dest in staging.copy_back:
        print(f"launch: copying the result {src} -> {dest}", flush=True)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        shutil.rmtree(src.parent, ignore_errors=True)  # staging/<job>: the result now lives at dest
    print(f"launch: PyTorchJob {namespace}/{name} succeeded", flush=True)
    return 0

"""``dynamicid launch``: run a training stage on this machine, or as a Kubeflow PyTorchJob.

Why a separate command from ``dynamicid train``: ``train`` is the one code path of a training
stage (one process group, DeepSpeed); ``launch`` only decides *where* it runs. With one node it
runs ``train`` right here (this machine, or the pipeline step's own pod with its GPUs); with more
nodes it creates a PyTorchJob (Training Operator) whose pods run the same ``train`` under
torchrun, streams the job's conditions and pod phases, and exits non-zero when it fails.

The job and the staging of paths onto the shared volume: components.deploy.pytorchjob; following
the job: components.deploy.job_watch.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from dataclasses import dataclass

from components.core.errors import UserError
from components.deploy.job_watch import JobWatcher, _create_or_attach, _last_condition
from components.deploy.pytorchjob import _copy_tree, build_job, stage_paths

STAGES = ("base", "anchor", "reconfigure")


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


def job_name(params, stage: str, where: Placement, image: str) -> str:
    """Deterministic per configuration: a retried pipeline step finds (and resumes) its job."""
    from components.core.config import params_hash

    key = f"{params_hash(params)}:{stage}:{where.nodes}:{where.gpus}:{image}"
    return f"dynamicid-{stage}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


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

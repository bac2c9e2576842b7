"""The dynamicid Kubeflow pipeline (kfp v2): the same stages as dvc.yaml, wired by artefacts.

    [synth] -> prepare -> [train base] -> train anchor -> train reconfigure -> evaluate
            -> gate --(dsl.If passed)--> register -> deploy

``synth`` and ``train base`` exist only where the embedded (tiny) profile needs them, exactly as
in dvc.yaml. The graph is built from params at compile time: what a cluster must know before a
pod starts (GPU counts, node selector, tolerations, the data volume, the credentials Secret) is
fixed in the IR through kfp-kubernetes, so a change of cluster size is ``-S pipeline.nodes=4``
and a recompile. Run-time parameters are the image, the resolved params (``settings``) and the
deploy flags.
"""

# No `from __future__ import annotations`: kfp reads the annotations as types.

from pathlib import Path
from typing import Callable

from kfp import dsl

from components.core.errors import UserError
from components.core.config import Params, params_from_dict
from pipelines import components as c
from components.deploy.settings import params_settings

PIPELINE_NAME = "dynamicid"


def training_stages(params: Params) -> list[str]:
    """Stages in order; the tiny profile first trains its own text-to-image base."""
    return (["base"] if params.model.profile == "tiny" else []) + ["anchor", "reconfigure"]


def uses_synth(params: Params) -> bool:
    synth = params.pipeline.synth
    return params.model.profile == "tiny" if synth is None else synth


def _on_cluster(task: dsl.PipelineTask, params: Params, *, gpus: int = 0, shared_volume: bool = False,
                timeout_s: int | None = None) -> None:
    """Pod-level settings a cluster needs; kfp's local runner has no use for them."""
    from kfp import kubernetes

    p = params.pipeline
    for key, value in p.env.items():
        task.set_env_variable(key, value)
    if p.s3_keys:
        kubernetes.use_secret_as_env(task, p.s3_secret, {k: k for k in p.s3_keys})
    if p.s3_optional_keys:
        kubernetes.use_secret_as_env(task, p.s3_secret, {k: k for k in p.s3_optional_keys}, optional=True)
    if gpus:
        task.set_accelerator_type(p.gpu_resource).set_accelerator_limit(gpus)
        for key, value in p.node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        for t in p.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                      toleration_seconds=t.toleration_seconds)
    if shared_volume:
        kubernetes.mount_pvc(task, p.pvc, p.shared_dir)
    if timeout_s:
        kubernetes.set_timeout(task, timeout_s)


def local_params(params: Params) -> Params:
    """Params of a run on this machine: one node, training in-process."""
    tree = params.model_dump(mode="json")
    tree["pipeline"].update(nodes=1, launch="local")
    return params_from_dict(tree, "run-local")


def build_pipeline(params: Params, *, cluster: bool = True) -> Callable:
    """The pipeline function for these params. ``cluster=False`` (``pipeline run-local``) trains
    on this machine (one node) and leaves out the pod settings."""
    if not cluster:
        params = local_params(params)
    p = params.pipeline
    nodes, gpus = p.nodes, p.gpus_per_node
    if nodes > 1 and p.launch == "local":
        raise UserError(f"pipeline.nodes={nodes} needs pipeline.launch auto or cluster (it is local)")
    in_pod = nodes == 1 and p.launch != "cluster"
    stages = training_stages(params)

    def place(task: dsl.PipelineTask, image, name: str, **cluster_kw) -> dsl.PipelineTask:
        task.set_display_name(name).set_container_image(image)
        if cluster:
            _on_cluster(task, params, **cluster_kw)
        return task

    @dsl.pipeline(name=PIPELINE_NAME, description="DynamicID: prepare, train (anchor, reconfigure), evaluate, "
                  "gate, register and deploy; every step runs a `dynamicid` subcommand in the project image.")
    def dynamicid(image: str = p.image, settings: list = params_settings(params),
                  deploy_args: list = ["--wait"]) -> bool:
        if uses_synth(params):
            raw = place(c.synth(settings=settings), image, "synth")
            prepared = place(c.prepare(settings=settings, raw=raw.outputs["raw"]), image, "prepare")
        else:
            prepared = place(c.prepare_source(settings=settings), image, "prepare")
        data = prepared.outputs["prepared"]

        upstream = None
        for stage in stages:
            common = dict(settings=settings, stage=stage, nodes=nodes, gpus_per_node=gpus, image=image, prepared=data)
            if upstream is None:
                task = c.train(**common)
            else:
                task = c.train_from(**common, upstream_stage=upstream[0], upstream=upstream[1].outputs["model"])
            # One node: the step's own pod trains (it needs the GPUs); more: it only drives the
            # PyTorchJob and stages files through the shared volume.
            place(task, image, f"train {stage}", gpus=gpus if in_pod else 0, shared_volume=not in_pod,
                  timeout_s=p.job_timeout_s)
            if cluster and in_pod:
                from kfp import kubernetes

                # The container runtime's 64 MiB /dev/shm is far too small for NCCL and data loaders.
                kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=p.shm_size)
                if p.train_cpu:
                    task.set_cpu_request(p.train_cpu)
                if p.train_memory:
                    task.set_memory_request(p.train_memory).set_memory_limit(p.train_memory)
            upstream = (stage, task)
        model = upstream[1].outputs["model"]

        evaluation = place(c.evaluate(settings=settings, prepared=data, model=model), image, "evaluate", gpus=p.evaluate_gpus)
        metrics = evaluation.outputs["metrics"]
        # The gate, the registry and the deployment change with the world (a new reference, the registry), not
        # only with their inputs: never served from kfp's cache.
        decision = place(c.gate(settings=settings, model=model, metrics=metrics), image, "gate")
        decision.set_caching_options(False)
        with dsl.If(decision.output == True, name="gate-passed"):  # noqa: E712 (a kfp condition, not Python)
            version = place(c.register(settings=settings, model=model, metrics=metrics), image, "register")
            version.set_caching_options(False)
            rollout = place(c.deploy(settings=settings, version=version.output, deploy_args=deploy_args),
                            image, "deploy")
            rollout.set_caching_options(False)
        return decision.output

    return dynamicid


def compile_pipeline(params: Params, package: str | Path) -> Path:
    """Write the pipeline's IR YAML (what the KFP API server runs)."""
    from kfp import compiler

    out = Path(package)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params, cluster=True), str(out))
    return out

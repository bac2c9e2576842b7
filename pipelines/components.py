"""The pipeline's components: each body is one ``dynamicid`` subcommand and nothing else.

They are lightweight Python components because kfp's local SubprocessRunner runs only those;
on a cluster the same definitions run in the project image (``set_container_image`` with the
pipeline's ``image`` parameter), which already has kfp and dynamicid installed. Artefact paths
become CLI flags or params overrides; ``settings`` carries the resolved params (see
:mod:`components.deploy.settings`). Imports are inside the bodies because kfp ships only the function's
source to the pod.
"""

# No `from __future__ import annotations`: kfp reads the annotations as types.

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

# Replaced per task by the pipeline's `image` parameter; named here because the decorator needs one.
PLACEHOLDER_IMAGE = "ghcr.io/dynamicid/dynamicid:latest"


def _component(func):
    return dsl.component(func, base_image=PLACEHOLDER_IMAGE, install_kfp_package=False)


@_component
def synth(settings: list, raw: Output[Dataset]):
    """dynamicid synth: the synthetic face data set of the embedded profile."""
    from pipelines.steps import run

    run(settings, "synth", "--out", raw.path)


@_component
def prepare(settings: list, raw: Input[Dataset], prepared: Output[Dataset]):
    """dynamicid prepare on an upstream data set."""
    from pipelines.steps import run

    run(settings, "prepare", "--input", raw.path, "--output", prepared.path)


@_component
def prepare_source(settings: list, prepared: Output[Dataset]):
    """dynamicid prepare on params data.raw (a local path or an s3:// prefix)."""
    from pipelines.steps import run

    run(settings, "prepare", "--output", prepared.path)


@_component
def train(settings: list, stage: str, nodes: int, gpus_per_node: int, image: str,
          prepared: Input[Dataset], model: Output[Model]):
    """dynamicid launch: a training stage without an upstream checkpoint, here or as a PyTorchJob."""
    from pipelines.steps import run

    run(settings + [f"data.prepared={prepared.path}", f"train.{stage}.output={model.path}"],
        "launch", "--stage", stage, "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node),
        "--image", image, "--wait")


@_component
def train_from(settings: list, stage: str, upstream_stage: str, nodes: int, gpus_per_node: int, image: str,
               prepared: Input[Dataset], upstream: Input[Model], model: Output[Model]):
    """dynamicid launch: a training stage that starts from the previous stage's checkpoint."""
    from pipelines.steps import run

    run(settings + [f"data.prepared={prepared.path}", f"train.{upstream_stage}.output={upstream.path}",
                    f"train.{stage}.output={model.path}"],
        "launch", "--stage", stage, "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node),
        "--image", image, "--wait")


@_component
def evaluate(settings: list, prepared: Input[Dataset], model: Input[Model], metrics: Output[Metrics]):
    """dynamicid evaluate: metrics.json (and grids) of the exported model on the prepared test split."""
    from pipelines.steps import run

    run(settings + [f"data.prepared={prepared.path}"], "evaluate", "--checkpoint", model.path + "/export",
        "--output", metrics.path)


@_component
def gate(settings: list, model: Input[Model], metrics: Input[Metrics]) -> bool:
    """dynamicid register --check-only: does the model pass the gate (learning checks, thresholds, intervals, reference)?"""
    from pipelines.steps import decision

    return decision(settings, "register", "--checkpoint", model.path + "/export",
                    "--metrics", metrics.path + "/metrics.json", "--check-only")


@_component
def register(settings: list, model: Input[Model], metrics: Input[Metrics]) -> str:
    """dynamicid register: a new registry version (its number is the output)."""
    from pipelines.steps import run_for_value

    return run_for_value(settings, "register", "--checkpoint", model.path + "/export",
                         "--metrics", metrics.path + "/metrics.json", flag="--version-file")


@_component
def deploy(settings: list, version: str, deploy_args: list):
    """dynamicid deploy: the KServe InferenceService for the registered version."""
    from pipelines.steps import run

    run(settings, "deploy", "--version", version, *deploy_args)

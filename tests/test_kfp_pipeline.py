"""The Kubeflow pipeline: the compiled IR (components, artefact types, the gate condition, pod
resources from params), component bodies that only call the CLI, submit/status through
kfp.Client against a KFP API server on 127.0.0.1, and the whole pipeline under kfp.local."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from components.cli import main
from components.core.config import load_params, params_from_dict, parse_overrides

Obj = dict[str, Any]
IMAGE_PLACEHOLDER = "{{$.inputs.parameters['pipelinechannel--image']}}"
SENTINEL = "sentinel-secret-must-not-be-compiled-in"


def compile_ir(tmp_path: Path, *overrides: str) -> tuple[Obj, Obj]:
    out = tmp_path / f"pipeline-{uuid.uuid4().hex[:6]}.yaml"
    argv = [a for o in overrides for a in ("-S", o)] + ["pipeline", "compile", "--output", str(out)]
    assert main(argv) == 0
    ir, platform = list(yaml.safe_load_all(out.read_text()))
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(ir: Obj) -> Obj:
    return ir["root"]["dag"]["tasks"]


def executor(ir: Obj, task: Obj) -> Obj:
    comp = ir["components"][task["componentRef"]["name"]]
    return ir["deploymentSpec"]["executors"][comp["executorLabel"]]


def artefact_source(task: Obj, name: str) -> tuple[str, str]:
    src = task["inputs"]["artifacts"][name]["taskOutputArtifact"]
    return src["producerTask"], src["outputArtifactKey"]


def by_display_name(ir: Obj, dag: Obj | None = None) -> dict[str, tuple[str, Obj]]:
    dag = dag or tasks(ir)
    return {t["taskInfo"]["name"]: (key, t) for key, t in dag.items()}


# --- the graph ----------------------------------------------------------------------------------


def test_tiny_profile_graph_artefacts_and_gate(tmp_path) -> None:
    ir, _ = compile_ir(tmp_path)
    named = by_display_name(ir)
    assert set(named) == {"synth", "prepare", "train base", "train anchor", "train reconfigure", "evaluate", "gate",
                          "gate-passed"}
    key = {name: k for name, (k, _) in named.items()}
    t = {name: task for name, (_, task) in named.items()}
    # artefact passing, stage by stage
    assert artefact_source(t["prepare"], "raw") == (key["synth"], "raw")
    for stage in ("train base", "train anchor", "train reconfigure"):
        assert artefact_source(t[stage], "prepared") == (key["prepare"], "prepared")
    assert artefact_source(t["train anchor"], "upstream") == (key["train base"], "model")
    assert artefact_source(t["train reconfigure"], "upstream") == (key["train anchor"], "model")
    assert artefact_source(t["evaluate"], "model") == (key["train reconfigure"], "model")
    assert artefact_source(t["gate"], "metrics") == (key["evaluate"], "metrics")
    for name, stage, upstream in (("train base", "base", None), ("train anchor", "anchor", "base"),
                                  ("train reconfigure", "reconfigure", "anchor")):
        params = t[name]["inputs"]["parameters"]
        assert params["stage"]["runtimeValue"]["constant"] == stage
        if upstream:
            assert params["upstream_stage"]["runtimeValue"]["constant"] == upstream

    # typed artefacts
    def out_type(task: Obj, name: str) -> str:
        comp = ir["components"][task["componentRef"]["name"]]
        return comp["outputDefinitions"]["artifacts"][name]["artifactType"]["schemaTitle"]

    assert out_type(t["synth"], "raw") == out_type(t["prepare"], "prepared") == "system.Dataset"
    assert {out_type(t[s], "model") for s in ("train base", "train anchor", "train reconfigure")} == {"system.Model"}
    assert out_type(t["evaluate"], "metrics") == "system.Metrics"
    gate_comp = ir["components"][t["gate"]["componentRef"]["name"]]
    assert gate_comp["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"

    # the gate: register and deploy only inside the dsl.If on the gate's output
    condition = t["gate-passed"]
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    inner = by_display_name(ir, ir["components"][condition["componentRef"]["name"]]["dag"]["tasks"])
    assert set(inner) == {"register", "deploy"}
    deploy_version = inner["deploy"][1]["inputs"]["parameters"]["version"]["taskOutputParameter"]
    assert deploy_version == {"producerTask": inner["register"][0], "outputParameterKey": "Output"}
    register_comp = ir["components"][inner["register"][1]["componentRef"]["name"]]
    assert register_comp["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "STRING"
    # side effects are never served from the cache
    assert t["gate"]["cachingOptions"] == {} and t["train anchor"]["cachingOptions"] == {"enableCache": True}
    assert all(task["cachingOptions"] == {} for _, task in inner.values())
    # the pipeline reports the gate decision
    assert ir["root"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"


def test_every_step_runs_the_installed_cli_in_the_image_parameter(tmp_path) -> None:
    ir, _ = compile_ir(tmp_path, "pipeline.image=registry.example/dynamicid:1.2")
    inputs = ir["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {"image", "settings", "deploy_args"}
    assert inputs["image"]["defaultValue"] == "registry.example/dynamicid:1.2"
    assert inputs["deploy_args"]["defaultValue"] == ["--wait"]
    for name, ex in ir["deploymentSpec"]["executors"].items():
        container = ex["container"]
        assert container["image"] == IMAGE_PLACEHOLDER, name
        command = " ".join(container["command"])
        assert "kfp.dsl.executor_main" in command and "pip install" not in command, name
    # the settings default carries exactly the resolved params
    expected = load_params(None, ["pipeline.image=registry.example/dynamicid:1.2"])
    assert params_from_dict(parse_overrides(inputs["settings"]["defaultValue"])) == expected


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3), negative=st.text(max_size=40),
       lr=st.floats(min_value=1e-9, max_value=1.0, allow_nan=False))
def test_settings_round_trip_any_text_and_numbers(prompts, negative, lr) -> None:
    """What a pod rebuilds from the `-S` settings is exactly the params they were made from."""
    from components.deploy.settings import params_settings

    tree = load_params(None, []).model_dump(mode="json")
    tree["evaluate"].update(prompts=prompts, negative_prompt=negative)
    tree["train"]["anchor"]["lr"] = lr
    params = params_from_dict(tree)
    assert params_from_dict(parse_overrides(params_settings(params))) == params


def test_component_bodies_only_call_the_cli() -> None:
    """No logic in components: each body is imports from pipelines.steps plus one call."""
    from pipelines import components as c

    comps = [c.synth, c.prepare, c.prepare_source, c.train, c.train_from, c.evaluate, c.gate, c.register, c.deploy]
    for comp in comps:
        func = ast.parse(textwrap.dedent(inspect.getsource(comp.python_func))).body[0]
        body = [n for n in func.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        imports, rest = body[:-1], body[-1]
        assert all(isinstance(n, ast.ImportFrom) and n.module == "pipelines.steps" for n in imports), comp.name
        call = rest.value
        assert isinstance(rest, (ast.Expr, ast.Return)) and isinstance(call, ast.Call), comp.name
        assert call.func.id in {"run", "run_for_value", "decision"}, comp.name
        assert not any(isinstance(n, (ast.If, ast.For, ast.While, ast.Try, ast.IfExp)) for n in ast.walk(func))


def test_sd15_profile_reads_its_data_and_skips_the_tiny_base(tmp_path) -> None:
    ir, _ = compile_ir(tmp_path, "model.profile=sd15")
    named = by_display_name(ir)
    assert set(named) == {"prepare", "train anchor", "train reconfigure", "evaluate", "gate", "gate-passed"}
    prepare = ir["components"][named["prepare"][1]["componentRef"]["name"]]
    assert "artifacts" not in prepare.get("inputDefinitions", {})  # data.raw from params (s3://...)
    assert "upstream" not in named["train anchor"][1]["inputs"].get("artifacts", {})
    assert artefact_source(named["train reconfigure"][1], "upstream") == (named["train anchor"][0], "model")


# --- pod resources from params --------------------------------------------------------------------


def test_single_node_gpu_training_runs_in_the_step_pod(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    ir, k8s = compile_ir(
        tmp_path, "pipeline.gpus_per_node=4", "pipeline.node_selector={cloud.google.com/gke-accelerator: a100}",
        "pipeline.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
        "pipeline.train_cpu='12'", "pipeline.train_memory=64Gi", "pipeline.s3_secret=object-store",
    )
    text = yaml.safe_dump([ir, k8s])
    assert SENTINEL not in text
    named = by_display_name(ir)
    for stage in ("train base", "train anchor", "train reconfigure"):
        key, task = named[stage]
        res = executor(ir, task)["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "4"
        assert res["cpuRequest"] == 12 and res["memoryLimit"] == pytest.approx(68.719476736)
        platform = k8s[ir["components"][task["componentRef"]["name"]]["executorLabel"]]
        assert platform["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "a100"}}
        assert platform["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert "pvcMount" not in platform  # trains in its own pod: nothing to stage
        assert platform["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                               "sizeLimit": "16Gi"}]
        assert task["inputs"]["parameters"]["nodes"]["runtimeValue"]["constant"] == 1
        assert task["inputs"]["parameters"]["gpus_per_node"]["runtimeValue"]["constant"] == 4
    # steps without GPUs are not pinned to GPU nodes
    for name in ("prepare", "evaluate", "gate"):
        _, task = named[name]
        assert "resources" not in executor(ir, task)["container"] or \
            "accelerator" not in executor(ir, task)["container"]["resources"]
        assert "nodeSelector" not in k8s[ir["components"][task["componentRef"]["name"]]["executorLabel"]]
    # every step: credentials only as secret references, the tracking server as plain env
    for label, platform in k8s.items():
        secrets = platform["secretAsEnv"]
        assert {s["secretName"] for s in secrets} == {"object-store"}, label
        keys = {k["envVar"]: s["optional"] for s in secrets for k in s["keyToEnv"]}
        assert keys == {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False,
                        "AWS_ENDPOINT_URL": True, "AWS_DEFAULT_REGION": True}, label
    for ex in ir["deploymentSpec"]["executors"].values():
        assert ex["container"]["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://dynamicid-mlflow:5000"}]


def test_multi_node_training_drives_a_pytorchjob_through_the_shared_volume(tmp_path) -> None:
    ir, k8s = compile_ir(tmp_path, "pipeline.nodes=4", "pipeline.gpus_per_node=8", "pipeline.evaluate_gpus=1",
                         "pipeline.node_selector={pool: gpu}", "pipeline.pvc=rwx", "pipeline.shared_dir=/shared")
    named = by_display_name(ir)
    for stage in ("train base", "train anchor", "train reconfigure"):
        _, task = named[stage]
        assert "accelerator" not in executor(ir, task)["container"].get("resources", {})  # the job's pods have them
        params = task["inputs"]["parameters"]
        assert params["nodes"]["runtimeValue"]["constant"] == 4
        assert params["gpus_per_node"]["runtimeValue"]["constant"] == 8
        assert params["image"] == {"componentInputParameter": "image"}  # the job runs the same image
        platform = k8s[ir["components"][task["componentRef"]["name"]]["executorLabel"]]
        assert platform["pvcMount"][0]["mountPath"] == "/shared" and platform["pvcMount"][0]["constant"] == "rwx"
        assert int(platform["activeDeadlineSeconds"]) == load_params(None, []).pipeline.job_timeout_s
        assert "nodeSelector" not in platform
    _, evaluate = named["evaluate"]
    assert executor(ir, evaluate)["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert k8s[ir["components"][evaluate["componentRef"]["name"]]["executorLabel"]]["nodeSelector"] == \
        {"labels": {"pool": "gpu"}}


def test_multi_node_with_local_launch_is_refused(tmp_path, capsys) -> None:
    argv = ["-S", "pipeline.nodes=2", "-S", "pipeline.launch=local", "pipeline", "compile",
            "--output", str(tmp_path / "x.yaml")]
    assert main(argv) == 2
    assert "pipeline.launch" in capsys.readouterr().err


# --- what the component bodies call ---------------------------------------------------------------


def test_steps_turn_exit_codes_and_result_files_into_task_results(tmp_path) -> None:
    from pipelines import steps

    with pytest.raises(steps.StepError, match="launch --stage anchor --nodes 2 --local.*status 2"):
        steps.run([], "launch", "--stage", "anchor", "--nodes", "2", "--local")
    with pytest.raises(steps.StepError, match="status 2"):  # argparse refuses a flag
        steps.run([], "pipeline", "compile", "--no-such-flag")
    # a subcommand that writes its result to a named file: the text comes back
    text = steps.run_for_value(["pipeline={image: reg.example/x:1}"], "pipeline", "compile", flag="--output",
                               filename="ir.yaml")
    ir = next(yaml.safe_load_all(text))
    assert ir["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "reg.example/x:1"
    with pytest.raises(steps.StepError, match="expected true or false"):
        steps.decision([], "pipeline", "compile", flag="--output", filename="ir.yaml")


# --- submit and status against a KFP API server ---------------------------------------------------


class FakeKfp:
    """The v2beta1 endpoints kfp.Client uses to start and read a run."""

    def __init__(self) -> None:
        self.experiments: dict[str, Obj] = {}
        self.runs: dict[str, Obj] = {}
        self.auth: set[str | None] = set()
        self.run_states: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, code: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                fake.auth.add(self.headers.get("Authorization"))
                path = urlparse(self.path).path
                if path == "/apis/v2beta1/healthz":
                    return self._reply(200, {"multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    return self._reply(200, {"experiments": list(fake.experiments.values()),
                                             "total_size": len(fake.experiments)})
                if path.startswith("/apis/v2beta1/runs/"):
                    run = fake.runs.get(path.rsplit("/", 1)[1])
                    if run is None:
                        return self._reply(404, {"error": "run not found", "code": 5, "message": "run not found"})
                    if fake.run_states:
                        run["state"] = fake.run_states.pop(0)
                    return self._reply(200, run)
                self._reply(404, {"message": f"no route {path}"})

            def do_POST(self) -> None:
                fake.auth.add(self.headers.get("Authorization"))
                path = urlparse(self.path).path
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if path == "/apis/v2beta1/experiments":
                    exp = {**body, "experiment_id": f"exp-{len(fake.experiments) + 1}"}
                    fake.experiments[exp["experiment_id"]] = exp
                    return self._reply(200, exp)
                if path == "/apis/v2beta1/runs":
                    run = {**body, "run_id": f"run-{len(fake.runs) + 1}", "state": "PENDING",
                           "run_details": {"task_details": [
                               {"display_name": "prepare", "state": "SUCCEEDED"},
                               {"display_name": "train anchor", "state": "RUNNING"}]}}
                    fake.runs[run["run_id"]] = run
                    return self._reply(200, run)
                self._reply(404, {"message": f"no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kfp_server(tmp_path, monkeypatch):
    fake = FakeKfp()
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp's context file, and no real kube config
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    yield fake
    fake.close()


def test_submit_compiles_and_starts_a_run(tmp_path, capsys, monkeypatch, kfp_server) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "kfp-token-1")
    argv = ["-S", "pipeline.gpus_per_node=2", "-S", "pipeline.pipeline_root=s3://bucket/kfp",
            "-S", "pipeline.service_account=dynamicid-pipeline",
            "pipeline", "submit", "--host", kfp_server.url, "--experiment", "exp-a", "--run-name", "first",
            "--param", "image=registry.example/dynamicid:7", "--param", "deploy_args=[--canary-percent, '5']"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted run run-1" in out
    run = kfp_server.runs["run-1"]
    assert run["display_name"] == "first" and run["service_account"] == "dynamicid-pipeline"
    assert kfp_server.experiments[run["experiment_id"]]["display_name"] == "exp-a"
    config = run["runtime_config"]
    assert config["parameters"] == {"image": "registry.example/dynamicid:7",
                                    "deploy_args": ["--canary-percent", "5"]}
    assert config["pipeline_root"] == "s3://bucket/kfp"
    spec = run["pipeline_spec"]["pipeline_spec"]  # with the kfp-kubernetes platform spec beside it
    assert spec["pipelineInfo"]["name"] == "dynamicid" and "gate" in spec["root"]["dag"]["tasks"]
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train_label = spec["components"][spec["root"]["dag"]["tasks"]["train"]["componentRef"]["name"]]["executorLabel"]
    assert spec["deploymentSpec"]["executors"][train_label]["container"]["resources"]["accelerator"]["count"] == "2"
    assert platform[train_label]["secretAsEnv"][0]["secretName"] == "dynamicid-s3"
    settings = spec["root"]["inputDefinitions"]["parameters"]["settings"]["defaultValue"]
    assert params_from_dict(parse_overrides(settings)).pipeline.gpus_per_node == 2
    assert kfp_server.auth == {"Bearer kfp-token-1"}

    # the same experiment is reused; an unknown pipeline parameter is refused before any request
    assert main(["pipeline", "submit", "--host", kfp_server.url, "--experiment", "exp-a"]) == 0
    assert len(kfp_server.experiments) == 1 and len(kfp_server.runs) == 2
    assert not kfp_server.runs["run-2"].get("service_account")  # default: KFP's runner account
    assert main(["pipeline", "submit", "--host", kfp_server.url, "--param", "nodes=3"]) == 2
    assert "allowed: deploy_args, image, settings" in capsys.readouterr().err


def test_submit_uses_the_kube_config_token(tmp_path, capsys, monkeypatch, kfp_server) -> None:
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://k8s.invalid"}}],
        "users": [{"name": "u", "user": {"token": "kube-token-9"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert main(["pipeline", "submit", "--host", kfp_server.url]) == 0
    assert kfp_server.auth == {"Bearer kube-token-9"}


def test_status_reports_the_run_and_its_tasks(capsys, monkeypatch, kfp_server) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "t")
    assert main(["pipeline", "submit", "--host", kfp_server.url]) == 0
    capsys.readouterr()
    assert main(["pipeline", "status", "run-1", "--host", kfp_server.url]) == 0
    out = capsys.readouterr().out
    assert "run run-1" in out and ": PENDING" in out and "train anchor: RUNNING" in out
    kfp_server.run_states = ["RUNNING", "FAILED"]
    assert main(["-S", "pipeline.poll_s=0.01", "pipeline", "status", "run-1", "--host", kfp_server.url,
                 "--wait"]) == 1
    assert ": FAILED" in capsys.readouterr().out
    assert main(["pipeline", "status", "run-404", "--host", kfp_server.url]) == 2


# --- the whole pipeline on this machine -----------------------------------------------------------


@pytest.mark.slow
def test_run_local_trains_gates_registers_and_serves(tmp_path, cache_dir, single_face_photo, capsys,
                                                     monkeypatch) -> None:
    """`dynamicid pipeline run-local` ends like `dvc repro`: a registered model version, whose
    artefacts (what deploy points KServe at) load and generate an image."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from PIL import Image

    from model.checkpoint import find_checkpoint

    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = {
        "storage.cache_dir": str(cache_dir), "mlflow.tracking_uri": tracking, "mlflow.registered_model": "e2e",
        "synth.identities": 8, "synth.images_per_identity": 4, "synth.size": 64, "synth.workers": 1,
        "prepare.workers": 1, "prepare.test_fraction": 0.25,
        "train.base.steps": 2, "train.base.vae_steps": 1, "train.anchor.steps": 2, "train.reconfigure.steps": 2,
        "train.base.warmup_steps": 1, "train.anchor.warmup_steps": 1, "train.reconfigure.warmup_steps": 1,
        "train.base.micro_batch": 2, "train.anchor.micro_batch": 2, "train.reconfigure.micro_batch": 2,
        "train.check_images": 0, "train.sample_every": 1000, "train.checkpoint_every": 1000,
        "evaluate.num_identities": 2, "evaluate.steps": 2, "evaluate.prompts": "[a photo of a person]",
        "evaluate.multi_id": "[2]", "evaluate.multi_groups": 1, "evaluate.edits": "[the expression is happy]",
        "gate.promote": "true",
        # a plumbing gate that a two-step model meets (the shipped gate rejects it: tests/test_gate_rejects.py)
        "gate.learning_checks": "false", "gate.minimums": '{"single.people": 1}',
    }
    argv = [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]
    code = main(argv + ["pipeline", "run-local", "--root", str(tmp_path / "kfp")])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "gate passed: registered and deployed (deploy was a dry run)" in out

    client = MlflowClient(tracking_uri=tracking)
    versions = client.search_model_versions("name='e2e'")
    assert len(versions) == 1
    version = versions[0].version
    assert client.get_model_version_by_alias("e2e", "champion").version == version
    # the deploy step (dry run) printed the InferenceService for exactly this version
    assert f"dynamicid.io/model-version: '{version}'" in out
    metrics = list((tmp_path / "kfp").glob("dynamicid-*/evaluate/metrics/metrics.json"))
    assert len(metrics) == 1 and json.loads(metrics[0].read_text())

    # what KServe's storage initializer would put in /mnt/models, served by the same loading code
    location = client.get_model_version_download_uri("e2e", version)
    mnt = Path(download_artifacts(artifact_uri=location, dst_path=str(tmp_path / "mnt-models")))
    png = tmp_path / "served.png"
    assert main(["-S", f"storage.cache_dir={cache_dir}", "generate", "--checkpoint", str(find_checkpoint(mnt)),
                 "--prompt", "a photo of a person", "--id-image", str(single_face_photo), "--steps", "2",
                 "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.size[0] > 0 and image.getextrema() != ((0, 0), (0, 0), (0, 0))

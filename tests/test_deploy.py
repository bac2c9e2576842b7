"""`dynamicid deploy`: registry lookup (a real local MLflow registry), the InferenceService it
builds from k8s/base (validated strictly), and create/update/wait against the fake API server
of tests/test_launch.py (real HTTP through the official client)."""

from __future__ import annotations

import copy

import pytest
import yaml

import k8s_schema as ks
from components.cli import main
from test_launch import TOKEN, decode_settings, kube  # noqa: F401  (kube is a fixture)

MODEL = "dynamicid-test"
DESTINATION = "s3://bucket-x/mlflow"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A local sqlite registry with three versions: in S3, proxied by the server, on local disk."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    client.create_registered_model(MODEL)
    local = root / "local-model"
    local.mkdir()
    versions = {
        "s3": client.create_model_version(MODEL, "s3://bucket-x/models/exported-1").version,
        "proxied": client.create_model_version(MODEL, "mlflow-artifacts:/7/abc123/artifacts/model").version,
        "local": client.create_model_version(MODEL, str(local)).version,
    }
    client.set_registered_model_alias(MODEL, "champion", versions["proxied"])
    return {k: str(v) for k, v in versions.items()} | {"uri": f"sqlite:///{root / 'mlflow.db'}"}


def deploy_args(registry: dict[str, str], *extra: str) -> list[str]:
    sets = {
        "mlflow.tracking_uri": registry["uri"],
        "mlflow.registered_model": MODEL,
        "deploy.artifacts_destination": DESTINATION,
        "deploy.namespace": "serving-ns",
        "deploy.image": "registry.example/predictor:3",
        "deploy.gpus": "2",
        "deploy.min_replicas": "2",
        "deploy.max_replicas": "6",
        "deploy.node_selector": "{gpu: a100}",
        "deploy.tolerations": "[{key: gpu, operator: Equal, value: 'yes', effect: NoSchedule}]",
        "pipeline.poll_s": "0.02",
        "serve.max_queue": "5",
    }
    out = []
    for k, v in sets.items():
        out += ["-S", f"{k}={v}"]
    return out + ["deploy", *extra]


def dry_run(capsys, registry, *extra: str) -> dict:
    assert main(deploy_args(registry, "--dry-run", *extra)) == 0
    return yaml.safe_load(capsys.readouterr().out)


def env_of(isvc: dict) -> dict[str, dict]:
    return {e["name"]: e for e in isvc["spec"]["predictor"]["containers"][0]["env"]}


def test_dry_run_prints_the_service_for_the_alias(registry, capsys) -> None:
    isvc = dry_run(capsys, registry)
    ks.validate(isvc, ks.MIN_KUBE_VERSION)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert isvc["metadata"]["namespace"] == "serving-ns" and isvc["metadata"]["name"] == "dynamicid"
    assert isvc["metadata"]["annotations"]["dynamicid.io/model-version"] == registry["proxied"]
    # a proxied mlflow-artifacts:/ location is the server's artefact destination + the same path
    assert env_of(isvc)["STORAGE_URI"]["value"] == f"{DESTINATION}/7/abc123/artifacts/model"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 6)
    assert predictor["containerConcurrency"] == 5  # serve.max_queue
    assert "canaryTrafficPercent" not in predictor
    assert predictor["nodeSelector"] == {"gpu": "a100"}
    assert predictor["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}]
    c = predictor["containers"][0]
    assert c["name"] == "kserve-container" and c["image"] == "registry.example/predictor:3"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    # the server reads the resolved params from its args and listens where the kubelet probes it
    assert c["args"][-3:] == ["serve", "--model-uri", "/mnt/models"]
    sent = decode_settings(c["args"])
    assert sent.mlflow.registered_model == MODEL
    assert sent.serve.host == "0.0.0.0" and sent.serve.http_port == c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["port"] == sent.serve.http_port
    assert "DYNAMICID_PARAMS" not in env_of(isvc)
    assert all(v["name"] != "params" for v in predictor["volumes"])


def test_version_and_canary(registry, capsys) -> None:
    isvc = dry_run(capsys, registry, "--version", registry["s3"], "--canary-percent", "15")
    ks.validate(isvc, ks.MIN_KUBE_VERSION)
    assert env_of(isvc)["STORAGE_URI"]["value"] == "s3://bucket-x/models/exported-1"
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 15
    assert main(deploy_args(registry, "--dry-run", "--canary-percent", "101")) == 2


def test_unknown_version_or_alias_is_a_clear_error(registry, capsys) -> None:
    assert main(deploy_args(registry, "--dry-run", "--alias", "nobody")) == 2
    err = capsys.readouterr().err
    assert MODEL in err and "alias 'nobody'" in err
    assert main(deploy_args(registry, "--dry-run", "--version", "99")) == 2
    assert "version 99" in capsys.readouterr().err


def test_a_location_the_cluster_cannot_read(registry, capsys, kube) -> None:
    isvc = dry_run(capsys, registry, "--version", registry["local"])  # printed, with a warning
    assert env_of(isvc)["STORAGE_URI"]["value"].endswith("local-model")
    assert main(deploy_args(registry, "--version", registry["local"])) == 2
    assert "cannot download" in capsys.readouterr().err
    assert kube.requests == []  # refused before touching the cluster


def test_proxied_location_needs_the_destination(registry, capsys) -> None:
    argv = deploy_args(registry, "--dry-run")
    argv[argv.index(f"deploy.artifacts_destination={DESTINATION}")] = "deploy.artifacts_destination=null"
    assert main(argv) == 2
    assert "artifacts_destination" in capsys.readouterr().err


def test_create_then_update_in_place_then_wait_ready(registry, capsys, kube) -> None:
    assert main(deploy_args(registry, "--version", registry["s3"])) == 0
    assert "created InferenceService serving-ns/dynamicid" in capsys.readouterr().out
    stored = kube.get("serving.kserve.io", "serving-ns", "inferenceservices", "dynamicid")
    assert env_of(stored)["STORAGE_URI"]["value"] == "s3://bucket-x/models/exported-1"
    assert kube.auth == {f"Bearer {TOKEN}"}
    # someone annotates it by hand; the next deploy keeps that and moves only what deploy owns
    stored["metadata"]["annotations"]["team"] = "vision"
    first_uid = stored["metadata"]["uid"]

    def kserve(isvc: dict) -> None:
        """KServe: Ready for the current generation after one unready read."""
        seen = isvc.setdefault("_reads", 0)
        isvc["_reads"] = seen + 1
        ready = "True" if seen >= 1 else "False"
        isvc["status"] = {"observedGeneration": isvc["metadata"]["generation"], "url": "http://dynamicid.example",
                          "conditions": [{"type": "Ready", "status": ready, "reason": "" if seen else "RevisionMissing"}]}

    kube.on_get["inferenceservices"] = kserve
    assert main(deploy_args(registry, "--canary-percent", "10", "--wait")) == 0
    out = capsys.readouterr().out
    assert f"model version {registry['s3']} -> {registry['proxied']}" in out
    assert "Ready=False RevisionMissing" in out and "is Ready at http://dynamicid.example" in out
    updated = kube.get("serving.kserve.io", "serving-ns", "inferenceservices", "dynamicid")
    assert updated["metadata"]["uid"] == first_uid and updated["metadata"]["generation"] == 2
    assert updated["metadata"]["annotations"]["team"] == "vision"
    assert updated["metadata"]["annotations"]["dynamicid.io/model-version"] == registry["proxied"]
    assert updated["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert env_of(updated)["STORAGE_URI"]["value"] == f"{DESTINATION}/7/abc123/artifacts/model"
    body = copy.deepcopy(updated)
    for key in ("status", "_reads"):
        body.pop(key, None)
    for key in ("uid", "resourceVersion", "generation"):
        body["metadata"].pop(key)
    ks.validate(body, ks.MIN_KUBE_VERSION)

    # promotion: the same version again without a canary takes all traffic
    assert main(deploy_args(registry, "--version", registry["proxied"])) == 0
    promoted = kube.get("serving.kserve.io", "serving-ns", "inferenceservices", "dynamicid")
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]


def test_not_ready_in_time(registry, capsys, kube) -> None:
    assert main(deploy_args(registry, "--version", registry["s3"], "--wait", "--timeout", "0.2")) == 2
    assert "not Ready after" in capsys.readouterr().err

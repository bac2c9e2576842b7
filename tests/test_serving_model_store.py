"""Where `dynamicid serve` gets its model: an MLflow registry URI, a local (or KServe-mounted)
directory; and the CLI's answers before any server starts."""

from __future__ import annotations

import json

import pytest

from components.cli import main
from components.core.config import params_from_dict
from model.checkpoint import read_manifest
from serving.model_store import ModelSourceError, resolve_model_dir


@pytest.fixture(scope="module")
def ckpt(tiny_params, tmp_path_factory):
    from model.loading import init_checkpoint

    return init_checkpoint(tiny_params.model, tiny_params.face, tmp_path_factory.mktemp("store") / "ckpt",
                           tiny_params.storage.cache_dir, seed=2)


def test_registry_uri_by_alias_and_version(ckpt, tmp_path):
    """A registered model whose checkpoint sits under artifacts/ (as the register stage keeps it)."""
    from mlflow import MlflowClient
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(ckpt), artifact_path="model/artifacts/checkpoint")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("dynamicid")
    mv = client.create_model_version("dynamicid", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("dynamicid", "champion", mv.version)
    assert mlflow.get_tracking_uri() != uri  # the server reads params, not global mlflow state

    params = params_from_dict({"mlflow": {"tracking_uri": uri}, "storage": {"cache_dir": str(tmp_path / "cache")}})
    by_alias = resolve_model_dir(params, "models:/dynamicid@champion")
    assert tmp_path / "cache" / "registry" / "dynamicid" / "1" in by_alias.parents
    assert by_alias.parts[-2:] == ("artifacts", "checkpoint")
    assert read_manifest(by_alias) == read_manifest(ckpt)
    assert (by_alias / "face_encoder.safetensors").read_bytes() == (ckpt / "face_encoder.safetensors").read_bytes()
    assert resolve_model_dir(params, "models:/dynamicid/1") == by_alias  # cached per version
    for bad, text in [("models:/dynamicid@canary", "alias canary not found"),
                      ("models:/other/3", "name=other, version=3"), ("models:/dynamicid", "models:/<name>@<alias>")]:
        with pytest.raises(ModelSourceError, match=text):
            resolve_model_dir(params, bad)


def test_local_and_mounted_directories(ckpt, tmp_path, tiny_params):
    mounted = tmp_path / "mnt" / "models"  # what KServe's storage initializer leaves: the export, one level down
    mounted.mkdir(parents=True)
    (mounted / "model").symlink_to(ckpt, target_is_directory=True)
    assert resolve_model_dir(tiny_params, str(mounted)) == mounted / "model"
    assert resolve_model_dir(tiny_params, str(ckpt)) == ckpt
    (tmp_path / "empty").mkdir()
    for bad, text in [(str(tmp_path / "nope"), "no such directory"), ("gs://bucket/model", "unsupported scheme"),
                      ("file:///etc", "unsupported scheme"), (str(tmp_path / "empty"), "no DynamicID checkpoint")]:
        with pytest.raises(ModelSourceError, match=text):
            resolve_model_dir(tiny_params, bad)


def test_serve_cli_fails_fast_on_a_bad_model_uri(tmp_path, capsys):
    rc = main(["serve", "--model-uri", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such directory" in err and "dynamicid init" in err


def test_serve_cli_prints_the_schema_of_the_configured_limits(capsys):
    rc = main(["-S", "serve.max_steps=40", "-S", "model.max_ids=3", "serve", "--schema"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    inst = doc["request"]["$defs"]["Instance"]["properties"]
    assert inst["num_inference_steps"]["anyOf"][0]["maximum"] == 40 and inst["identities"]["maxItems"] == 3
    assert doc["response"]["properties"]["predictions"]["items"]["$ref"].endswith("Prediction")


def test_serve_params_are_validated_with_key_paths():
    from components.core.config import ParamsError

    with pytest.raises(ParamsError, match="serve"):
        params_from_dict({"serve": {"min_side": 512, "max_side": 256}})
    with pytest.raises(ParamsError, match="default_steps 30 outside 1..max_steps 12"):
        params_from_dict({"serve": {"max_steps": 12}})
    with pytest.raises(ParamsError, match="serve.max_queue"):
        params_from_dict({"serve": {"max_queue": 0}})
    with pytest.raises(ParamsError, match="serve.image_formats"):
        params_from_dict({"serve": {"image_formats": ["TIFF"]}})

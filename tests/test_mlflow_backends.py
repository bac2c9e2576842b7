"""evaluate + register against a real ``mlflow server`` on 127.0.0.1, once with a sqlite backend store and
once with a PostgreSQL one, both with artefacts on an S3-compatible server (moto): the same commands must
give the same registry state, lineage tags and a model that loads by alias and generates."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest

from components.cli import main
from tests.services import S3_ENV, mlflow_server, moto_s3, postgres, write_face_dataset


@pytest.fixture(scope="module")
def env(tiny_params, tmp_path_factory, group_photo, single_face_photo):
    from model.loading import init_checkpoint

    root = tmp_path_factory.mktemp("backends")
    prepared = write_face_dataset(root / "prepared", group_photo, single_face_photo, test_identities=2)
    ckpt = init_checkpoint(tiny_params.model, tiny_params.face, root / "ckpt", tiny_params.storage.cache_dir, seed=4)
    sets = {"storage.cache_dir": str(tiny_params.storage.cache_dir), "data.prepared": str(prepared),
            "evaluate.steps": 1, "evaluate.num_identities": 2, "evaluate.prompts": ["a photo of a person"],
            "evaluate.multi_id": [], "evaluate.edits": [], "evaluate.motion_reader": "landmarks",
            "evaluate.landmark_edits": False,  # test_evaluate covers the cases; here: the stores
            # a plumbing gate an untrained checkpoint meets: here the stores are under test, not the model
            "gate.learning_checks": False, "gate.minimums": {"single.people": 1.0}}
    return {"root": root, "ckpt": ckpt, "sets": sets}


def _cli(sets: dict, *args: str) -> int:
    return main([x for k, v in sets.items() for x in ("-S", f"{k}={json.dumps(v)}")] + list(args))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_evaluate_and_register_on_a_tracking_server(backend, env, tmp_path, monkeypatch, single_face_photo):
    import mlflow
    from mlflow import MlflowClient

    from components.core.shards import decode_png

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(moto_s3())
        pg = stack.enter_context(postgres()) if backend == "postgresql" else None
        store = pg.uri if pg is not None else f"sqlite:///{tmp_path}/server.db"
        # Only the server talks to S3; clients go through its artefact proxy (mlflow-artifacts:/).
        server = stack.enter_context(mlflow_server(store, f"s3://{s3.bucket}/mlflow", tmp_path,
                                                   env={"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, **S3_ENV}))
        sets = {**env["sets"], "mlflow.tracking_uri": server.uri, "gate.output": str(tmp_path / "gate")}
        out = tmp_path / "eval"
        assert _cli(sets, "evaluate", "--checkpoint", str(env["ckpt"]), "--output", str(out)) == 0
        assert _cli(sets, "register", "--metrics", str(out / "metrics.json"), "--promote") == 0

        client = MlflowClient(server.uri)
        report = json.loads((out / "report.json").read_text())
        champion = client.get_model_version_by_alias("dynamicid", "champion")
        assert champion.version == "1" and client.get_model_version_by_alias("dynamicid", "candidate").version == "1"
        for key in ("git_commit", "params_hash", "data_version", "eval_set_hash", "checkpoint_digest"):
            assert champion.tags[key] == report[key]
        assert champion.run_id == report["mlflow"]["run_id"]

        # the artefacts are in the S3 bucket: the evaluation outputs and the model's checkpoint
        keys = s3.keys("mlflow/")
        assert any(k.endswith("/metrics.json") for k in keys) and any(k.endswith("/grids/single-000.png") for k in keys)
        ckpt_keys = [k for k in keys if f"/artifacts/{env['ckpt'].name}/" in k]
        assert any(k.endswith("/manifest.json") for k in ckpt_keys)
        assert any(k.endswith("/face_encoder.safetensors") for k in ckpt_keys)

        # a second registration without --promote moves the candidate alias only
        assert _cli(sets, "register", "--metrics", str(out / "metrics.json")) == 0
        assert client.get_model_version_by_alias("dynamicid", "candidate").version == "2"
        assert client.get_model_version_by_alias("dynamicid", "champion").version == "1"

        if pg is not None:  # the registry really lives in PostgreSQL
            assert pg.query("select name, version from model_versions order by version") == [
                ("dynamicid", 1), ("dynamicid", 2)]
            assert sorted(pg.query("select alias, version from registered_model_aliases")) == [
                ("candidate", 2), ("champion", 1)]

        mlflow.set_tracking_uri(server.uri)
        model = mlflow.pyfunc.load_model("models:/dynamicid@champion")
        b64 = base64.b64encode(single_face_photo.read_bytes()).decode()
        res = model.predict([{"prompt": "a photo of a person", "images": [b64], "steps": 1, "seed": 2}])
        assert decode_png(base64.b64decode(res["image"][0])).shape == (64, 64, 3)

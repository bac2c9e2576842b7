"""An imported release checkpoint is evaluated and registered like a model we trained (issue 18, docs/release.md).

Release-layout files at tiny-profile size (seeded random tensors, as in tests/test_release_import.py) go through
``dynamicid import-release --profile tiny``, then ``dynamicid evaluate`` on real faces (insightface's bundled
photos, a small evaluation set), then ``dynamicid register`` against a local sqlite MLflow store: the shipped gate
rejects the random weights naming the failed criteria, and a plumbing gate registers them, the version saying
where its weights came from (each release file's sha256, the compatibility mode).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from components.cli import main
from components.core.config import load_params
from tests.services import write_face_dataset
from tests.test_release_import import _release, _torch_bytes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("module_cwd")  # MLflow writes ./mlruns; params.yaml is not ours
SOURCES = {"saa": "SAA.bin", "imr": "IMR.bin", "keypoint_encoder": "key_point_encoder.bin"}


@pytest.fixture(scope="module")
def env(tiny_params, tmp_path_factory, group_photo, single_face_photo):
    """Release files, their import, a prepared data set of real faces and a small evaluation's settings."""
    from model.release.layout import ReleaseLayout

    root = tmp_path_factory.mktemp("release-evaluate")
    layout = ReleaseLayout.scaled("tiny", tiny_params.model.tiny, 128, "dlib")
    r = _release(layout, torch.float32, seed=11)
    files = root / "release" / "models"
    files.mkdir(parents=True)
    (files / "SAA.bin").write_bytes(_torch_bytes({"proj_module": r["proj_module"], "SAA_module": r["SAA_module"]}))
    (files / "IMR.bin").write_bytes(_torch_bytes(r["imr"]))
    (files / "key_point_encoder.bin").write_bytes(_torch_bytes(r["keypoint"]))
    prepared = write_face_dataset(root / "prepared", group_photo, single_face_photo, test_identities=3)
    evaluate = {"steps": 2, "num_identities": 2, "prompts": ["a photo of a person"], "seeds": [0],
                "multi_prompts": ["a photo of {count} people"], "multi_id": [2], "multi_groups": 1,
                "edits": ["the face is turned to the left"], "motion_reader": "landmarks",  # photos without labels
                "landmark_edits": False}
    sets = {"storage.cache_dir": str(tiny_params.storage.cache_dir), "data.prepared": str(prepared),
            "mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db", "gate.output": str(root / "gate"),
            **{f"evaluate.{k}": v for k, v in evaluate.items()}}
    env = {"root": root, "files": files, "sets": sets}
    ckpt = root / "imported"
    assert run_cli(env, "import-release", "--saa", str(files / "SAA.bin"), "--imr", str(files / "IMR.bin"),
                   "--out", str(ckpt), "--profile", "tiny") == 0
    return {**env, "ckpt": ckpt}


def run_cli(env, *args, **overrides) -> int:
    sets = {**env["sets"], **overrides}
    argv = [x for k, v in sets.items() for x in ("-S", f"{k}={json.dumps(v)}")]
    return main([*argv, *args])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluation(env):
    out = env["root"] / "eval"
    assert run_cli(env, "evaluate", "--checkpoint", str(env["ckpt"]), "--output", str(out)) == 0
    return out


def _versions(env, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(env["sets"]["mlflow.tracking_uri"]).search_model_versions(f"name='{name}'")


def test_evaluation_measures_the_imported_checkpoint_and_records_its_provenance(env, evaluation):
    from mlflow import MlflowClient

    from components.core.registry import checkpoint_digest
    from components.evaluate.metrics import flatten_metrics

    metrics = flatten_metrics(json.loads((evaluation / "metrics.json").read_text()))
    report = json.loads((evaluation / "report.json").read_text())
    # every metric the shipped gate reads is measured, or reported as not measured (random weights draw no
    # detectable face, so e.g. the multi-ID confusion has no matched face to be measured on)
    shipped = load_params(REPO / "params.yaml").gate
    gated = [k for k in (*shipped.minimums, *shipped.maximums, *shipped.interval_above)
             if not k.startswith("drive.")]  # landmark edits off here: one photo per person, no driving photo
    assert gated and "drive.cases" not in report["counts"]
    for key in gated:
        assert key in metrics or key in report["not_measured"], key
    for key in ("single.detection_rate", "single.id_lift", "single.id_lift_low", "single.id_lift_high",
                "single.clip_t", "edit.detection_rate", "multi2.missing_rate"):
        assert key in metrics, key
    assert metrics["single.people"] == metrics["multi2.people"] == 2.0
    assert report["counts"]["edit.cases"] == 2
    assert report["checkpoint_digest"] == checkpoint_digest(env["ckpt"]) and report["profile"] == "tiny"
    assert report["learning_checks"] == {}  # the release ships none: the shipped gate says "not run"
    prov = report["checkpoint_provenance"]
    assert prov["stage"] == "import-release" and prov["compat"] == "release"
    for part, name in SOURCES.items():
        src = prov["release"]["sources"][part]
        assert src["sha256"] == _sha256(env["files"] / name) and src["uri"] == str(env["files"] / name)
    run = MlflowClient(env["sets"]["mlflow.tracking_uri"]).get_run(report["mlflow"]["run_id"])
    assert run.data.tags["compat"] == "release" and run.data.tags["release.imr.sha256"] == _sha256(
        env["files"] / "IMR.bin")


def test_the_shipped_gate_rejects_the_random_release_weights(env, evaluation, capsys):
    shipped = load_params(REPO / "params.yaml").gate
    gate = {f"gate.{k}": v for k, v in shipped.model_dump(mode="json").items() if k != "output"}
    capsys.readouterr()
    rc = run_cli(env, "register", "--metrics", str(evaluation / "metrics.json"), **gate,
                 **{"mlflow.registered_model": "release_shipped"})
    err = capsys.readouterr().err
    assert rc == 1 and "nothing registered" in err
    rec = json.loads((env["root"] / "gate" / "registration.json").read_text())
    failed = {c["metric"]: c for c in rec["gate"]["checks"] if not c["passed"]}
    assert rec["registered"] is False and not rec["gate"]["passed"]
    assert rec["checkpoint_provenance"]["release"]["sources"]["saa"]["sha256"] == _sha256(env["files"] / "SAA.bin")
    for stage in ("anchor", "reconfigure"):  # the release ships no learning checks
        assert "not run" in failed[f"learning_checks.{stage}"]["note"]
        assert f"learning_checks.{stage} = not measured: not run" in err
    # random weights draw no detectable face: no detection, no identity lift, no measurable edit
    for metric in ("single.detection_rate", "edit.detection_rate", "multi2.missing_rate", "single.id_lift"):
        assert metric in failed and f"  - {metric} = " in err, metric
    lift = failed["single.id_lift"]
    assert (lift["low"], lift["high"]) == (0.0, 0.0) and "the interval includes 0: no effect shown" in err
    assert f"gate failed ({len(failed)} of {len(rec['gate']['checks'])} criteria)" in err
    assert _versions(env, "release_shipped") == []


def test_a_plumbing_gate_registers_it_with_the_release_provenance(env, evaluation, single_face_photo):
    """Registered, verified, tagged and described as release weights; the registered model loads by its URI and
    generates in the release compatibility mode."""
    import base64

    import mlflow

    from components.core.registry import checkpoint_digest, download_checkpoint

    plumbing = {"gate.learning_checks": False, "gate.minimums": {"single.people": 1.0}, "gate.maximums": {},
                "gate.interval_above": {}, "gate.promote": False, "mlflow.registered_model": "release_import"}
    vfile = env["root"] / "version.txt"
    assert run_cli(env, "register", "--metrics", str(evaluation / "metrics.json"), "--version-file", str(vfile),
                   **plumbing) == 0
    assert vfile.read_text() == "1"
    (mv,) = _versions(env, "release_import")
    tags = mv.tags
    assert tags["gate"] == "passed" and tags["verified"] == "true" and tags["train.stage"] == "import-release"
    assert tags["compat"] == "release" and tags["release.weights"] == "meteorite2023/DynamicID"
    for part, name in SOURCES.items():
        assert tags[f"release.{part}.sha256"] == _sha256(env["files"] / name), part
        assert tags[f"release.{part}.uri"] == str(env["files"] / name), part
    assert mv.description.startswith("Research release weights (meteorite2023/DynamicID)")
    assert "compatibility mode release; not trained here" in mv.description
    for name in SOURCES.values():
        assert f"{name} sha256 {_sha256(env['files'] / name)}" in mv.description, name
    rec = json.loads((env["root"] / "gate" / "registration.json").read_text())
    assert rec["registered"] is True and rec["tags"]["release.saa.sha256"] == tags["release.saa.sha256"]
    got = download_checkpoint("models:/release_import/1", env["root"] / "download")
    assert checkpoint_digest(got) == checkpoint_digest(env["ckpt"])
    mlflow.set_tracking_uri(env["sets"]["mlflow.tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/release_import@candidate")
    assert model.metadata.metadata["checkpoint_digest"] == checkpoint_digest(env["ckpt"])
    assert model.unwrap_python_model().pipe.dynamicid.compat == "release"
    b64 = base64.b64encode(single_face_photo.read_bytes()).decode()
    out = model.predict([{"prompt": "a photo of a person", "images": [b64], "steps": 1, "seed": 3}])
    assert int(out["seed"][0]) == 3 and len(json.loads(out["identities"][0])) == 1


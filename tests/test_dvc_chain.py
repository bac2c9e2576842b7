"""The whole chain as `dvc repro` on a fresh copy of the repository (tiny profile, reduced
step counts): it ends with the shipped gate's verdict on a barely trained model (rejected, each
failed criterion named, nothing registered); a gate change then reruns register only, and with a
plumbing gate the chain's model is registered as a champion that generates an image; an evaluation
param change reruns exactly the stages that read it."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Reduced settings: same stages and code, fewer images and steps.
SMALL = {
    "synth": {"identities": 8, "images_per_identity": 4, "size": 64, "workers": 1},
    "prepare": {"workers": 1, "test_fraction": 0.25},
    "train": {
        "check_images": 0, "sample_every": 1000, "checkpoint_every": 1000,
        # A smaller test bed than the stored base was trained on: its data hash differs, so the base is trained.
        "base": {"steps": 2, "vae_steps": 1, "warmup_steps": 1, "micro_batch": 2, "pretrained": None},
        "anchor": {"steps": 2, "warmup_steps": 1, "micro_batch": 2},
        "reconfigure": {"steps": 2, "warmup_steps": 1, "micro_batch": 2},
    },
    "evaluate": {"num_identities": 2, "steps": 2, "prompts": ["a photo of a person"], "multi_id": [2],
                 "multi_groups": 1, "edits": ["the expression is happy"]},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fresh_copy(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as a clone of this tree would have them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


@pytest.mark.slow
def test_dvc_repro_runs_the_chain_gates_and_registers_a_serving_model(tmp_path, cache_dir, single_face_photo):
    repo = tmp_path / "repo"
    repo.mkdir()
    _fresh_copy(repo)
    params = _merge(yaml.safe_load((repo / "params.yaml").read_text()), SMALL)
    params["storage"]["cache_dir"] = str(cache_dir)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1"}

    run = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("synth", "prepare", "base", "anchor", "reconfigure", "evaluate", "register"):
        assert f"Running stage '{stage}'" in run.stdout, stage
    assert (repo / "runs/evaluate/metrics.json").exists()
    assert list((repo / "runs/evaluate/grids").glob("*.png"))
    assert (repo / "dvc.lock").exists()
    # Two training steps and no learning checks: the shipped gate rejects the model and says why.
    registration = json.loads((repo / "runs/register/registration.json").read_text())
    failed = {c["metric"] for c in registration["gate"]["checks"] if not c["passed"]}
    assert registration["registered"] is False and {"learning_checks.anchor", "single.id_lift"} <= failed
    assert (repo / "runs/register/decision.txt").read_text() == "false"
    assert (repo / "runs/register/version.txt").read_text() == "none"
    text = subprocess.run(["dynamicid", "summary"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert "nothing registered: the gate rejected the model" in text.stdout
    assert "- learning_checks.anchor = not measured: not run" in text.stdout

    # A gate change reruns register only; a plumbing gate (people were measured) registers the model.
    params["gate"] = {**params["gate"], "learning_checks": False, "minimums": {"single.people": 1.0},
                      "maximums": {}, "interval_above": {}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert set(json.loads(status.stdout or "{}")) == {"register"}
    run = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Running stage 'register'" in run.stdout and "Running stage 'evaluate'" not in run.stdout
    assert (repo / "runs/register/version.txt").read_text().strip().isdigit()

    # `make run` ends with the summary of exactly these outputs.
    summary = subprocess.run(["dynamicid", "summary", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=120)
    assert summary.returncode == 0, summary.stderr[-3000:]
    got = json.loads(summary.stdout)
    assert [st["status"] for st in got["stages"].values()] == ["done"] * 3
    assert all(st["loss_final"] is not None for st in got["stages"].values())  # (checks are off here)
    assert got["registered"]["version"] == (repo / "runs/register/version.txt").read_text().strip()
    assert all(Path(repo / g).exists() for g in got["evaluation"]["grids"]) and got["evaluation"]["grids"]

    # The registered champion generates an image (MLflow pyfunc, as served).
    import mlflow
    import pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/dynamicid@champion",
                                     model_config={"storage.cache_dir": str(cache_dir)})
    photo = base64.b64encode(single_face_photo.read_bytes()).decode()
    out = model.predict(pd.DataFrame([{"prompt": "a photo of a person", "images": [photo], "steps": 2,
                                       "seed": 0}]))
    assert Image.open(io.BytesIO(base64.b64decode(out.iloc[0]["image"]))).size == (64, 64)

    # Changing an evaluation param reruns evaluate and register only.
    params["evaluate"]["seeds"] = [3]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    changed = set(json.loads(status.stdout or "{}"))
    assert changed == {"evaluate"}, changed

    # A production-profile setting is read by the stages that train and evaluate it: they rerun.
    params["evaluate"]["seeds"] = [0]
    params["model"]["sd15"]["lora_rank"] = 64
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert set(json.loads(status.stdout or "{}")) == {"anchor", "reconfigure", "evaluate"}

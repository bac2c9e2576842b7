"""Kill a training run (SIGKILL) at a step, resume it, and compare with an uninterrupted run.

Both runs are real ``dynamicid train --stage anchor`` processes (DeepSpeed ZeRO-2, gloo, CPU).
The resumed run must continue at the step of the latest complete checkpoint, with the same
learning rate, and then reproduce the uninterrupted run's losses step for step.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

STEPS, WARMUP, LR, MIN_RATIO = 12, 3, 1e-3, 0.1
# Same process, same CPU kernels, same data and noise: the only freedom left is summation order
# inside DeepSpeed's flattened buffers, which is the same too; allow float noise anyway.
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("resume")
    write_testbed(root / "prepared", identities=3, images_per_identity=4)
    params = {
        "storage": {"cache_dir": str(cache_dir)},
        "data": {"prepared": str(root / "prepared")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "train": {"checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "sample_every": 1000,
                  "sample_count": 1, "sample_steps": 1, "holdout_per_identity": 1, "check_images": 0,
                  "min_lr_ratio": MIN_RATIO,
                  "anchor": {"steps": STEPS, "lr": LR, "micro_batch": 2, "warmup_steps": WARMUP}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "components.cli", "--params", str(root / "params.yaml"),
            "-S", f"train.anchor.output={out}", "train", "--stage", "anchor", *extra]


def _rows(path: Path) -> dict[int, dict[str, float]]:
    with open(path) as fh:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in csv.DictReader(fh, delimiter="\t")}


def _expected_lr(step: int) -> float:
    """DeepSpeed WarmupCosineLR as the trainer drives it, written out independently: 0-based step s
    uses s / warmup during warm-up, then a cosine reaching MIN_RATIO at the last step."""
    if step < WARMUP:
        return LR * step / WARMUP
    progress = min(1.0, (step - WARMUP + 1) / (STEPS - WARMUP))
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


def test_killed_run_resumes_at_its_checkpoint_and_matches_the_uninterrupted_run(setup):
    root = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = root / "straight"
    subprocess.run(_cmd(root, straight), check=True, env=env, capture_output=True, timeout=300)

    killed = root / "killed"
    proc = subprocess.Popen(_cmd(root, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: right after the first checkpoint became "latest"
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = int(latest.read_text().strip().split("-")[1])
    assert 2 <= saved < STEPS
    assert not (killed / "export").exists()  # the final export only exists after the last step

    resumed = subprocess.run(_cmd(root, killed, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed anchor at step {saved} from" in resumed.stderr

    a, b = _rows(straight / "loss.tsv"), _rows(killed / "loss.tsv")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert a[step]["lr"] == pytest.approx(_expected_lr(step - 1), rel=1e-7, abs=1e-15)
        assert b[step]["lr"] == a[step]["lr"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=REL_TOL), step
    # and training moved the weights to the same place: the final exports agree
    from safetensors.torch import load_file

    for part in ("face_encoder", "saa"):
        wa = load_file(straight / "export" / f"{part}.safetensors")
        wb = load_file(killed / "export" / f"{part}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() <= 1e-5 + 1e-4 * wa[k].abs().max(), k
    # the resumed process continued the same MLflow run
    import json

    run_a = json.loads((straight / "mlflow_run.json").read_text())["run_id"]
    run_b = json.loads((killed / "mlflow_run.json").read_text())["run_id"]
    assert run_a != run_b
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_b)
    assert "resumed" in run.data.tags and run.info.status == "FINISHED"
    steps_logged = {m.step for m in client.get_metric_history(run_b, "loss")}
    assert steps_logged == set(range(1, STEPS + 1))

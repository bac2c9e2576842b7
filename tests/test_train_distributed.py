"""Two processes under torchrun (ZeRO-2, gloo, CPU) train exactly what one process does.

``dynamicid train --nproc 2`` re-launches itself under torch.distributed.run. With micro-batch 2
on each of 2 ranks the global batch holds the same samples (slots), noise and timesteps as
micro-batch 4 on one rank, and ZeRO-2 averages the ranks' gradients, so the two runs must
follow the same loss curve up to summation order."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STEPS = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory, cache_dir) -> Path:
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("ddp")
    write_testbed(root / "prepared", identities=3, images_per_identity=4)
    params = {
        "storage": {"cache_dir": str(cache_dir)},
        "data": {"prepared": str(root / "prepared")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "train": {"zero_stage": 2, "checkpoint_every": STEPS, "sample_every": 1000, "sample_count": 1,
                  "sample_steps": 1, "holdout_per_identity": 1, "check_images": 0,
                  "anchor": {"steps": STEPS, "lr": 1e-3, "warmup_steps": 1}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _train(root: Path, out: str, micro_batch: int, nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "components.cli", "--params", str(root / "params.yaml"),
           "-S", f"train.anchor.output={root / out}", "-S", f"train.anchor.micro_batch={micro_batch}",
           "train", "--stage", "anchor", "--nproc", str(nproc)]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _losses(path: Path) -> list[float]:
    with open(path) as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh, delimiter="\t")]


def test_two_process_zero2_matches_one_process(root):
    two = _train(root, "two", micro_batch=2, nproc=2)
    one = _train(root, "one", micro_batch=4, nproc=1)
    a, b = _losses(root / "one" / "loss.tsv"), _losses(root / "two" / "loss.tsv")
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-4)
    # ZeRO-2 partitioned the optimizer state over both ranks
    state = root / "two" / "checkpoints" / f"step-{STEPS:06d}" / "deepspeed" / "state"
    shards = sorted(p.name for p in state.glob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_1" in s for s in shards), shards
    assert '"world_size": 2' in (root / "two" / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text()
    # one progress bar (rank 0 only)
    assert two.stderr.count("train anchor:   0%") == 1
    assert (root / "two" / "export" / "manifest.json").exists() and (root / "one" / "export").exists()
    assert "Traceback" not in two.stderr and "Traceback" not in one.stderr

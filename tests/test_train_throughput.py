"""Training speed reporting (issue 17, item 2): the steady-state rate that excludes warm-up and compile windows,
the persistent torch.compile cache under the stage's output, and the compile watch that reports its hits.

* the rate arithmetic on synthetic windows (no clock);
* a real tiny anchor run (the CLI in a subprocess) whose first step is made slow on purpose: the overall rate
  falls, the steady rate does not, and it equals the rate of the steps after the warm-up in loss.tsv;
* the cache folders chosen under the output directory, a user's own folders respected;
* one real CPU compile (forward + backward of a small function) in two fresh processes sharing the output
  directory: the first fills ``<output>/compile_cache``, the second is served from it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from components.train.compile_cache import CACHE_DIR, INDUCTOR_ENV, TRITON_ENV, use_compile_cache
from components.train.throughput import WARMUP_STEPS, Throughput

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the arithmetic


def test_steady_rate_leaves_out_the_first_steps_and_compile_windows():
    t = Throughput(images_per_step=4, start=0)
    t.add(first=1, steps=WARMUP_STEPS, seconds=30.0)           # warm-up by position (the first compile)
    t.add(first=WARMUP_STEPS + 1, steps=2, seconds=1.0)        # 8 images in 1 s
    t.add(first=WARMUP_STEPS + 3, steps=4, seconds=20.0, compiled=True)  # a recompilation
    t.add(first=WARMUP_STEPS + 7, steps=6, seconds=3.0)        # 24 images in 3 s
    assert t.steady == pytest.approx(32 / 4.0) and t.steady_steps == 8
    assert t.warmup_s == pytest.approx(50.0)
    assert t.overall == pytest.approx(4 * 15 / 54.0)
    m = t.metrics()
    assert m["samples_per_s"] == m["samples_per_s_overall"] == pytest.approx(t.overall)
    assert m["samples_per_s_steady"] == pytest.approx(8.0) and m["steady_steps"] == 8.0


def test_a_resume_has_its_own_warmup_and_a_short_run_reports_no_steady_rate():
    t = Throughput(images_per_step=2, start=40)
    t.add(first=41, steps=WARMUP_STEPS, seconds=9.0)
    assert t.warmup_end == 40 + WARMUP_STEPS
    assert t.steady is None and t.steady_steps == 0
    assert "samples_per_s_steady" not in t.metrics() and t.metrics()["samples_per_s_overall"] > 0
    t.add(first=41 + WARMUP_STEPS, steps=5, seconds=2.0)
    assert t.steady == pytest.approx(5.0)


# --------------------------------------------------------------------------- a real run with a slow first step

SLEEP_S = 30.0  # dominant over step-time noise on a shared 2-core machine (steps there: 2-13 s)
STEPS = 10

DRIVER = """
import sys, time
from components.train.tasks import AnchorTask

_forward, _calls = AnchorTask.forward, [0]

def slow_first_step(self, *args, **kwargs):  # a stand-in for the first step's compilation
    _calls[0] += 1
    if _calls[0] == 1:
        time.sleep({sleep})
    return _forward(self, *args, **kwargs)

AnchorTask.forward = slow_first_step
from components.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def slow_start_run(tmp_path_factory, cache_dir):
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("throughput")
    write_testbed(root / "prepared", identities=3, images_per_identity=3, test_identities=1)
    params = {
        "storage": {"cache_dir": str(cache_dir)},
        "data": {"prepared": str(root / "prepared")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "throughput-test"},
        "train": {"checkpoint_every": STEPS, "log_every": 2, "sample_every": 10_000, "check_images": 0,
                  "holdout_per_identity": 1, "compile_unet": "off",
                  "anchor": {"steps": STEPS, "micro_batch": 2, "warmup_steps": 1, "output": str(root / "anchor")}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    driver = root / "driver.py"
    driver.write_text(DRIVER.format(sleep=SLEEP_S))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(driver), "--params", str(root / "params.yaml"), "train", "--stage",
                           "anchor"], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, done.stderr


def test_steady_rate_excludes_a_slow_first_step(slow_start_run):
    root, _ = slow_start_run
    metrics = json.loads((root / "anchor" / "metrics.json").read_text())
    overall, steady = metrics["samples_per_s_overall"], metrics["samples_per_s_steady"]
    assert metrics["samples_per_s"] == overall  # the old key, unchanged in meaning
    assert overall < steady
    assert metrics["warmup_s"] >= SLEEP_S and metrics["steady_steps"] == STEPS - WARMUP_STEPS
    # the rate of the later steps, from loss.tsv's per-step rows (each row: the global batch / its window's mean
    # step time): images of the steps after the warm-up / their time
    with open(root / "anchor" / "loss.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    batch = 2
    later = [float(r["samples_per_s"]) for r in rows if int(r["step"]) > WARMUP_STEPS]
    assert len(later) == STEPS - WARMUP_STEPS
    assert steady == pytest.approx(batch * len(later) / sum(batch / r for r in later), rel=1e-6)
    everything = [float(r["samples_per_s"]) for r in rows]
    assert overall == pytest.approx(batch * len(everything) / sum(batch / r for r in everything), rel=1e-6)


def test_speed_metrics_reach_the_mlflow_run(slow_start_run):
    from mlflow import MlflowClient

    root, _ = slow_start_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "anchor" / "mlflow_run.json").read_text())["run_id"]
    metrics = json.loads((root / "anchor" / "metrics.json").read_text())
    logged = client.get_run(run_id).data.metrics
    for key in ("samples_per_s_overall", "samples_per_s_steady", "warmup_s", "steady_steps"):
        assert logged[f"final/{key}"] == pytest.approx(metrics[key])
        history = client.get_metric_history(run_id, f"throughput/{key}")
        assert [m.step for m in history] == [STEPS] and history[0].value == pytest.approx(metrics[key])
    assert not (root / "anchor" / CACHE_DIR).exists()  # compile_unet off: no compile cache


# --------------------------------------------------------------------------- the compile cache


def test_compile_cache_goes_under_the_output_unless_the_user_chose(tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env: dict[str, str] = {}
    dirs = use_compile_cache(tmp_path / "anchor", env)
    assert env[INDUCTOR_ENV] == str((tmp_path / "anchor" / CACHE_DIR / "inductor").resolve())
    assert env[TRITON_ENV] == str((tmp_path / "anchor" / CACHE_DIR / "triton").resolve())
    assert Path(env[INDUCTOR_ENV]).is_dir() and dirs.ours == (INDUCTOR_ENV, TRITON_ENV)
    # torch writes its own default into the environment once it has used it: that is not a user's choice
    env = {INDUCTOR_ENV: default_cache_dir()}
    use_compile_cache(tmp_path / "anchor", env)
    assert env[INDUCTOR_ENV].startswith(str(tmp_path.resolve()))
    # a user's folders stay
    env = {INDUCTOR_ENV: str(tmp_path / "mine"), TRITON_ENV: str(tmp_path / "my-triton")}
    dirs = use_compile_cache(tmp_path / "other", env)
    assert env == {INDUCTOR_ENV: str(tmp_path / "mine"), TRITON_ENV: str(tmp_path / "my-triton")}
    assert dirs.ours == () and not (tmp_path / "other").exists()


COMPILE = """
import json, os, sys
from components.train.compile_cache import CompileWatch, use_compile_cache
use_compile_cache(sys.argv[1])
import torch

def f(x, w):
    return (torch.sin(x @ w) * 2 + 1).sum()

g = torch.compile(f)
with CompileWatch() as watch:
    x, w = torch.randn(8, 8), torch.randn(8, 8, requires_grad=True)
    g(x, w).backward()
print(json.dumps({"events": watch.events, "seconds": watch.seconds, **watch.cache(),
                  "inductor": os.environ["TORCHINDUCTOR_CACHE_DIR"], "describe": watch.describe()}))
"""


def test_a_second_process_compiles_from_the_cache_under_the_output(tmp_path):
    out = tmp_path / "anchor"
    env = {k: v for k, v in os.environ.items() if k not in (INDUCTOR_ENV, TRITON_ENV)}
    env["PYTHONPATH"] = str(ROOT)

    def compile_once() -> dict:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE), str(out)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = compile_once()
    assert first["inductor"] == str((out / CACHE_DIR / "inductor").resolve())
    assert first["events"] >= 2 and first["seconds"] > 0  # the forward, and the backward compiled lazily
    assert first["fx_graph_cache_misses"] >= 2 and first["fx_graph_cache_hits"] == 0
    assert "cache miss" in first["describe"]
    assert any((out / CACHE_DIR / "inductor").rglob("*"))
    second = compile_once()
    assert second["events"] >= 1  # dynamo traces again (not cached); the backward comes with the AOTAutograd entry
    assert second["fx_graph_cache_misses"] == 0 and second["aot_autograd_cache_misses"] == 0
    assert second["fx_graph_cache_hits"] + second["aot_autograd_cache_hits"] >= 1
    assert "cache hit" in second["describe"]
    print(f"cold: {first['describe']}\nwarm: {second['describe']}")

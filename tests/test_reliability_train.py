"""Training under SIGKILL: nothing but at most one checkpoint interval is ever lost.

One chain of real ``dynamicid train --stage anchor --nproc 2`` runs (torchrun, 2 processes,
DeepSpeed ZeRO-2, gloo, CPU), each with a deadline so that a hang fails instead of blocking CI:

1. ``straight``: the uninterrupted run, the reference;
2. ``killed``: SIGKILL to rank 1 only, at a step drawn with a fixed seed (printed); torchrun must
   tear rank 0 down; the newest complete checkpoint is the last multiple of ``checkpoint_every``;
3. ``--resume`` with ``DYNAMICID_FAULT_CHECKPOINT``: rank 0 dies in the middle of writing a later
   checkpoint (DeepSpeed state and export written, no ``state.json``, not renamed into place); the
   half-written checkpoint must not be chosen, the one before it must;
4. ``--resume`` again: continues from that checkpoint, removes the leftovers and finishes; every
   step's loss and learning rate, the final exports and the MLflow run match the straight run.

Then in-process unit tests: a corrupted or partial checkpoint directory (no ``state.json``, no
"complete" mark, unreadable ``state.json``, no file list, a missing export manifest, a truncated
or missing file, a stale temp dir, a kill half-way through a deletion) is never chosen, and the
leftovers are removed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from components.train.checkpoints import FAULT_ENV, CheckpointStore

STEPS, EVERY, WARMUP, LR, MIN_RATIO = 12, 4, 3, 1e-3, 0.1
KILL_SEED = 9
# Same processes, same CPU kernels, same data and noise, same reduction order over 2 ranks;
# allow float noise anyway.
REL_TOL = 1e-4
RUN_TIMEOUT = 240.0    # one run; generous for a loaded 2-core machine
TEARDOWN_TIMEOUT = 60.0  # from the SIGKILL of one rank to the end of the whole run


def kill_step() -> int:
    """The step after which rank 1 is killed: drawn with a fixed seed from the steps that lie one or two steps
    past a checkpoint, so that the kill cannot coincide with a checkpoint write (that case is step 3's)."""
    choices = [k for k in range(EVERY + 1, STEPS - EVERY) if k % EVERY in (1, 2)]
    return random.Random(KILL_SEED).choice(choices)


def _child_env(root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_ENV, None)
    if env.get("PYTHONDONTWRITEBYTECODE"):
        # Without bytecode every one of the 8 Python processes of the chain compiles the same ~6000 modules
        # (about 10 s of CPU each): let them share a private bytecode cache instead.
        env.pop("PYTHONDONTWRITEBYTECODE")
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


@dataclass
class Launch:
    name: str
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.name}: still running after {timeout:.0f} s (hung?)\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _launch(root: Path, name: str, *extra: str, fault: str | None = None) -> Launch:
    cmd = [sys.executable, "-m", "components.cli", "--params", str(root / "params.yaml"),
           "-S", f"train.anchor.output={root / name.split('.')[0]}", "train", "--stage", "anchor", "--nproc", "2",
           *extra]
    env = _child_env(root)
    if fault:
        env[FAULT_ENV] = fault
    log = root / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Launch(name, proc, log)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _rank_pid(root_pid: int, rank: int) -> int | None:
    for pid in _children(root_pid):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return pid
    return None


def _pointer(store: CheckpointStore) -> str:
    path = store.root / "latest"
    return path.read_text().strip() if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rows(path: Path) -> dict[int, dict[str, float]]:
    if not path.exists():
        return {}
    with open(path) as fh:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in csv.DictReader(fh, delimiter="\t")}


def _expected_lr(step: int) -> float:
    """DeepSpeed WarmupCosineLR as the trainer drives it, written out independently: 0-based step s
    uses s / warmup during warm-up, then a cosine reaching MIN_RATIO at the last step."""
    if step < WARMUP:
        return LR * step / WARMUP
    progress = min(1.0, (step - WARMUP + 1) / (STEPS - WARMUP))
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)) / 2)


@pytest.fixture(scope="module")
def root(tmp_path_factory, cache_dir) -> Path:
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("reliability-train")
    write_testbed(root / "prepared", identities=3, images_per_identity=4)
    params = {
        "storage": {"cache_dir": str(cache_dir)},
        "data": {"prepared": str(root / "prepared")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "train": {"zero_stage": 2, "checkpoint_every": EVERY, "keep_checkpoints": 2, "log_every": 1,
                  "sample_every": 1000, "sample_count": 1, "sample_steps": 1, "holdout_per_identity": 1,
                  "check_images": 0, "min_lr_ratio": MIN_RATIO,
                  "anchor": {"steps": STEPS, "lr": LR, "micro_batch": 1, "warmup_steps": WARMUP}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@dataclass
class Chain:
    root: Path
    kill_at: int = 0
    done_when_killed: int = 0          # last step in loss.tsv when the killed run had ended
    teardown_s: float = 0.0            # SIGKILL of rank 1 -> end of the whole run
    rank0_survived: bool = False
    export_after_kill: bool = True     # the final export exists after the killed run
    killed_rc: int = 0
    after_kill: int | None = None      # newest complete checkpoint after the kill
    pointer_after_kill: str = ""
    fault_step: int = 0
    fault: Launch | None = None
    fault_rc: int = 0
    fault_tmp_files: list[str] = field(default_factory=list)
    fault_dir_exists: bool = True      # step-<fault step> exists after the run killed while writing it
    after_fault: int | None = None
    pointer_after_fault: str = ""
    final: Launch | None = None
    final_rc: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


def _cpu() -> float:
    """CPU seconds of every finished child process (and theirs) so far: a load-independent cost figure."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def chain(root) -> Chain:
    c = Chain(root)
    cpu0 = _cpu()
    t0 = time.monotonic()
    straight = _launch(root, "straight")
    assert straight.wait(RUN_TIMEOUT) == 0, straight.tail()
    c.timings["straight"] = time.monotonic() - t0
    c.cpu["straight"] = _cpu() - cpu0 - sum(c.cpu.values())

    # 2. SIGKILL rank 1 once rank 0 has logged step K (rank 1 is then in step K + 1 at most)
    c.kill_at = kill_step()
    print(f"\nkilling rank 1 after step {c.kill_at} of {STEPS} (checkpoint every {EVERY}; seed {KILL_SEED})")
    t0 = time.monotonic()
    killed = _launch(root, "killed")
    table = root / "killed" / "loss.tsv"
    victim = rank0 = None
    deadline = time.monotonic() + RUN_TIMEOUT
    while killed.proc.poll() is None and time.monotonic() < deadline:
        victim = victim or _rank_pid(killed.proc.pid, 1)
        rank0 = rank0 or _rank_pid(killed.proc.pid, 0)
        if victim and max(_rows(table), default=0) >= c.kill_at:
            break
        time.sleep(0.01)
    assert killed.proc.poll() is None and victim and rank0, f"the run ended before step {c.kill_at}\n{killed.tail()}"
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    c.killed_rc = killed.wait(TEARDOWN_TIMEOUT)
    c.teardown_s = time.monotonic() - t_kill
    c.rank0_survived = _alive(rank0)
    c.done_when_killed = max(_rows(table), default=0)
    c.export_after_kill = (root / "killed" / "export").exists()
    store = CheckpointStore(root / "killed" / "checkpoints", keep=2)
    ref = store.latest()
    c.after_kill = ref.step if ref else None
    c.pointer_after_kill = _pointer(store)
    c.timings["killed"] = time.monotonic() - t0
    c.cpu["killed"] = _cpu() - cpu0 - sum(c.cpu.values())

    # 3. resume; rank 0 dies while writing the second checkpoint after the resume point
    t0 = time.monotonic()
    c.fault_step = (c.after_kill or 0) + 2 * EVERY
    c.fault = _launch(root, "killed.fault", "--resume", fault=f"{c.fault_step}:0:export")
    c.fault_rc = c.fault.wait(RUN_TIMEOUT)
    tmp = store.root / f".step-{c.fault_step:06d}.tmp"
    c.fault_tmp_files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    c.fault_dir_exists = (store.root / f"step-{c.fault_step:06d}").exists()
    ref = store.latest()
    c.after_fault = ref.step if ref else None
    c.pointer_after_fault = _pointer(store)
    c.timings["fault"] = time.monotonic() - t0
    c.cpu["fault"] = _cpu() - cpu0 - sum(c.cpu.values())

    # 4. resume to the end
    t0 = time.monotonic()
    c.final = _launch(root, "killed.final", "--resume")
    c.final_rc = c.final.wait(RUN_TIMEOUT)
    c.timings["final"] = time.monotonic() - t0
    c.cpu["final"] = _cpu() - cpu0 - sum(c.cpu.values())
    print("chain wall (s):", {k: round(v, 1) for k, v in c.timings.items()}, "cpu (s):",
          {k: round(v, 1) for k, v in c.cpu.items()}, f"teardown {c.teardown_s:.1f} s")
    return c


def test_sigkill_of_one_rank_ends_the_run_and_loses_at_most_one_interval(chain):
    c = chain
    assert c.killed_rc != 0
    assert not c.rank0_survived, "torchrun left rank 0 running after rank 1 died"
    assert c.teardown_s < TEARDOWN_TIMEOUT
    # rank 0 cannot finish step K + 2 without rank 1
    assert c.kill_at <= c.done_when_killed <= c.kill_at + 1
    assert not c.export_after_kill  # the final export only exists after the last step
    # the newest complete checkpoint is the last one written before the kill: less than one interval lost
    assert c.after_kill == EVERY * (c.done_when_killed // EVERY)
    assert 0 < c.done_when_killed - c.after_kill < EVERY
    assert c.pointer_after_kill == f"step-{c.after_kill:06d}"
    print(f"SIGKILL rank 1 after step {c.kill_at} (last logged {c.done_when_killed}) of {STEPS}, checkpoint every "
          f"{EVERY}: resumed at step {c.after_kill}, {c.done_when_killed - c.after_kill} step(s) redone, "
          f"run torn down {c.teardown_s:.1f} s after the kill")


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_latest(chain):
    c = chain
    out = c.fault.text()
    assert c.fault_rc != 0, out[-3000:]
    assert f"resumed anchor at step {c.after_kill} from" in out
    assert f"killing rank 0 while writing checkpoint {c.fault_step}" in out
    # the kill landed in the middle of the write: every rank's DeepSpeed partition and the export are on disk,
    # the state (the commit record) is not, and the directory was never renamed into place
    assert "export/manifest.json" in c.fault_tmp_files
    assert sum("optim_states" in f for f in c.fault_tmp_files) == 2, c.fault_tmp_files
    assert "state.json" not in c.fault_tmp_files
    assert not c.fault_dir_exists
    # the checkpoint written before it in the same run is the one chosen, and the one `latest` names
    assert c.after_fault == c.fault_step - EVERY
    assert c.pointer_after_fault == f"step-{c.after_fault:06d}"
    final = c.final.text()
    assert c.final_rc == 0, final[-3000:]
    assert f"resumed anchor at step {c.after_fault} from" in final
    # the resumed run removed the half-written directory and kept keep_checkpoints complete ones
    ckpts = sorted(p.name for p in (c.root / "killed" / "checkpoints").iterdir())
    assert ckpts == ["latest", f"step-{STEPS - EVERY:06d}", f"step-{STEPS:06d}"]
    print(f"SIGKILL rank 0 while writing checkpoint {c.fault_step} (after DeepSpeed state + export, before "
          f"state.json): resumed at step {c.after_fault}, {EVERY} step(s) redone")


def test_resumed_run_matches_the_uninterrupted_run(chain):
    c = chain
    root = c.root
    assert c.final_rc == 0, c.final.tail()
    straight, killed = root / "straight", root / "killed"
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
    # both resumed processes continued the killed run's MLflow run, which ends FINISHED with every step once
    run_a = json.loads((straight / "mlflow_run.json").read_text())["run_id"]
    run_b = json.loads((killed / "mlflow_run.json").read_text())["run_id"]
    assert run_a != run_b
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_b)
    assert "resumed" in run.data.tags and run.info.status == "FINISHED"
    steps_logged = {m.step for m in client.get_metric_history(run_b, "loss")}
    assert steps_logged == set(range(1, STEPS + 1))
    assert '"world_size": 2' in (killed / "checkpoints" / f"step-{STEPS:06d}" / "state.json").read_text()


# --------------------------------------------------------------------------- which checkpoint is chosen (in-process)


class _Engine:
    """Writes what a DeepSpeed engine of 2 ranks would (model states + two optimizer partitions)."""

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        d = Path(save_dir, tag)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"m" * 300)
        for rank in (0, 1):
            (d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 700)


def _export(d: Path) -> None:
    d.mkdir()
    (d / "saa.safetensors").write_bytes(b"w" * 500)
    (d / "manifest.json").write_text('{"parts": ["saa"]}')


def _save(store: CheckpointStore, step: int):
    import torch

    from components.train.distributed import DistInfo

    return store.save(_Engine(), step, {"stage": "anchor"}, _export,
                      DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))


def _edit_state(path: Path, change) -> None:
    state = json.loads((path / "state.json").read_text())
    change(state)
    (path / "state.json").write_text(json.dumps(state))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


OPTIM = "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
CORRUPTIONS = {
    "no state.json": (lambda p: (p / "state.json").unlink(), "no state.json"),
    "not marked complete": (lambda p: _edit_state(p, lambda s: s.update(complete=False)), "complete"),
    "no complete mark": (lambda p: _edit_state(p, lambda s: s.pop("complete")), "complete"),
    "truncated state.json": (lambda p: _truncate(p / "state.json"), "unreadable"),
    "no file list": (lambda p: _edit_state(p, lambda s: s.pop("files")), "lists no files"),
    "export manifest missing": (lambda p: (p / "export" / "manifest.json").unlink(), "manifest.json is missing"),
    "truncated export weights": (lambda p: _truncate(p / "export" / "saa.safetensors"), "250 bytes, 500"),
    "truncated optimizer partition": (lambda p: _truncate(p / OPTIM), "350 bytes, 700"),
    "lost optimizer partition": (lambda p: (p / OPTIM).unlink(), "missing"),
    "emptied directory": (lambda p: [q.unlink() for q in sorted(p.rglob("*"), reverse=True) if q.is_file()],
                          "no state.json"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_broken_newest_checkpoint_is_never_chosen(tmp_path, kind):
    from components.train.checkpoints import problem

    store = CheckpointStore(tmp_path, keep=3)
    first, newest = _save(store, 2), _save(store, 4)
    assert problem(newest.path) is None and store.latest() == newest
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(newest.path)
    assert reason in (problem(newest.path) or ""), problem(newest.path)
    assert (tmp_path / "latest").read_text().strip() == "step-000004"  # the pointer is not trusted...
    assert store.latest() == first                                      # ...the files are checked
    assert [r.step for r in store.complete()] == [2]
    # the broken directory is tidied away; the good one stays; writing the step again works
    store.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002"]
    assert store.latest() == first and problem(first.path) is None
    assert _save(store, 4) == store.latest() == newest


def test_stale_temp_dirs_are_never_chosen_and_are_removed(tmp_path):
    import shutil

    store = CheckpointStore(tmp_path, keep=2)
    good = _save(store, 4)
    # what kills leave behind: a temp dir that holds a whole checkpoint (killed just before the rename), a
    # half-written one, a checkpoint half-way through its deletion, a pointer's temp file
    shutil.copytree(good.path, tmp_path / ".step-000006.tmp")
    _edit_state(tmp_path / ".step-000006.tmp", lambda s: s.update(step=6))
    (tmp_path / ".step-000008.tmp" / "deepspeed").mkdir(parents=True)
    shutil.copytree(good.path, tmp_path / ".del-step-000003-4242")
    (tmp_path / ".latest.tmp-4242").write_text("step-000006\n")
    assert store.latest() == good
    removed = {p.name for p in store.remove_leftovers()}
    assert removed == {".step-000006.tmp", ".step-000008.tmp", ".del-step-000003-4242", ".latest.tmp-4242"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004"]
    # a save tidies up too (the resumed run of the fault chain relies on the resume-time clean-up instead)
    (tmp_path / ".step-000005.tmp").mkdir()
    _save(store, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004", "step-000008"]


def test_a_kill_while_a_checkpoint_is_deleted_leaves_nothing_that_looks_like_one(tmp_path, monkeypatch):
    """Writing step 4 again (after a resume from step 2) deletes the old step-000004 first; a kill in the middle of
    that deletion must not leave a half-deleted ``step-000004`` behind."""
    import shutil

    from components.train import checkpoints

    store = CheckpointStore(tmp_path, keep=3)
    first, _ = _save(store, 2), _save(store, 4)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        if "step-000004" in str(path) and ".tmp" not in str(path):
            real_rmtree(Path(path) / "deepspeed")  # part of the directory is gone...
            raise KeyboardInterrupt                # ...when the process dies
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        _save(store, 4)
    assert not (tmp_path / "step-000004").exists()
    assert store.latest() == first
    monkeypatch.undo()
    store.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002"]


def _resume_point_worker(rank: int, port: int, scenarios: list[list[str]], results) -> None:
    """One process of 2: for each scenario (the checkpoint directory of rank 0 and of rank 1), what resume_point
    gives this rank (a step or the error)."""
    import torch
    import torch.distributed as tdist

    from components.core.errors import UserError
    from components.train.distributed import DistInfo
    from components.train.loop import resume_point

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank, rank, 2, torch.device("cpu"))
    try:
        for n, roots in enumerate(scenarios):
            try:
                ref = resume_point(CheckpointStore(roots[rank], keep=2), info, resume=True)
                results.put((n, rank, ref.step if ref else None))
            except UserError as err:
                results.put((n, rank, str(err)))
    finally:
        tdist.destroy_process_group()


def test_processes_that_see_different_checkpoints_refuse_to_resume(tmp_path):
    """Two processes whose output directories differ (machines without a shared volume) must not each resume
    from what their own disk holds: both stop with the same error. Real gloo group of 2 spawned processes."""
    import multiprocessing

    from components.train.distributed import _free_port

    shared, own = tmp_path / "shared", tmp_path / "own"
    _save(CheckpointStore(shared, keep=2), 4)
    _save(CheckpointStore(own, keep=2), 8)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    scenarios = [[str(shared), str(shared)], [str(shared), str(own)]]
    port = _free_port()
    procs = [ctx.Process(target=_resume_point_worker, args=(r, port, scenarios, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = {(n, r): v for n, r, v in (results.get(timeout=120) for _ in range(2 * len(scenarios)))}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got[0, 0] == got[0, 1] == 4
    for rank in (0, 1):
        assert "see different checkpoints" in got[1, rank] and "steps 4 to 8" in got[1, rank], got

"""Resumable checkpoints: DeepSpeed state + an export of the trainable parts, made visible atomically.

Layout under ``<stage output>/checkpoints[/<phase>]``::

    step-000050/
      deepspeed/state/...    engine.save_checkpoint (module, ZeRO optimizer partitions, scheduler)
      export/                the model package's checkpoint (safetensors + manifest) at this step
      state.json             step, global batch, world size, MLflow run id, and the size of every
                             other file of the checkpoint (written last)
    latest                   the name of the newest complete step dir (replaced atomically; for people
                             and tools: resume looks at the step dirs themselves)

A checkpoint is written into ``.step-000050.tmp`` by every rank, then rank 0 writes
``state.json``, fsyncs, renames the directory into place and only then points ``latest`` at
it (``os.replace``). A checkpoint counts only if its ``state.json`` says complete and every
file it lists is there with its recorded size, so neither a kill at any moment of the write nor a
later loss or truncation of a file (a partial copy, a full disk, a lost rank's partition) can make
resume pick a broken checkpoint: it takes the newest one that passes. Directories are deleted by
renaming them out of the ``step-*`` namespace first, so a kill during a deletion leaves nothing
that looks like a checkpoint; leftovers (``.step-*.tmp``, ``.del-*``, ``.latest.tmp-*``) are
removed on resume and after every save. Frozen parameters are not saved (they come from the
stage's inputs again on resume).

Fault injection (tests only): ``DYNAMICID_FAULT_CHECKPOINT=STEP:RANK:POINT`` makes that rank
SIGKILL itself while writing the checkpoint of STEP, at POINT: ``deepspeed`` (its DeepSpeed files
are written, the other ranks may not be), ``export`` (rank 0: DeepSpeed state and export written,
no ``state.json`` yet) or ``commit`` (rank 0: everything written and fsynced, not yet renamed).
``tests/test_reliability_train.py`` uses it to kill a run in the middle of a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.train.distributed import DistInfo

log = logging.getLogger(__name__)

LATEST = "latest"
STATE = "state.json"
DS_TAG = "state"
FAULT_ENV = "DYNAMICID_FAULT_CHECKPOINT"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVERS = (".step-*.tmp", ".del-*", f".{LATEST}.tmp-*")


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path

    @property
    def deepspeed_dir(self) -> Path:
        return self.path / "deepspeed"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())


def problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None: it is one).

    Only metadata is read (one small JSON and a stat per file), so checking every candidate on
    each resume stays cheap even for checkpoints of many GB."""
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        return f"no {STATE}"
    except (OSError, ValueError) as err:
        return f"unreadable {STATE}: {err}"
    if not isinstance(state, dict) or state.get("complete") is not True:
        return f"{STATE} does not mark it complete"
    files = state.get("files")
    if not isinstance(files, dict) or not any(str(f).startswith("deepspeed/") for f in files):
        return f"{STATE} lists no files (not written by this version, or cut short)"
    for rel, size in files.items():
        try:
            got = (path / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if got != size:
            return f"{rel} has {got} bytes, {size} were written"
    if not isinstance(state.get("step"), int):
        return f"{STATE} has no step"
    return None


def _file_sizes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *sorted(q for q in root.rglob("*") if q.is_dir())]:  # the directory entries too
        _fsync_dir_entries(d)


def _fsync_dir_entries(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable; not every file system can (then: best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Delete a directory so that no moment of the deletion leaves a half-deleted ``step-*`` behind:
    it leaves the ``step-*`` namespace by one rename, then goes."""
    if not path.exists():
        return
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def fault_point(point: str, step: int, rank: int) -> None:
    """Test hook (see the module docstring): die here, as a killed process would, when asked to."""
    if os.environ.get(FAULT_ENV) == f"{step}:{rank}:{point}":
        log.error("%s=%s: killing rank %d while writing checkpoint %d (%s)", FAULT_ENV, os.environ[FAULT_ENV],
                  rank, step, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, keep: int):
        self.root = Path(root)
        self.keep = max(1, keep)

    def _candidates(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)))

    def complete(self) -> list[CheckpointRef]:
        """Every complete checkpoint, oldest first."""
        return [CheckpointRef(s, p) for s, p in self._candidates() if problem(p) is None]

    def latest(self) -> CheckpointRef | None:
        """The newest complete checkpoint; broken ones are skipped with a warning naming the problem."""
        for step, path in reversed(self._candidates()):
            why = problem(path)
            if why is None:
                pointer = self.root / LATEST
                named = pointer.read_text().strip() if pointer.is_file() else None
                if named != path.name:
                    log.info("%s names %s; the newest complete checkpoint is %s", pointer, named, path.name)
                return CheckpointRef(step, path)
            log.warning("skipping checkpoint %s: %s", path, why)
        return None

    def save(self, engine, step: int, state: dict[str, Any], export: Callable[[Path], None],
             dist: DistInfo) -> CheckpointRef:
        """Collective: every rank calls it at the same step."""
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".step-{step:06d}.tmp"
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
        fault_point("deepspeed", step, dist.rank)
        dist.barrier()
        if dist.is_main:
            export(tmp / "export")
            fault_point("export", step, dist.rank)
            files = _file_sizes(tmp)  # every rank's DeepSpeed files are on disk after the barrier
            (tmp / STATE).write_text(json.dumps({**state, "step": step, "complete": True, "files": files,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                indent=2, sort_keys=True))
            _fsync_tree(tmp)
            fault_point("commit", step, dist.rank)
            _discard(final)  # the same step written again after a resume
            tmp.rename(final)
            _fsync_dir_entries(self.root)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self.prune(keep_name=final.name)
        dist.barrier()
        return CheckpointRef(step, final)

    def clear(self) -> None:
        """A fresh (not resumed) run starts without old checkpoints, so none of them can be resumed by mistake."""
        shutil.rmtree(self.root, ignore_errors=True)

    def remove_leftovers(self) -> list[Path]:
        """Delete what interrupted writes and deletions left (temp dirs, trash, pointer temp files) and
        ``step-*`` dirs that are not complete checkpoints; returns what was removed. Rank 0 only, while no
        checkpoint is being written."""
        if not self.root.is_dir():
            return []
        interrupted = "left by an interrupted write or deletion"
        reasons = {p: interrupted for pattern in _LEFTOVERS for p in self.root.glob(pattern)}
        reasons.update({p: why for _, p in self._candidates() if (why := problem(p)) is not None})
        for path, why in reasons.items():
            log.info("removing %s (%s)", path, why)
            if path.name.startswith("step-"):
                _discard(path)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return list(reasons)

    def prune(self, keep_name: str) -> None:
        """Keep the newest ``keep`` complete checkpoints (never ``keep_name``, the one just written); drop leftovers."""
        for ref in self.complete()[:-self.keep]:
            if ref.path.name != keep_name:
                _discard(ref.path)
        self.remove_leftovers()

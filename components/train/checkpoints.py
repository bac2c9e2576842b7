"""Resumable checkpoints: DeepSpeed state + an export of the trainable parts, made visible atomically.

Layout under ``<stage output>/checkpoints[/<phase>]``::

    step-000050/
      deepspeed/state/...    engine.save_checkpoint (module, ZeRO optimizer partitions, scheduler)
      export/                the model package's checkpoint (safetensors + manifest) at this step
      state.json             step, global batch, world size, MLflow run id (written last)
    latest                   the name of the newest complete step dir (replaced atomically)

A checkpoint is written into ``.step-000050.tmp`` by every rank, then rank 0 writes
``state.json``, fsyncs, renames the directory into place and only then points ``latest`` at
it (``os.replace``). A crash at any moment leaves either the previous ``latest`` or the new
one, never a half-written checkpoint that a resume would pick up. Frozen parameters are not
saved (they come from the stage's inputs again on resume).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.train.distributed import DistInfo

log = logging.getLogger(__name__)

LATEST = "latest"
STATE = "state.json"
DS_TAG = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def _complete(path: Path) -> int | None:
    """Step of a complete checkpoint dir, else None."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return int(state["step"]) if state.get("complete") else None


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


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, keep: int):
        self.root = Path(root)
        self.keep = max(1, keep)

    def latest(self) -> CheckpointRef | None:
        """The checkpoint ``latest`` names if it is complete; else the newest complete one on disk."""
        pointer = self.root / LATEST
        if pointer.exists():
            name = pointer.read_text().strip()
            step = _complete(self.root / name)
            if step is not None:
                return CheckpointRef(step, self.root / name)
            log.warning("%s names %r, which is not a complete checkpoint; scanning", pointer, name)
        found = [(s, p) for p in self.root.glob("step-*") if _STEP_DIR.match(p.name)
                 and (s := _complete(p)) is not None] if self.root.is_dir() else []
        if not found:
            return None
        step, path = max(found)
        return CheckpointRef(step, path)

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
        dist.barrier()
        if dist.is_main:
            export(tmp / "export")
            (tmp / STATE).write_text(json.dumps({**state, "step": step, "complete": True,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                indent=2, sort_keys=True))
            _fsync_tree(tmp)
            if final.exists():  # the same step written again after a resume
                shutil.rmtree(final)
            tmp.rename(final)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self.prune(keep_name=final.name)
        dist.barrier()
        return CheckpointRef(step, final)

    def clear(self) -> None:
        """A fresh (not resumed) run starts without old checkpoints, so none of them can be resumed by mistake."""
        shutil.rmtree(self.root, ignore_errors=True)

    def prune(self, keep_name: str) -> None:
        """Keep the newest ``keep`` complete checkpoints (never the one ``latest`` names); drop stale temp dirs."""
        complete = sorted((s, p) for p in self.root.glob("step-*") if (s := _complete(p)) is not None)
        for _, path in complete[:-self.keep]:
            if path.name != keep_name:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

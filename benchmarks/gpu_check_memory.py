"""Peak memory of a stage of benchmarks/gpu_check.py: host RSS of a process tree and GPU memory in use.

A stage is a separate ``dynamicid`` process (DeepSpeed and torchrun may add children), so its memory is sampled from
outside: /proc for the RSS of the whole tree, nvidia-smi for the GPU (the increase over the value before the stage,
all processes together; torch's own counters would see only this process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path


class Peak:
    """Peak RSS of a process tree (from /proc) and of GPU memory in use (nvidia-smi), sampled every 0.2 s."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.host, self.gpu, self._stop = pid, 0, None, threading.Event()
        self._smi = shutil.which("nvidia-smi")
        self._gpu0 = self._gpu_used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _gpu_used(self) -> int | None:
        if not self._smi:
            return None
        try:
            out = subprocess.run([self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return sum(int(x) for x in out.split()) * 2**20
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _tree_rss(self) -> int:
        pids, parents = {self.pid or os.getpid()}, {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        grew = True
        while grew:
            new = {p for p, pp in parents.items() if pp in pids} - pids
            pids |= new
            grew = bool(new)
        total = 0
        for p in pids:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.host = max(self.host, self._tree_rss())
            used = self._gpu_used()
            if used is not None and self._gpu0 is not None:
                self.gpu = max(self.gpu or 0, used - self._gpu0)
            self._stop.wait(0.2)

    def stop(self) -> tuple[float, float | None]:
        self._stop.set()
        self._thread.join()
        return self.host / 2**30, None if self.gpu is None else self.gpu / 2**30


__all__ = ["Peak"]

"""torch.compile paid once: a persistent compile cache next to the checkpoints, and a watch on compile work.

**Where the cache lives.** Inductor keeps what it compiled (FX graph cache: the generated code of
each graph; AOTAutograd cache: the forward/backward split; triton's cache: the GPU kernels) under
``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``. On
a lent machine or a fresh Kubernetes pod /tmp is empty at every start, so every start, resume
included, compiled the SD1.5 UNet again (~2.5 minutes on an H200, issue 17). With
``train.compile_unet`` on, the stage points both at ``<train.STAGE.output>/compile_cache/``
(``inductor/``, ``triton/``), on the volume that already holds the checkpoints and every
process sees; a second start with the same code, torch, GPU and shapes finds its graphs and
kernels there. Dynamo's tracing of the Python code still runs on every start (it is not cached);
inductor's code generation, the C++/triton compilation and autotuning are what the cache saves.

Rules: set in every process before its first compile (each rank calls ``use_compile_cache``); a
variable the user set is left alone (``TORCHINDUCTOR_CACHE_DIR`` counts as the user's unless it
is torch's own default, which torch writes into the environment itself once it has used it);
inductor's caches are keyed by the graph, the torch version and the device, and written with
atomic renames, so ranks and nodes share one folder safely, and a changed model or torch just
adds entries. The folder is not a DVC output and a fresh run does not clear it (unlike
``checkpoints/``); delete it to reclaim the space.

Why not ``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts`` (torch >= 2.7, present
in 2.13)? They serialise the very same caches into one blob to carry to another machine; with the
caches already on the shared checkpoint volume, a blob per checkpoint would only duplicate the
kernels ``keep_checkpoints`` times.

**The watch.** ``CompileWatch`` counts and times compile work through dynamo's compile start/end
callbacks (a traced frame, a lazily compiled backward; nested events count once), and reads the
FX-graph and AOTAutograd cache hit/miss counters, so the loop can tell compile windows from steady
ones (components/train/throughput.py) and the stage can report ``compile_s`` and whether the
cache was hit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, MutableMapping

log = logging.getLogger(__name__)

CACHE_DIR = "compile_cache"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
TRITON_ENV = "TRITON_CACHE_DIR"
# (counter group, key) of torch._dynamo.utils.counters -> the name we report
_CACHE_COUNTERS = {("inductor", "fxgraph_cache_hit"): "fx_graph_cache_hits",
                   ("inductor", "fxgraph_cache_miss"): "fx_graph_cache_misses",
                   ("aot_autograd", "autograd_cache_hit"): "aot_autograd_cache_hits",
                   ("aot_autograd", "autograd_cache_miss"): "aot_autograd_cache_misses"}


@dataclass(frozen=True)
class CacheDirs:
    inductor: str
    triton: str
    ours: tuple[str, ...]   # the variables this call set (the others were the user's)


def _torch_default_inductor_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - older layouts
        return None
    return os.path.abspath(default_cache_dir())


def use_compile_cache(output: str | os.PathLike, env: MutableMapping[str, str] | None = None) -> CacheDirs:
    """Point inductor's and triton's caches at ``<output>/compile_cache`` unless the user chose other folders.

    Call in every process before its first torch.compile; returns the folders in use."""
    env = os.environ if env is None else env
    root = Path(output).resolve() / CACHE_DIR
    ours: list[str] = []
    current = env.get(INDUCTOR_ENV)
    if current is None or os.path.abspath(current) == _torch_default_inductor_dir():
        env[INDUCTOR_ENV] = str(root / "inductor")
        ours.append(INDUCTOR_ENV)
    if env.get(TRITON_ENV) is None:
        env[TRITON_ENV] = str(root / "triton")
        ours.append(TRITON_ENV)
    for name in ours:
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    dirs = CacheDirs(inductor=env[INDUCTOR_ENV], triton=env[TRITON_ENV], ours=tuple(ours))
    kept = [f"{n}={env[n]} (set by the user)" for n in (INDUCTOR_ENV, TRITON_ENV) if n not in ours]
    log.info("torch.compile cache: %s%s", ", ".join(f"{n}={env[n]}" for n in ours) or "-",
             ("; kept " + ", ".join(kept)) if kept else "")
    return dirs


def _cache_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {name: int(counters[group][key]) for (group, key), name in _CACHE_COUNTERS.items()}


class CompileWatch:
    """Counts and times torch.compile work in this process while started (see the module docstring)."""

    def __init__(self) -> None:
        self.events = 0           # compile events finished (a frame traced, a lazy backward compiled)
        self.seconds = 0.0        # wall time inside them
        self._t0: float | None = None
        self._lock = threading.Lock()
        self._handler: Any = None
        self._counts0: dict[str, int] = {}

    def _on_start(self, _args: Any) -> None:
        with self._lock:
            self._t0 = time.perf_counter()

    def _on_end(self, _args: Any) -> None:
        with self._lock:
            if self._t0 is not None:
                self.seconds += time.perf_counter() - self._t0
                self._t0 = None
            self.events += 1

    def start(self) -> "CompileWatch":
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:  # pragma: no cover - a torch without compile callbacks: the watch stays at 0
            log.warning("torch has no compile callbacks: compile windows are not detected")
            return self
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        self._handler = callback_handler
        self._counts0 = _cache_counts()
        return self

    def stop(self) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._on_start)
            self._handler.remove_end_callback(self._on_end)
            self._handler = None

    def __enter__(self) -> "CompileWatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cache(self) -> dict[str, int]:
        """FX-graph and AOTAutograd cache hits and misses since ``start`` (misses: compiled now, then stored)."""
        now = _cache_counts()
        return {k: v - self._counts0.get(k, 0) for k, v in now.items()}

    def metrics(self) -> dict[str, float]:
        return {"compile_s": self.seconds, "compile_events": float(self.events),
                **{f"compile_{k}": float(v) for k, v in self.cache().items()}}

    def describe(self) -> str:
        if not self.events:
            return "no torch.compile work"
        c = self.cache()
        hits = c.get("fx_graph_cache_hits", 0) + c.get("aot_autograd_cache_hits", 0)
        misses = c.get("fx_graph_cache_misses", 0) + c.get("aot_autograd_cache_misses", 0)
        verdict = "cache hit" if hits and not misses else "cache miss" if misses and not hits else \
            "partly cached" if hits else "no cacheable graph"
        return (f"torch.compile: {self.events} compile events, {self.seconds:.1f} s ({verdict}: "
                + ", ".join(f"{k} {v}" for k, v in c.items()) + ")")

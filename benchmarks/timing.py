"""Timing and memory helpers: CUDA events around graph replays, medians after warm-up.

On a CPU (the smoke run) the same calls fall back to wall-clock timing, so the benchmark's
code paths can be exercised without a GPU; those numbers mean nothing and are labelled so.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Stats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int

    def as_dict(self) -> dict:
        return {"median_ms": round(self.median_ms, 4), "p10_ms": round(self.p10_ms, 4),
                "p90_ms": round(self.p90_ms, 4), "reps": self.reps}


def _stats(samples: list[float]) -> Stats:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * (len(s) - 1) + 0.5))]  # noqa: E731
    return Stats(statistics.median(s), q(0.1), q(0.9), len(s))


def time_calls(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> Stats:
    """Median per-call time: CUDA events around each call (GPU time incl. launch gaps), or wall clock on CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return _stats(samples)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _stats([s.elapsed_time(e) for s, e in events])


def time_wall(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> Stats:
    """Median wall-clock latency of a host-visible operation (a whole image), synchronised."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        once()
    return _stats([once() for _ in range(reps)])


class GraphStep:
    """One UNet step captured as a CUDA graph with static inputs; a call copies new latents in,
    replays and clones the output (the same work per step as model.fast.buckets' runner)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], latents: Tensor, warmup: int = 2):
        self.latents = latents.clone()
        self.fn = fn
        if latents.device.type != "cuda":
            self.graph = None
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(self.latents)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = fn(self.latents)

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        self.latents.copy_(latents)
        if self.graph is None:
            return self.fn(self.latents)
        self.graph.replay()
        return self.out.clone()


@torch.no_grad()
def eager_peak_bytes(fn: Callable[[], object], device: torch.device, resident: Callable[[], int]) -> int | None:
    """Peak device memory of one eager call: ``resident()`` bytes (weights, static buffers) plus the
    call's transient peak above what was allocated before it. Measured as a difference so that
    whatever else the process holds (earlier variants, the caching allocator's history) does not count."""
    if device.type != "cuda":
        return None
    fn()  # first call: lazy buffers, compilation
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(resident() + torch.cuda.max_memory_allocated(device) - before)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


GIB = float(1 << 30)

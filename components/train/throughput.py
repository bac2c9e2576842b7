"""Training throughput, all-in and in steady state, from the loop's timing windows.

The loop never waits for the device inside a step; it reads the losses of a burst of steps in one
transfer (a flush, every ``train.log_every`` steps, before a checkpoint or a sample grid, and once
at the end of the warm-up). That read waits for the device, so the wall time between two flushes
is the true time of the steps in between: a *window*. Checkpoint writes and sample grids happen
between windows and are in none of them.

Two numbers come out of the windows of one process (one start or resume of a stage):

* ``samples_per_s_overall``: images of every step run now / the time of every window. This is
  the old ``samples_per_s``: it includes the first steps after the start, so on a GPU with a
  compiled UNet it includes minutes of compilation (an H200 run reported 0.52 images/s).
* ``samples_per_s_steady``: the same ratio over the *steady* windows only: a window is warm-up
  when it holds one of the first ``WARMUP_STEPS`` steps after the (re)start (the allocator
  growing, DataLoader workers starting, cuDNN choosing kernels, the first compilation), or when
  torch.compile compiled or recompiled anything while it ran (a new shape, a guard failure, a
  lazily compiled backward). A ratio of sums, not a median of window rates: windows differ in
  length (a checkpoint ends one early), and the sum weighs each step once.
* ``warmup_s``: the time of the warm-up windows (what the overall number pays on top of the
  steady rate); ``steady_steps``: how many steps the steady rate is measured on (0: the run was
  too short, and no steady rate is reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Steps after each (re)start that never count as steady: enough for the first compile (step 1)
# and the allocator and kernel choices to settle; small enough for short CPU runs to have some.
WARMUP_STEPS = 3


@dataclass(frozen=True)
class Window:
    first: int       # first optimizer step (1-based) in the window
    steps: int
    seconds: float
    compiled: bool   # torch.compile compiled something while the window ran


@dataclass
class Throughput:
    """The windows of one process's run of the loop, and the rates derived from them."""

    images_per_step: int                  # the global batch (all processes together)
    start: int                            # the step the run (re)started from (0: a fresh run)
    warmup_steps: int = WARMUP_STEPS
    windows: list[Window] = field(default_factory=list)

    @property
    def warmup_end(self) -> int:
        """The last step that is warm-up by position; the loop flushes after it so that no window straddles it."""
        return self.start + self.warmup_steps

    def add(self, first: int, steps: int, seconds: float, compiled: bool = False) -> Window:
        window = Window(first, steps, seconds, compiled)
        self.windows.append(window)
        return window

    def is_warmup(self, w: Window) -> bool:
        return w.first <= self.warmup_end or w.compiled

    def _rate(self, windows: list[Window]) -> float | None:
        seconds = sum(w.seconds for w in windows)
        if not windows or seconds <= 0:
            return None
        return self.images_per_step * sum(w.steps for w in windows) / seconds

    @property
    def overall(self) -> float:
        return self._rate(self.windows) or 0.0

    @property
    def steady(self) -> float | None:
        return self._rate([w for w in self.windows if not self.is_warmup(w)])

    @property
    def steady_steps(self) -> int:
        return sum(w.steps for w in self.windows if not self.is_warmup(w))

    @property
    def warmup_s(self) -> float:
        return sum(w.seconds for w in self.windows if self.is_warmup(w))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The numbers for metrics.json and MLflow; ``samples_per_s`` is kept (= overall) for existing readers."""
        out = {f"{prefix}samples_per_s": self.overall, f"{prefix}samples_per_s_overall": self.overall,
               f"{prefix}warmup_s": self.warmup_s, f"{prefix}steady_steps": float(self.steady_steps)}
        steady = self.steady
        if steady is not None:
            out[f"{prefix}samples_per_s_steady"] = steady
        return out

    def describe(self) -> str:
        steady = self.steady
        return (f"{steady:.2f} images/s steady over {self.steady_steps} steps" if steady is not None
                else "no steady-state window (run too short)") + (
            f", {self.overall:.2f} overall, warm-up {self.warmup_s:.1f} s")

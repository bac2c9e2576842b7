"""Back-pressure and dynamic batching inside the model server (asyncio, no model code).

Why our own batcher rather than KServe's: KServe's batcher is an agent sidecar in the cluster
that concatenates v1 ``instances`` of whatever requests arrive. Diffusion requests can only share a
UNet batch when their latent size, step count, identity count and guidance mode agree, the
sidecar cannot see those, it does not exist for ``dynamicid serve`` on a laptop or for the v2
protocol, and it cannot count the server's own queue for the 503 bound. This one groups by that
key, so the same code batches v1 and v2 requests, locally and in the pod.

- AdmissionGate: a non-blocking counter of admitted work; past its capacity the caller answers
  503 at once instead of queueing without bound.
- Batcher: one consumer that runs one batch at a time (one model, one GPU). The oldest group is
  dispatched when it is full or when its first request has waited ``window_s``; while a batch
  runs, new requests pile up and the next batch is fuller, so throughput grows with load. The
  window only holds a group while more requests are on their way (``expected``: admitted, still
  being validated or encoded): a request with nothing behind it would wait the whole window for
  company that cannot come (a lone client paid it on every image).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class AdmissionGate:
    """Counts admitted units of work (event-loop thread only, so no lock)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    def try_acquire(self, n: int = 1) -> bool:
        if self.in_use + n > self.capacity:
            return False
        self.in_use += n
        return True

    def release(self, n: int = 1) -> None:
        self.in_use = max(0, self.in_use - n)


@dataclass
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class Batcher(Generic[K, T, R]):
    """Groups submitted items by key into batches of at most ``max_batch_size`` for ``run``.

    ``run(key, items)`` returns one result per item, in order. If a batch of several fails as a
    whole, its items are retried one by one, so one poisoned item cannot fail the others.
    """

    def __init__(self, run: Callable[[K, list[T]], Awaitable[list[R]]], max_batch_size: int, window_s: float,
                 on_batch: Callable[[int], None] | None = None, expected: Callable[[], int] | None = None) -> None:
        self._run = run
        self._expected = expected  # items on their way (None: unknown, always hold the window)
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._on_batch = on_batch
        self._groups: dict[K, list[_Entry[T, R]]] = {}
        self._wake = asyncio.Event()
        self._consumer: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return sum(len(g) for g in self._groups.values())

    async def submit(self, key: K, item: T) -> R:
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.get_running_loop().create_task(self._consume(), name="dynamicid-batcher")
        entry: _Entry[T, R] = _Entry(item, asyncio.get_running_loop().create_future())
        self._groups.setdefault(key, []).append(entry)
        self._wake.set()
        return await entry.future  # cancelling the caller cancels the future: the consumer skips it

    def nudge(self) -> None:
        """Re-evaluate the waiting groups now (an expected item will not come after all)."""
        self._wake.set()

    async def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            try:
                await self._consumer
            except asyncio.CancelledError:
                pass

    def _next_batch(self) -> tuple[K, list[_Entry[T, R]]] | float | None:
        """The batch to run now, else seconds until the oldest group's window closes (None: idle)."""
        for key in list(self._groups):
            self._groups[key] = [e for e in self._groups[key] if not e.future.done()]
            if not self._groups[key]:
                del self._groups[key]
        if not self._groups:
            return None
        key = min(self._groups, key=lambda k: self._groups[k][0].arrival)
        group = self._groups[key]
        wait = group[0].arrival + self.window_s - time.monotonic()
        if len(group) < self.max_batch_size and wait > 0 and (self._expected is None or self._expected() > 0):
            return wait
        batch, rest = group[: self.max_batch_size], group[self.max_batch_size:]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        return key, batch

    async def _consume(self) -> None:
        while True:
            nxt = self._next_batch()
            if not isinstance(nxt, tuple):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), nxt)  # a new arrival may fill the group
                except TimeoutError:
                    pass
                continue
            key, batch = nxt
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                await self._dispatch(key, batch)
            except asyncio.CancelledError:
                for e in batch:
                    e.future.cancel()
                raise

    async def _dispatch(self, key: K, batch: list[_Entry[T, R]]) -> None:
        try:
            results = await self._run(key, [e.item for e in batch])
        except Exception as err:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) == 1:
                _settle(batch[0], error=err)
                return
            log.warning("batch of %d failed (%s: %s); retrying one by one", len(batch), type(err).__name__, err)
            for e in batch:
                if not e.future.done():
                    await self._dispatch(key, [e])
            return
        for e, r in zip(batch, results):
            _settle(e, result=r)


def _settle(entry: _Entry, result=None, error: BaseException | None = None) -> None:
    if entry.future.done():
        return
    if error is not None:
        entry.future.set_exception(error)
    else:
        entry.future.set_result(result)


__all__ = ["AdmissionGate", "Batcher"]

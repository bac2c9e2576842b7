"""The server's admission bound and dynamic batcher, on plain asyncio with real coroutines."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.batching import AdmissionGate, Batcher


def test_admission_gate_refuses_past_capacity_and_frees_on_release():
    gate = AdmissionGate(3)
    assert gate.try_acquire(2) and gate.try_acquire(1)
    assert not gate.try_acquire(1) and gate.in_use == 3
    gate.release(2)
    assert not gate.try_acquire(3) and gate.try_acquire(2) and gate.in_use == 3


class Recorder:
    """A batch function that records what it was given and can be slow or fail on a marked item."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[object, list]] = []
        self.delay = delay

    async def __call__(self, key, items: list) -> list:
        self.batches.append((key, list(items)))
        await asyncio.sleep(self.delay)
        if "bad" in items:
            raise ValueError("poisoned batch")
        return [f"{key}:{item}" for item in items]


def test_same_key_items_share_batches_up_to_the_limit_in_arrival_order():
    async def go():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=2, window_s=0.05)
        results = await asyncio.gather(*[b.submit("k", i) for i in range(5)])
        await b.close()
        return rec, results

    rec, results = asyncio.run(go())
    assert results == [f"k:{i}" for i in range(5)]
    assert [items for _, items in rec.batches] == [[0, 1], [2, 3], [4]]


def test_the_window_holds_a_group_only_while_more_items_are_on_their_way():
    """A lone request does not wait the window for company that cannot come; with one on its way
    (still being encoded) the group waits for it, and goes once it arrives or is given up."""
    async def go():
        rec, coming = Recorder(), [0]
        b = Batcher(rec, max_batch_size=4, window_s=600.0, expected=lambda: coming[0])
        alone = await asyncio.wait_for(b.submit("k", 1), 30)  # far inside the window
        coming[0] = 1
        held = asyncio.ensure_future(b.submit("k", 2))
        await asyncio.sleep(0.3)
        was_held = not held.done()
        coming[0] = 0
        pair = await asyncio.wait_for(asyncio.gather(held, b.submit("k", 3)), 30)
        coming[0] = 1
        late = asyncio.ensure_future(b.submit("k", 4))
        await asyncio.sleep(0.3)
        coming[0] = 0  # the expected one failed before reaching the batcher
        b.nudge()
        last = await asyncio.wait_for(late, 30)
        await b.close()
        return rec, alone, was_held, pair, last

    rec, alone, was_held, pair, last = asyncio.run(go())
    assert alone == "k:1" and was_held and pair == ["k:2", "k:3"] and last == "k:4"
    assert [items for _, items in rec.batches] == [[1], [2, 3], [4]]


def test_different_keys_never_mix():
    async def go():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=8, window_s=0.05)
        results = await asyncio.gather(*[b.submit(("size", i % 2), i) for i in range(6)])
        await b.close()
        return rec, results

    rec, results = asyncio.run(go())
    assert results == [f"('size', {i % 2}):{i}" for i in range(6)]
    assert sorted((key, items) for key, items in rec.batches) == [(("size", 0), [0, 2, 4]), (("size", 1), [1, 3, 5])]


def test_lone_request_waits_the_window_but_a_full_batch_does_not():
    async def go():
        b = Batcher(Recorder(), max_batch_size=2, window_s=0.3)
        t = time.monotonic()
        await b.submit("k", 0)
        lone = time.monotonic() - t
        b.window_s = 5.0
        t = time.monotonic()
        await asyncio.gather(b.submit("k", 1), b.submit("k", 2))
        full = time.monotonic() - t
        await b.close()
        return lone, full

    lone, full = asyncio.run(go())
    assert 0.29 <= lone < 2.0
    assert full < 1.0  # dispatched as soon as it held max_batch_size items, not after 5 s


def test_a_poisoned_item_fails_alone():
    async def go():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=4, window_s=0.05)
        out = await asyncio.gather(b.submit("k", "a"), b.submit("k", "bad"), b.submit("k", "c"),
                                   return_exceptions=True)
        await b.close()
        return rec, out

    rec, out = asyncio.run(go())
    assert out[0] == "k:a" and out[2] == "k:c"
    assert isinstance(out[1], ValueError)
    assert [items for _, items in rec.batches] == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_cancelled_request_is_dropped_before_its_batch_runs():
    async def go():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=4, window_s=0.2)
        gone = asyncio.create_task(b.submit("k", "gone"))
        kept = asyncio.create_task(b.submit("k", "kept"))
        await asyncio.sleep(0.05)
        gone.cancel()
        result = await kept
        await b.close()
        return rec, result, gone

    rec, result, gone = asyncio.run(go())
    assert result == "k:kept" and gone.cancelled()
    assert [items for _, items in rec.batches] == [["kept"]]


def test_arrivals_during_a_running_batch_form_the_next_one():
    """Under load batches fill up: what arrives while the model is busy goes out together."""
    async def go():
        rec = Recorder(delay=0.3)
        sizes: list[int] = []
        b = Batcher(rec, max_batch_size=8, window_s=0.01, on_batch=sizes.append)
        first = asyncio.create_task(b.submit("k", 0))
        await asyncio.sleep(0.1)  # the first batch is running now
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(1, 5)]
        await asyncio.gather(first, *rest)
        await b.close()
        return sizes, b.pending

    sizes, pending = asyncio.run(go())
    assert sizes == [1, 4] and pending == 0


@pytest.mark.parametrize("window", [0.0, 0.02])
def test_every_submission_gets_exactly_its_own_result(window):
    async def go():
        b = Batcher(Recorder(), max_batch_size=3, window_s=window)
        keys = [i % 3 for i in range(20)]
        out = await asyncio.gather(*[b.submit(k, i) for i, k in enumerate(keys)])
        await b.close()
        return keys, out

    keys, out = asyncio.run(go())
    assert out == [f"{k}:{i}" for i, k in enumerate(keys)]

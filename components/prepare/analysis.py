"""Plan and analyse phases of ``dynamicid prepare``: per-image records with their cache state, and the worker pool.

Plan: one small record per image (known before any image is read), cached when a result for
(file hash, params, annotation) exists. Analyse: only the uncached images, in a spawned pool with
bounded in-flight work; hashes are committed as they come (components.prepare.stage describes
the whole run).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from components.prepare.results import ItemSettings, ResultStore, WorkItem
    from components.prepare.source import SourceIndex


BATCH = 4  # images per pool task: amortises IPC, keeps the tail short


def _records(entries, index: "SourceIndex", store: "ResultStore", settings: "ItemSettings",
             detection_check: int) -> tuple[list[dict[str, Any]], int]:
    """One small record per image (what is known before any image is read)."""
    from components.prepare.results import item_key
    from components.prepare.source import escapes_root

    records: list[dict[str, Any]] = []
    for e in entries:
        ann = index.annotation(e.path)
        sha = index.known_sha(e.path, e.fingerprint)
        rec: dict[str, Any] = {"path": e.path, "entry": e, "digest": ann[1] if ann else "", "sha256": sha,
                               "key": None, "check": False, "meta": None}
        if e.problem is not None:  # known from the listing (link out of the root, non-UTF-8 name, FIFO ...)
            rec["meta"] = {"status": "reject", "reason": e.problem[0], "detail": e.problem[1]}
        elif escapes_root(e.path):
            rec["meta"] = {"status": "reject", "reason": "unsafe_path", "detail": f"key {e.key!r} leaves the input root"}
        elif "/" not in e.path:
            rec["meta"] = {"status": "reject", "reason": "no_identity",
                           "detail": "images must be in <root>/<identity>/ folders"}
        elif sha is not None:
            rec["key"] = item_key(sha, settings.params_key, rec["digest"])
        records.append(rec)
    annotated = [r for r in records if r["digest"] and r["meta"] is None]
    annotated.sort(key=lambda r: hashlib.sha256(r["path"].encode()).hexdigest())
    for r in annotated[:detection_check]:
        r["check"] = True
    cached = 0
    for r in records:
        r["cached"] = r["meta"] is not None or (r["key"] is not None and store.has(r["key"], check=r["check"]))
        cached += r["cached"] and r["meta"] is None
    return records, cached


def _work_items(todo: list[dict[str, Any]], index: "SourceIndex") -> Iterator["WorkItem"]:
    from components.prepare.results import WorkItem

    for r in todo:
        e = r["entry"]
        ann = index.annotation(e.path) if r["digest"] else None
        yield WorkItem(path=e.path, key=e.key, size=e.size, fingerprint=e.fingerprint,
                       annotation=ann[0] if ann else None, ann_digest=r["digest"], check=r["check"])


def _batches(items: Iterator["WorkItem"], size: int) -> Iterator[list["WorkItem"]]:
    batch: list[WorkItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pool_size(requested: int, todo: int) -> int:
    if todo == 0:
        return 0
    if requested == 0:  # auto: all cores, unless spawning workers costs more than it saves
        requested = (os.cpu_count() or 1) if todo >= 64 else 1
    return max(1, min(requested, -(-todo // BATCH)))


def _analyse(todo: list[dict[str, Any]], index: "SourceIndex", settings: "ItemSettings", source, workers: int,
             progress: bool) -> Iterator[dict[str, Any]]:
    """Outcomes of the images that need work, in completion order, with bounded in-flight work."""
    from tqdm import tqdm

    from components.core.errors import UserError
    from components.prepare.item import (
        AnalyzerUnavailable,
        ItemProcessor,
        init_worker,
        run_batch,
    )

    bar = tqdm(total=len(todo), unit="img", desc="prepare", disable=not progress)
    batches = _batches(_work_items(todo, index), BATCH)
    try:
        if workers <= 1:
            proc = ItemProcessor(settings, source)
            for batch in batches:
                for item in batch:
                    yield proc(item)
                bar.update(len(batch))
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        ctx = multiprocessing.get_context("spawn")  # safe with threads (torch, dlib, boto3) in the parent
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                 initargs=(settings, source)) as pool:
            pending = set()
            exhausted = False
            try:
                while pending or not exhausted:
                    while not exhausted and len(pending) < 2 * workers:
                        batch = next(batches, None)
                        if batch is None:
                            exhausted = True
                        else:
                            pending.add(pool.submit(run_batch, batch))
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        outcomes = fut.result()
                        bar.update(len(outcomes))
                        yield from outcomes
            except BrokenProcessPool as err:
                raise RuntimeError(f"a prepare worker died ({err}); finished images are kept, rerun to resume") from None
            finally:
                for fut in pending:
                    fut.cancel()
    except AnalyzerUnavailable as err:
        raise UserError(f"face backend: {err}") from None
    finally:
        bar.close()


def _run_analysis(todo: list[dict[str, Any]], index: "SourceIndex", settings: "ItemSettings", source,
                  workers: int, progress: bool) -> int:
    """Analyse ``todo``, recording hashes/keys (and uncached rejects) in the records; returns how many
    images needed real work. Hashes are committed every 2 s: a kill loses at most those, and the
    next run finds their results again by content."""
    analysed = 0
    by_path = {r["path"]: r for r in todo}
    last_commit = time.monotonic()
    for outcome in _analyse(todo, index, settings, source, workers, progress):
        rec = by_path[outcome["path"]]
        rec.update(sha256=outcome["sha256"], key=outcome["key"])
        if outcome["key"] is None:  # uncached reject (I/O, size, unexpected error)
            rec["meta"] = outcome["meta"]
        if outcome["sha256"]:
            index.remember([(outcome["path"], outcome["fingerprint"], outcome["sha256"])])
        analysed += outcome["analysed"]
        if time.monotonic() - last_commit > 2.0:
            index.commit()
            last_commit = time.monotonic()
    index.commit()
    return analysed

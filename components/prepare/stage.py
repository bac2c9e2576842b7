"""``dynamicid prepare``: raw face photos -> prepared shards, index, splits, report and rejects.

Input (docs/data.md): ``<root>/<identity>/<image>.{jpg,jpeg,png,webp}`` plus optional
``<root>/annotations.jsonl`` and ``<root>/captions.jsonl``; ``root`` is a directory or an
``s3://bucket/prefix``. Output: the shard format of ``components.core.shards`` (written by
``write_shards``) plus ``rejects.jsonl``, ``data_report.json`` and ``histograms.png``.

How the run is organised, and why:

1. *Plan* (main process): list the source, import the side files into a SQLite index, and for
   every image look up whether a result for (file hash, params, annotation) already exists.
   The file hash is remembered by fingerprint (size + mtime / ETag), so a rerun over unchanged
   files reads nothing and analyses nothing.
2. *Analyse* (spawned worker pool, one per core, models loaded once per worker): only the
   images without a cached result; in-flight work is bounded, each result is written atomically
   to the content-addressed work directory by the worker itself. A run killed at any point
   resumes with only the missing images.
3. *Assemble* (main process): exact duplicates, identity splits, then shards streamed from the
   cached results one row at a time (blobs are never all in memory), rejects, report, plot.
   The outputs depend only on the input and params, so a resumed run writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from components.core.config import Params
    from components.prepare.item import ItemSettings, ResultStore, WorkItem
    from components.prepare.source import SourceIndex

log = logging.getLogger(__name__)

REJECTS = "rejects.jsonl"
REPORT = "data_report.json"
PLOT = "histograms.png"
BATCH = 4  # images per pool task: amortises IPC, keeps the tail short
LANDMARK_FORMATS = {68: "ibug68", 106: "2d106"}


# --------------------------------------------------------------------------------------------
# Settings


def _backend_spec(face, backend: str) -> dict[str, Any]:
    """What identifies the face models (part of the result key): versions / pack files."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(*names: str) -> str | None:
        for n in names:
            try:
                return version(n)
            except PackageNotFoundError:
                continue
        return None

    if backend == "dlib":
        return {"detector": face.dlib.detector, "upsample": face.dlib.upsample,
                "dlib": ver("dlib-bin", "dlib"), "models": ver("face-recognition-models")}
    pack = (Path(face.insightface.root).expanduser() / "models" / face.insightface.name).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in pack.glob("*.onnx")) if pack.is_dir() else []
    return {"pack": str(pack), "det_size": face.insightface.det_size, "files": files,
            "insightface": ver("insightface")}


def item_settings(params: "Params", work_dir: Path) -> "ItemSettings":
    from components.prepare.item import PREPARE_VERSION, ItemSettings

    pp, active = params.prepare, params.model.active
    backend = params.face.resolved_backend(params.model.profile)
    spec = {
        "version": PREPARE_VERSION, "backend": backend, "models": _backend_spec(params.face, backend),
        "image_size": pp.image_size or active.resolution, "crop_size": pp.crop_size or active.face_crop_size,
        "landmark_size": active.imr.landmark_size, "min_face_size": params.face.min_face_size,
        "one_face": pp.one_face, "max_pixels": pp.max_pixels,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    face = params.face.model_copy(update={"backend": backend})
    return ItemSettings(
        face=face.model_dump(mode="json"), profile=params.model.profile, image_size=spec["image_size"],
        crop_size=spec["crop_size"], landmark_size=spec["landmark_size"], min_face_size=params.face.min_face_size,
        one_face=pp.one_face, max_bytes=int(pp.max_file_mb * 1024 * 1024),
        max_pixels=pp.max_pixels, work_dir=str(work_dir), params_key=key,
    )


def work_dir_for(params: "Params") -> Path:
    return Path(params.prepare.work_dir or Path(params.storage.cache_dir) / "prepare").expanduser()


# --------------------------------------------------------------------------------------------
# Splits


def _count(fraction: float, n: int) -> int:
    """Identities for a held-out split: round(fraction * n), at least one when asked for at all."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(fraction * n)), n - 1)


def assign_splits(identities: list[str], test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """identity -> train / val / test. Identities are ranked by sha256(seed, name), so the split of
    a person depends on the seed and their name only, never on file order or worker timing."""
    order = sorted(identities, key=lambda i: hashlib.sha256(f"{seed}\n{i}".encode()).hexdigest())
    n = len(order)
    n_test = _count(test_fraction, n)
    n_val = min(_count(val_fraction, n), max(n - n_test - 1, 0))
    return {name: "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, name in enumerate(order)}


# --------------------------------------------------------------------------------------------
# Rows streamed into write_shards


class _ResultCache:
    """The last item's meta + blobs: write_shards reads a row's columns one after another, so one
    entry is enough and blobs of other rows are never held."""

    def __init__(self, store: "ResultStore"):
        self.store = store
        self._key: str | None = None
        self._value: tuple[dict[str, Any], dict[str, Any]] = ({}, {})

    def get(self, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if key != self._key:
            self._value = (self.store.meta(key), self.store.blobs(key))
            self._key = key
        return self._value


class _Row(Mapping):
    """A shard row whose heavy columns are read from the result store only when accessed."""

    __slots__ = ("_cache", "_result", "_fixed", "_caption")
    _BLOBS = ("pixels", "face_crop", "landmark_image", "embedding", "landmarks")
    _META = ("face_box", "yaw", "pitch", "roll", "expression", "face_prompt")
    _COLUMNS = ("key", "identity", "image", "split", "caption") + _BLOBS + _META

    def __init__(self, cache: _ResultCache, result: str, fixed: dict[str, str], caption):
        self._cache, self._result, self._fixed, self._caption = cache, result, fixed, caption

    def __getitem__(self, column: str) -> Any:
        if column in self._fixed:
            return self._fixed[column]
        if column == "caption":
            return self._caption(self._fixed["image"])
        meta, blobs = self._cache.get(self._result)
        if column == "key":
            return meta["sha256"]
        if column in self._BLOBS:
            return blobs[column]
        if column in self._META:
            return meta[column]
        raise KeyError(column)

    def __iter__(self) -> Iterator[str]:
        return iter(self._COLUMNS)

    def __len__(self) -> int:
        return len(self._COLUMNS)


# --------------------------------------------------------------------------------------------
# The stage


def _records(entries, index: "SourceIndex", store: "ResultStore", settings: "ItemSettings",
             detection_check: int) -> tuple[list[dict[str, Any]], int]:
    """One small record per image (what is known before any image is read)."""
    from components.prepare.item import item_key
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
    from components.prepare.item import WorkItem

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
    from components.prepare.item import AnalyzerUnavailable, ItemProcessor, init_worker, run_batch

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


def _run_key(params_key: str, params: "Params", records: list[dict[str, Any]], splits: dict[str, str],
             index: "SourceIndex", input_uri: str) -> str:
    h = hashlib.sha256()
    pp = params.prepare
    h.update(json.dumps({"params": params_key, "input": input_uri, "shard_size": pp.shard_size,
                         "caption": pp.default_caption, "splits": [pp.test_fraction, pp.val_fraction, pp.split_seed]},
                        sort_keys=True).encode())
    for r in records:
        status = r["meta"]["reason"] if r["meta"]["status"] == "reject" else "ok"
        caption = index.caption(r["path"]) if status == "ok" else ""
        line = f"\n{r['path']}\t{r['key']}\t{status}\t{r['meta'].get('detail', '')}\t{caption}"
        h.update(line.encode("utf-8", "backslashreplace"))
    h.update(json.dumps(splits, sort_keys=True).encode())
    return h.hexdigest()


def _up_to_date(out: Path, run_key: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        report = json.loads((out / REPORT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (manifest.get("prepare_key") == report.get("prepare_key") == run_key
            and (out / REJECTS).is_file() and (out / PLOT).is_file() and (out / "index.parquet").is_file())


def _check_locations(input_uri: str, output: str) -> None:
    from components.core.errors import UserError
    from components.core.storage import is_s3

    if is_s3(output):
        raise UserError(f"prepare writes a local directory; got {output!r} (track it with dvc and push to the remote)")
    out = Path(output)
    if not is_s3(input_uri):
        root = Path(input_uri).expanduser()
        if not root.is_dir():
            raise UserError(f"input {input_uri!r} is not a directory (data.raw or --input)")
        if out.resolve().is_relative_to(root.resolve()):
            raise UserError(f"output {out} lies inside the input {root}: it would be read as input next time")


def _open_input(input_uri: str, params: "Params", work: Path):
    """(source, all entries, side-file entries, SourceIndex with the side files imported, side-file stats)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from components.core.errors import UserError
    from components.prepare.source import ANNOTATIONS, CAPTIONS, SourceIndex, open_source
    from components.core.storage import StorageError, is_s3

    try:
        source = open_source(input_uri, params.storage)
    except StorageError as err:  # a malformed s3:// URI
        raise UserError(f"prepare input {input_uri!r}: {err}") from None
    where = input_uri if is_s3(input_uri) else str(Path(input_uri).expanduser().resolve())
    index = SourceIndex(work / "sources" / f"{hashlib.sha256(where.encode()).hexdigest()[:16]}.sqlite")
    try:
        entries = source.entries()
        side_entries = {e.path: e for e in entries if e.path in (ANNOTATIONS, CAPTIONS)}
        side = {name: index.sync_side_file(name, side_entries[name].fingerprint if name in side_entries else None,
                                           source.lines(name) if name in side_entries else None)
                for name in (ANNOTATIONS, CAPTIONS)}
    except (BotoCoreError, ClientError, StorageError) as err:
        index.close()
        raise UserError(f"cannot list {input_uri}: {type(err).__name__}: {err}") from None
    return source, entries, side_entries, index, side


def _fail_on_unread_objects(input_uri: str, records: list[dict[str, Any]]) -> None:
    """An object store that still fails after retries is an outage, not bad data: quarantining its
    objects would publish a data set silently missing them. Nothing is written; the analyses done
    so far are cached, so the rerun only reads what is missing."""
    from components.core.errors import UserError
    from components.core.storage import is_s3

    if not is_s3(input_uri):
        return  # a local file that cannot be read (dangling link, permissions) is that file's problem
    unread = sorted(r["path"] for r in records if r["meta"] and r["meta"].get("reason") == "read_error")
    if unread:
        raise UserError(f"{len(unread)} object(s) of {input_uri} could not be read after retries "
                        f"(first: {unread[0]}: {_records_detail(records, unread[0])}); nothing was written, "
                        "rerun when the store is healthy (finished analyses are cached)")


def _records_detail(records: list[dict[str, Any]], path: str) -> str:
    return next(str(r["meta"].get("detail", "")) for r in records if r["path"] == path)[:300]


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


def _classify(records: list[dict[str, Any]], store: "ResultStore", report) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Final status of every image (duplicates decided here), fed to the report; returns the accepted
    records and samples per identity. Accepted records keep no result data (re-read per row)."""
    # Duplicates only among usable copies: two empty or two truncated files keep their own reason.
    # Metas of usable results are read again below rather than all held at once.
    winners: dict[str, tuple[bool, str]] = {}
    for r in records:
        if r["meta"] is None and (meta := store.meta(r["key"]))["status"] != "ok":
            r["meta"] = meta
        if r["meta"] is None:
            cand = (not r["digest"], r["path"])  # annotated copy first, then path order
            winners[r["sha256"]] = min(winners.get(r["sha256"], cand), cand)
    per_identity: dict[str, int] = {}
    accepted: list[dict[str, Any]] = []
    for r in records:
        if r["meta"] is None and winners[r["sha256"]][1] != r["path"]:
            r["meta"] = {"status": "reject", "reason": "duplicate", "detail": f"same bytes as {winners[r['sha256']][1]}"}
        if r["meta"] is None:
            r["meta"] = store.meta(r["key"])
        if r["meta"]["status"] != "ok":
            report.add_reject(r["meta"]["reason"])
            continue
        identity = r["path"].split("/", 1)[0]
        per_identity[identity] = per_identity.get(identity, 0) + 1
        report.add_sample(r["meta"], identity)
        r["dims"] = (r["meta"]["embedding_dim"], r["meta"]["landmark_count"])
        if r["check"] and (check := store.check(r["key"])) is not None:
            report.add_check(check)
        r["meta"] = {"status": "ok"}
        accepted.append(r)
    return accepted, per_identity


def _write_outputs(out: Path, *, records, accepted, splits, store, index, report, settings, params, run_key: str,
                   input_uri: str, entries: int, images: int, side_entries: int, side: dict[str, Any]) -> None:
    """Shards (streamed), rejects, plot, then the report (its prepare_key marks completion)."""
    from components.prepare.report import plot_histograms, write_json_atomic
    from components.prepare.source import printable
    from components.core.shards import write_shards

    pp = params.prepare
    cache = _ResultCache(store)

    def caption(image: str) -> str:
        return index.caption(image) or pp.default_caption

    rows = [_Row(cache, r["key"], {"identity": r["path"].split("/", 1)[0], "image": r["path"],
                                   "split": splits[r["path"].split("/", 1)[0]]}, caption) for r in accepted]
    embedding_dim, landmark_count = accepted[0]["dims"] if accepted else (0, 0)
    write_shards(out, rows, pp.shard_size, manifest_extra={
        "prepare_key": run_key, "source": input_uri, "face_backend": settings.face["backend"],
        "image_size": settings.image_size, "crop_size": settings.crop_size,
        "landmark_size": settings.landmark_size, "landmark_format": LANDMARK_FORMATS.get(landmark_count),
    })
    tmp = out / f".{REJECTS}.tmp"
    with tmp.open("w") as fh:
        for r in records:
            if r["meta"]["status"] != "ok":
                fh.write(json.dumps({"image": printable(r["path"]), "reason": r["meta"]["reason"],
                                     "detail": printable(r["meta"].get("detail", ""))}) + "\n")
    tmp.replace(out / REJECTS)
    settings_view = {"image_size": settings.image_size, "crop_size": settings.crop_size,
                     "landmark_size": settings.landmark_size, "min_face_size": settings.min_face_size,
                     "one_face": settings.one_face, "test_fraction": pp.test_fraction, "val_fraction": pp.val_fraction,
                     "split_seed": pp.split_seed, "default_caption": pp.default_caption}
    data_report = report.finish(splits=splits, input_uri=input_uri, files=entries, images=images,
                                ignored=entries - images - side_entries, side_files=side, prepare_key=run_key,
                                settings=settings_view, embedding_dim=embedding_dim)
    plot_histograms(data_report, out / PLOT)
    write_json_atomic(out / REPORT, data_report)


def prepare(input_uri: str | os.PathLike[str], output: str | os.PathLike[str], params: "Params", *,
            workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Prepare ``input_uri`` into ``output``; returns a summary (counts, work done, throughput)."""
    from components.core.errors import UserError
    from components.prepare.item import ResultStore
    from components.prepare.report import ReportBuilder

    started = time.perf_counter()
    input_uri, out = str(input_uri), Path(output)
    _check_locations(input_uri, str(output))
    work = work_dir_for(params)
    settings = item_settings(params, work)
    source, entries, side_entries, index, side = _open_input(input_uri, params, work)
    try:
        images = [e for e in entries if e.is_image]
        if not images:
            raise UserError(f"no images under {input_uri} (expected <root>/<identity>/<image>.jpg|jpeg|png|webp)")
        store = ResultStore(work)
        records, cached = _records(images, index, store, settings, params.prepare.detection_check)
        todo = [r for r in records if not r["cached"]]
        n_workers = _pool_size(params.prepare.workers if workers is None else workers, len(todo))
        log.info("prepare: %d images, %d cached, %d to analyse with %d worker(s)", len(images), cached, len(todo),
                 n_workers)
        t0 = time.perf_counter()
        analysed = _run_analysis(todo, index, settings, source, n_workers, progress)
        analyse_s = time.perf_counter() - t0

        report = ReportBuilder(settings.face["backend"])
        accepted, per_identity = _classify(records, store, report)
        _fail_on_unread_objects(input_uri, records)
        pp = params.prepare
        splits = assign_splits(sorted(per_identity), pp.test_fraction, pp.val_fraction, pp.split_seed)
        run_key = _run_key(settings.params_key, params, records, splits, index, input_uri)
        out.mkdir(parents=True, exist_ok=True)
        up_to_date = _up_to_date(out, run_key)
        if not up_to_date:
            _write_outputs(out, records=records, accepted=accepted, splits=splits, store=store, index=index,
                           report=report, settings=settings, params=params, run_key=run_key, input_uri=input_uri,
                           entries=len(entries), images=len(images), side_entries=len(side_entries), side=side)
    finally:
        index.close()
    rejects = dict(sorted(report.rejects.items()))
    summary = {
        "output": str(out), "images": len(images), "accepted": len(accepted), "rejected": len(records) - len(accepted),
        "rejects": rejects, "identities": len(per_identity),
        "splits": {s: sum(per_identity[i] for i, v in splits.items() if v == s) for s in ("train", "val", "test")},
        "analysed": analysed, "cached": len(images) - len(todo), "workers": n_workers, "up_to_date": up_to_date,
        "seconds": round(time.perf_counter() - started, 2), "analyse_seconds": round(analyse_s, 2),
        "images_per_s": round(analysed / analyse_s, 2) if analysed and analyse_s > 0 else None,
    }
    if not accepted:
        raise UserError(f"no image of {input_uri} was accepted; reasons in {out / REJECTS}: {rejects}")
    return summary


def summary_line(s: dict[str, Any]) -> str:
    rejects = ", ".join(f"{k} {v}" for k, v in s["rejects"].items()) or "none"
    work = (f"{s['analysed']} analysed, {s['cached']} cached" + (f" ({s['images_per_s']} img/s analysing)"
                                                                  if s["images_per_s"] else ""))
    state = "outputs up to date" if s["up_to_date"] else f"wrote {s['output']}"
    sp = s["splits"]
    return (f"prepare: {s['images']} images -> {s['accepted']} samples of {s['identities']} identities "
            f"(train {sp['train']}, val {sp['val']}, test {sp['test']}); {s['rejected']} rejected ({rejects}); "
            f"{work}; {s['seconds']} s; {state}")


# --------------------------------------------------------------------------------------------
# CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="raw face photos -> prepared shards, identity splits, report and rejects",
        description=(
            "Analyse every face photo and write the prepared data set (docs/data.md):\n"
            "  input   <root>/<identity>/<image>.jpg|jpeg|png|webp, optional <root>/annotations.jsonl\n"
            "          (box, 5 keypoints, landmarks, pose, expression) and <root>/captions.jsonl;\n"
            "          <root> is a directory or s3://bucket/prefix (endpoint/region: storage.* or AWS_*)\n"
            "  output  shards/part-*.parquet, index.parquet, manifest.json (components/core/shards.py),\n"
            "          rejects.jsonl, data_report.json, histograms.png\n"
            "Annotated images skip detection (the recogniser embeds the crop aligned from their keypoints);\n"
            "others are detected with the face backend (face.backend: dlib | insightface).\n"
            "Bad files never stop the run: they go to rejects.jsonl with a reason."
        ),
        epilog=(
            "Work is content-addressed in prepare.work_dir (default <storage.cache_dir>/prepare): a rerun\n"
            "on unchanged input analyses nothing, and a run killed midway resumes where it stopped.\n"
            "Settings: prepare.* (sizes, splits, workers, detection_check), face.* (backend, min_face_size).\n"
            "Example: dynamicid -S face.backend=insightface prepare --input s3://faces/variface --output data/prepared"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", default=None, metavar="ROOT", help="input root, directory or s3:// (default: data.raw)")
    p.add_argument("--output", default=None, metavar="DIR", help="output directory (default: data.prepared)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="analysis processes (default: prepare.workers; 0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, params: "Params") -> int:
    summary = prepare(args.input or params.data.raw, args.output or params.data.prepared, params,
                      workers=args.workers, progress=not args.no_progress)
    print(summary_line(summary))
    return 0

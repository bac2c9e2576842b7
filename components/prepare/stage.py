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

This module opens the input and runs the phases in order: settings (components.prepare.settings),
plan and analyse (components.prepare.analysis, per image components.prepare.item), assemble
(components.prepare.assemble).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.prepare.analysis import _pool_size, _records, _run_analysis
from components.prepare.assemble import (
    REJECTS,
    _classify,
    _run_key,
    _up_to_date,
    _write_outputs,
    assign_splits,
)
from components.prepare.settings import item_settings, work_dir_for

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The stage


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
    from components.core.storage import StorageError, is_s3
    from components.prepare.source import (
        ANNOTATIONS,
        CAPTIONS,
        SourceIndex,
        open_source,
    )

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


def prepare(input_uri: str | os.PathLike[str], output: str | os.PathLike[str], params: "Params", *,
            workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Prepare ``input_uri`` into ``output``; returns a summary (counts, work done, throughput)."""
    from components.core.errors import UserError
    from components.prepare.report import ReportBuilder
    from components.prepare.results import ResultStore

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

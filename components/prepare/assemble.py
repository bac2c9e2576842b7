"""Assemble phase of ``dynamicid prepare``: duplicates, identity splits, run key, and the outputs.

Shards are streamed from the cached results one row at a time (blobs are never all in memory),
then rejects.jsonl and histograms.png, and data_report.json last (its prepare_key marks completion).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from components.core.config import Params
    from components.prepare.results import ResultStore
    from components.prepare.source import SourceIndex


REJECTS = "rejects.jsonl"
REPORT = "data_report.json"
PLOT = "histograms.png"
LANDMARK_FORMATS = {68: "ibug68", 106: "2d106"}


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
# Run key, final statuses, outputs


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
    from components.core.shards import write_shards
    from components.prepare.report import plot_histograms, write_json_atomic
    from components.prepare.source import printable

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

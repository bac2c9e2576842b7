"""Input side of ``dynamicid prepare``: where the raw images live and what is known about them.

Two sources share one small interface (``entries`` / ``read`` / ``lines``):

- ``LocalSource``: a directory.
- ``S3Source``: an ``s3://bucket/prefix`` read with boto3 through ``components.core.storage.s3_client``
  (endpoint, region and retries from params or the standard AWS environment; any S3-compatible
  store). Objects are read into memory one at a time, never mirrored to disk, so memory stays
  bounded by ``prepare.max_file_mb`` per in-flight image.

``SourceIndex`` is a per-source SQLite file in the prepare work directory. It holds the two
optional side files streamed into tables (so a 350k-line annotations.jsonl is never held in
memory) and the fingerprint -> sha256 map that lets a rerun skip reading unchanged files: the
fingerprint is (size, mtime) locally and (size, ETag) on S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
ANNOTATIONS = "annotations.jsonl"
CAPTIONS = "captions.jsonl"
# Anchors the key-escape check; never created or read (the check resolves paths lexically).
_VIRTUAL_ROOT = Path("/nonexistent-prepare-root")


@dataclass(frozen=True)
class Entry:
    """One file of the source. ``path`` is the normalised relative path (the sample's ``image``),
    ``key`` what ``read`` needs (the original object key / relative path)."""

    path: str
    key: str
    size: int
    fingerprint: str
    problem: tuple[str, str] | None = None  # (reject reason, detail) known from the listing: never read

    @property
    def is_image(self) -> bool:
        return self.path.lower().endswith(IMAGE_EXTENSIONS)


def normalise(rel: str) -> str:
    """A relative path as it is written in annotations/captions: posix, no ``./``, no doubled slashes."""
    return posixpath.normpath(rel.replace("\\", "/")).lstrip("/") if rel else rel


def printable(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes of a file name (which Python carries as lone
    surrogates) become ``\\xNN`` escapes, so JSON, SQLite and Parquet writers never fail on them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def escapes_root(rel: str) -> bool:
    """True for keys such as ``../x`` or ``/etc/x`` that would leave the input root."""
    from components.core.storage import StorageError, _safe_join

    if rel.startswith("/") or not rel:
        return True
    try:
        _safe_join(_VIRTUAL_ROOT, rel)
    except StorageError:
        return True
    return False


class Source(Protocol):
    uri: str

    def entries(self) -> list[Entry]:
        """Every file below the root, sorted by path (side files included)."""
        ...

    def read(self, key: str) -> bytes:
        ...

    def lines(self, key: str) -> Iterator[bytes] | None:
        """Lines of a side file, or None when it does not exist."""
        ...


class LocalSource:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def entries(self) -> list[Entry]:
        """Every file below the root. Links to files are followed when they stay inside the root;
        links to directories are not followed. Names that cannot be a usable sample are listed with
        their problem (and never read): links out of the root, non-UTF-8 names, and directories or
        special files (a FIFO would block ``read`` forever) named like images."""
        out: list[Entry] = []
        root = self.root.resolve()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .dvc, .git, .staging ...
            here = Path(dirpath)
            for name in dirnames:  # the walk still descends into real directories named like images
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    out.append(self._entry(here / name, root, directory=True))
            out.extend(self._entry(here / name, root) for name in filenames if not name.startswith("."))
        return sorted(out, key=lambda e: e.path)

    def _entry(self, full: Path, root: Path, directory: bool = False) -> Entry:
        rel = full.relative_to(self.root).as_posix()
        path = printable(rel)
        try:
            st = full.stat()
        except OSError:  # dangling link: still listed, read() reports why
            st = None
        size = st.st_size if st else -1
        fp = f"{size}:{st.st_mtime_ns if st else 0}"
        problem: tuple[str, str] | None = None
        if path != rel:
            problem = ("bad_filename", f"path is not valid UTF-8: {os.fsencode(rel)!r}")
        elif full.is_symlink() and not full.resolve().is_relative_to(root):
            problem = ("unsafe_path", f"symlink to {printable(str(full.resolve()))} points outside the input root")
        elif directory or (st is not None and not stat.S_ISREG(st.st_mode)):
            kind = "directory" if directory or stat.S_ISDIR(st.st_mode) else _special_kind(st.st_mode)
            problem = ("not_a_file", f"a {kind} named like an image")
        return Entry(path, rel, size, fp, problem)

    def read(self, key: str) -> bytes:
        from components.core.storage import _safe_join

        return _safe_join(self.root, key).read_bytes()  # a link out of the root is refused

    def lines(self, key: str) -> Iterator[bytes] | None:
        """A side file's lines; None when it is missing, not a regular file or a link out of the root."""
        path = self.root / key
        if not path.is_file() or not path.resolve().is_relative_to(self.root.resolve()):
            return None

        def gen() -> Iterator[bytes]:
            with path.open("rb") as fh:
                yield from fh

        return gen()


def _special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


class S3Source:
    """An s3:// prefix; the boto3 client is made per process (sources travel to pool workers)."""

    def __init__(self, uri: str, storage: Any = None):
        from components.core.storage import split_s3

        self.uri = uri
        self.bucket, prefix = split_s3(uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.storage = storage
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from components.core.storage import s3_client

            self._client = s3_client(self.storage)
        return self._client

    def entries(self) -> list[Entry]:
        # Same paginator as components.core.storage.list_keys, but keeping Size and ETag: they are the
        # fingerprint that lets a rerun skip downloading unchanged objects.
        out: list[Entry] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = key[len(self.prefix):]
                if not rel or rel.endswith("/"):  # the prefix itself or a "directory" marker
                    continue
                etag = str(obj.get("ETag", "")).strip('"')
                out.append(Entry(rel if escapes_root(rel) else normalise(rel), key, int(obj["Size"]),
                                 f"{obj['Size']}:{etag}"))
        return sorted(out, key=lambda e: e.path)

    def read(self, key: str) -> bytes:
        from components.core.storage import read_object

        return read_object(self.client, self.bucket, key)  # s3transfer retries a body cut off mid-stream

    def lines(self, key: str) -> Iterator[bytes] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return body.iter_lines(keepends=True)


def open_source(uri: str, storage: Any = None) -> LocalSource | S3Source:
    from components.core.storage import is_s3

    return S3Source(str(uri), storage) if is_s3(uri) else LocalSource(uri)


# --------------------------------------------------------------------------------------------
# Side files and fingerprints, on disk


def canonical_json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


class SourceIndex:
    """SQLite tables of one source: side-file records by image path and known file hashes.

    Only the main process touches it. Side files are re-imported when their fingerprint changes.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS side (name TEXT PRIMARY KEY, fingerprint TEXT, stats TEXT);
            CREATE TABLE IF NOT EXISTS ann (image TEXT PRIMARY KEY, record TEXT, digest TEXT);
            CREATE TABLE IF NOT EXISTS cap (image TEXT PRIMARY KEY, caption TEXT);
            CREATE TABLE IF NOT EXISTS hashes (image TEXT PRIMARY KEY, fingerprint TEXT, sha256 TEXT);
            """
        )

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    def sync_side_file(self, name: str, fingerprint: str | None, lines: Iterable[bytes] | None) -> dict[str, Any]:
        """Import annotations.jsonl / captions.jsonl unless the same version is already imported.

        Returns stats: records, lines that could not be used (with the first few line numbers).
        """
        table = "ann" if name == ANNOTATIONS else "cap"
        row = self.db.execute("SELECT fingerprint, stats FROM side WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] == fingerprint:
            return json.loads(row[1])
        self.db.execute(f"DELETE FROM {table}")
        stats: dict[str, Any] = {"present": lines is not None, "records": 0, "bad_lines": 0, "bad_line_numbers": [],
                                 "repeated_images": 0, "unsafe_paths": 0}
        if lines is not None:
            batch: list[tuple[str, ...]] = []
            seen = 0
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    image = str(record["image"]) if isinstance(record, dict) else None
                    if image and escapes_root(image.replace("\\", "/")):  # ../x, /etc/x: never a file of this root
                        stats["unsafe_paths"] += 1
                        raise ValueError
                    image = normalise(image) if image else None
                    if not image or (table == "cap" and not isinstance(record.get("caption"), str)):
                        raise ValueError
                except (ValueError, KeyError, TypeError):
                    stats["bad_lines"] += 1
                    if len(stats["bad_line_numbers"]) < 10:
                        stats["bad_line_numbers"].append(number)
                    continue
                if table == "ann":
                    text = canonical_json(record)
                    batch.append((image, text, hashlib.sha256(text.encode()).hexdigest()))
                else:
                    batch.append((image, record["caption"]))
                seen += 1
                if len(batch) >= 2048:
                    self._insert(table, batch)
                    batch = []
            self._insert(table, batch)
            stats["records"] = self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            stats["repeated_images"] = seen - stats["records"]  # later lines for the same image win
        self.db.execute("INSERT OR REPLACE INTO side VALUES (?, ?, ?)", (name, fingerprint, json.dumps(stats)))
        self.db.commit()
        return stats

    def _insert(self, table: str, rows: list[tuple[str, ...]]) -> None:
        marks = ", ".join("?" * (3 if table == "ann" else 2))
        self.db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", rows)

    def annotation(self, image: str) -> tuple[str, str] | None:
        """(canonical JSON record, its sha256) for an image path, if annotated."""
        row = self.db.execute("SELECT record, digest FROM ann WHERE image = ?", (image,)).fetchone()
        return (row[0], row[1]) if row else None

    def caption(self, image: str) -> str | None:
        row = self.db.execute("SELECT caption FROM cap WHERE image = ?", (image,)).fetchone()
        return row[0] if row else None

    def known_sha(self, image: str, fingerprint: str) -> str | None:
        row = self.db.execute("SELECT fingerprint, sha256 FROM hashes WHERE image = ?", (image,)).fetchone()
        return row[1] if row and row[0] == fingerprint else None

    def remember(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """(image, fingerprint, sha256) of files read in this run; committed by the caller's rhythm."""
        self.db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?)", list(rows))

    def commit(self) -> None:
        self.db.commit()

"""Per-image work units and results of ``dynamicid prepare``: settings, reject reasons, keys, ResultStore.

Results live in a work directory keyed by

    key = sha256(file sha256, params key, annotation record digest)

so the same bytes analysed with the same settings are never analysed twice, whatever their
path, and a killed run loses at most the images in flight. Each result is two files written
atomically (temp file + rename): ``<key>.npz`` (PNG blobs, embedding, landmarks) first, then
``<key>.json`` (status, pose, expression, ...): the JSON's presence means "done".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Part of every result key: bump when the bytes or fields of a result change.
PREPARE_VERSION = "prepare-2"  # 2: decode_image (header limits, alpha over white, 16-bit grey)
DEFAULT_CAPTION = "a photo of a person"

# Reject reasons (rejects.jsonl "reason"), in the order the checks run. docs/data.md lists them.
REASONS = {
    "unsafe_path": "the file's key or link points outside the input root",
    "bad_filename": "the path is not valid UTF-8 (shown with \\x escapes); never read",
    "not_a_file": "a directory, FIFO, socket or device named like an image; never read",
    "no_identity": "image directly under the root: no <identity>/ folder",
    "too_large": "file larger than prepare.max_file_mb (not read)",
    "read_error": "the file could not be read (I/O or object-store error after retries)",
    "empty_file": "zero-byte file",
    "not_an_image": "content is not JPEG, PNG or WebP, whatever the extension (text, GIF, EPS ...); never decoded",
    "too_many_pixels": "the header declares more than prepare.max_pixels pixels (decompression bomb); never decoded",
    "unreadable": "a JPEG/PNG/WebP that cannot be decoded (truncated, corrupt)",
    "invalid_annotation": "annotations.jsonl record for this image is malformed",
    "no_face": "the detector found no face",
    "face_too_small": "every face found is smaller than face.min_face_size",
    "multiple_faces": "several faces of at least face.min_face_size where prepare.one_face requires one",
    "analysis_failed": "landmarks/pose/embedding could not be computed for the face",
    "duplicate": "exact byte duplicate of another input image (the annotated copy, else the first by path, is kept)",
}


@dataclass(frozen=True)
class ItemSettings:
    """Everything a worker needs; picklable (sent once per worker)."""

    face: dict[str, Any]  # FaceParams.model_dump()
    profile: str
    image_size: int
    crop_size: int
    landmark_size: int
    min_face_size: int
    one_face: bool
    max_bytes: int
    max_pixels: int
    work_dir: str
    params_key: str


@dataclass(frozen=True)
class WorkItem:
    path: str
    key: str  # what the source's read() takes
    size: int
    fingerprint: str
    annotation: str | None  # canonical JSON record
    ann_digest: str  # "" when not annotated
    check: bool  # also run detection to measure the detector against the annotation


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def item_key(sha256: str, params_key: str, ann_digest: str) -> str:
    return hashlib.sha256(f"{sha256}\n{params_key}\n{ann_digest}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Result store


class ResultStore:
    """``<root>/items/<k[:2]>/<k>.{npz,json,check.json}``: one result per key, written atomically."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root) / "items"

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def has(self, key: str, check: bool = False) -> bool:
        return self._path(key, ".json").is_file() and (not check or self._path(key, ".check.json").is_file())

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads(self._path(key, ".json").read_text())

    def check(self, key: str) -> dict[str, Any] | None:
        p = self._path(key, ".check.json")
        return json.loads(p.read_text()) if p.is_file() else None

    def blobs(self, key: str) -> dict[str, Any]:
        """PNG blobs as bytes, embedding / landmarks as float32 arrays."""
        import numpy as np

        with np.load(self._path(key, ".npz"), allow_pickle=False) as z:
            return {k: (z[k].tobytes() if z[k].dtype == np.uint8 else z[k].copy()) for k in z.files}

    def _atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def write(self, key: str, meta: dict[str, Any], blobs: dict[str, Any] | None) -> None:
        import numpy as np

        if blobs is not None:
            buf = io.BytesIO()
            np.savez(buf, **{k: (np.frombuffer(v, np.uint8) if isinstance(v, bytes) else v) for k, v in blobs.items()})
            self._atomic(self._path(key, ".npz"), buf.getvalue())
        self._atomic(self._path(key, ".json"), json.dumps(meta, sort_keys=True).encode())

    def write_check(self, key: str, check: dict[str, Any]) -> None:
        self._atomic(self._path(key, ".check.json"), json.dumps(check, sort_keys=True).encode())

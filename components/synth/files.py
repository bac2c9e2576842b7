"""Test-bed files: names and paths, content hashes, atomic writes, the manifest reader, worker-pool sizing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from components.synth.identities import identity_name

MANIFEST = "synth_manifest.json"
ANNOTATIONS = "annotations.jsonl"
CAPTIONS = "captions.jsonl"
BAD_DIR = "bad_samples"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str | None:
    """Content hash of a file, None when it does not exist."""
    try:
        return sha256_bytes(path.read_bytes())
    except FileNotFoundError:
        return None


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically (temp file in the same folder + rename) unless the file already holds ``data``.

    Returns whether it wrote. Skipping keeps mtimes, so DVC / make see no change on a rerun.
    """
    if sha256_file(path) == sha256_bytes(data):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a partial file
    finally:
        tmp.unlink(missing_ok=True)
    return True


def image_path(identity: int, image: int) -> str:
    """Path of a good image relative to the test-bed root."""
    return f"{identity_name(identity)}/{image:04d}.png"


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pool_size(workers: int, jobs: int, images: int) -> int:
    """Processes to use: as asked, or (0 = auto) all cores unless the job is too small to pay for spawning."""
    if workers == 0:
        workers = 1 if images < 64 else (os.cpu_count() or 1)
    return max(1, min(workers, jobs))

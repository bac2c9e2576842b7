"""The prepared data format: parquet shards + an index + a manifest.

One row per accepted image. Blobs (training image, face crop, landmark image) are PNG
bytes so shards stay small and any tool can open them; everything else is plain columns
so the index can be queried without touching the blobs::

    <prepared>/
      manifest.json          format version, embedding/landmark dims, sizes, counts, data hash
      index.parquet          every column except blobs, plus shard file and row
      shards/part-00000.parquet ...
      data_report.json, histograms.png, rejects.jsonl   (written by prepare)

Rows are sorted by (identity, image) inside the writer so a rerun writes identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

FORMAT_VERSION = 1
BLOB_COLUMNS = ("pixels", "face_crop", "landmark_image")
SPLITS = ("train", "val", "test")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),             # sha256 of the source file's bytes
        ("identity", pa.string()),
        ("image", pa.string()),           # source path relative to the data root
        ("split", pa.string()),           # train | val | test (by identity)
        ("caption", pa.string()),
        ("pixels", pa.binary()),          # PNG, image_size x image_size RGB: the diffusion training image
        ("face_crop", pa.binary()),       # PNG, crop_size x crop_size RGB: input of the CLIP image encoder
        ("face_box", pa.list_(pa.float32(), 4)),     # (y0, x0, y1, x1) of the face in `pixels`, in [0, 1]
        ("embedding", pa.list_(pa.float32())),       # L2-normalised identity embedding (512 or 128)
        ("landmarks", pa.list_(pa.float32())),       # P*2 (x, y) in the face-crop frame, in [0, 1]
        ("landmark_image", pa.binary()),  # PNG, landmark_size^2 gray: white dots (method.md: 1 x 96 x 96)
        ("yaw", pa.float32()),
        ("pitch", pa.float32()),
        ("roll", pa.float32()),
        ("expression", pa.string()),
        ("face_prompt", pa.string()),     # "the expression is happy, the face is slightly turned to the left"
    ])


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)))


def write_shards(out_dir: str | os.PathLike, rows: Iterable[dict[str, Any]], shard_size: int,
                 manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write rows (dicts with the schema's columns) as shards + index + manifest, atomically.

    Everything is written into ``<out_dir>/.staging`` and moved into place at the end, so an
    interrupted write never leaves a mixed old/new data set.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    staging = out / ".staging"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    (staging / "shards").mkdir(parents=True)
    schema = _schema()
    rows = sorted(rows, key=lambda r: (r["identity"], r["image"]))
    index_rows: list[dict[str, Any]] = []
    for shard_no, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start:start + shard_size]
        name = f"shards/part-{shard_no:05d}.parquet"
        table = pa.Table.from_pylist([{c: r[c] for c in schema.names} for r in chunk], schema=schema)
        pq.write_table(table, staging / name)
        for i, r in enumerate(chunk):
            index_rows.append({**{c: r[c] for c in schema.names if c not in BLOB_COLUMNS}, "shard": name, "row": i})
    index_schema = pa.schema([f for f in schema if f.name not in BLOB_COLUMNS] +
                             [pa.field("shard", pa.string()), pa.field("row", pa.int64())])
    pq.write_table(pa.Table.from_pylist(index_rows, schema=index_schema), staging / "index.parquet")
    counts = {s: sum(1 for r in rows if r["split"] == s) for s in SPLITS}
    ids = {s: len({r["identity"] for r in rows if r["split"] == s}) for s in SPLITS}
    digest = hashlib.sha256("\n".join(f"{r['key']}:{r['split']}" for r in rows).encode()).hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION,
        "samples": counts,
        "identities": ids,
        "embedding_dim": len(rows[0]["embedding"]) if rows else 0,
        "landmark_count": len(rows[0]["landmarks"]) // 2 if rows else 0,
        "data_hash": digest,
        **(manifest_extra or {}),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    # Move into place: shards dir, index and manifest last (the manifest marks completeness).
    import shutil

    (out / "manifest.json").unlink(missing_ok=True)
    if (out / "shards").exists():
        shutil.rmtree(out / "shards")
    (staging / "shards").rename(out / "shards")
    (staging / "index.parquet").replace(out / "index.parquet")
    (staging / "manifest.json").replace(out / "manifest.json")
    shutil.rmtree(staging)
    return manifest


@dataclass
class Sample:
    """One prepared row with blobs decoded (numpy, uint8 images)."""

    key: str
    identity: str
    image: str
    split: str
    caption: str
    pixels: np.ndarray          # [S, S, 3] uint8
    face_crop: np.ndarray       # [C, C, 3] uint8
    face_box: np.ndarray        # [4] (y0, x0, y1, x1)
    embedding: np.ndarray       # [D] float32
    landmarks: np.ndarray       # [P, 2] float32 in [0, 1] of the crop
    landmark_image: np.ndarray  # [L, L] uint8
    yaw: float
    pitch: float
    roll: float
    expression: str
    face_prompt: str


class PreparedData:
    """Read side of the format: the index in memory, shard rows decoded on access."""

    def __init__(self, root: str | os.PathLike):
        import pyarrow.parquet as pq

        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{self.root}: no prepared data (manifest.json missing; run `dynamicid prepare`)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{mpath}: format_version {self.manifest.get('format_version')} != {FORMAT_VERSION}")
        self.index = pq.read_table(self.root / "index.parquet").to_pylist()
        self._tables: dict[str, Any] = {}

    def rows(self, split: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.index if split is None or r["split"] == split]

    def identities(self, split: str | None = None) -> dict[str, list[int]]:
        """identity -> positions in ``self.index`` (sorted), for sampling several images of one person."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.index):
            if split is None or r["split"] == split:
                out.setdefault(r["identity"], []).append(i)
        return out

    def _table(self, shard: str):
        if shard not in self._tables:
            import pyarrow.parquet as pq

            self._tables[shard] = pq.read_table(self.root / shard, memory_map=True)
        return self._tables[shard]

    def sample(self, position: int) -> Sample:
        r = self.index[position]
        row = self._table(r["shard"]).slice(r["row"], 1).to_pylist()[0]
        lm = np.asarray(row["landmarks"], dtype=np.float32).reshape(-1, 2)
        return Sample(
            key=row["key"], identity=row["identity"], image=row["image"], split=row["split"], caption=row["caption"],
            pixels=decode_png(row["pixels"]), face_crop=decode_png(row["face_crop"]),
            face_box=np.asarray(row["face_box"], dtype=np.float32),
            embedding=np.asarray(row["embedding"], dtype=np.float32), landmarks=lm,
            landmark_image=decode_png(row["landmark_image"]), yaw=float(row["yaw"]), pitch=float(row["pitch"]),
            roll=float(row["roll"]), expression=row["expression"], face_prompt=row["face_prompt"],
        )

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self.index)):
            yield self.sample(i)

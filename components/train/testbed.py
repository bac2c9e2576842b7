"""Prepared shards of the synthetic test-bed built directly from the renderer (no face detector).

A stand-in for ``dynamicid synth`` + ``dynamicid prepare`` used by the training tests and by
``scripts/learning_check.py``: it renders images with ``components.synth.samples.render_sample``,
takes faces and landmarks from the renderer's exact annotations and writes rows in the shard
format with ``components.core.shards.write_shards``. The trainer itself only ever reads shards.

Identity embeddings: ``"dlib"`` runs the real dlib recognizer on each rendered image (what
``prepare`` does in the tiny profile; images where it finds no single face are skipped), and
``"seeded"`` gives each identity a fixed random unit vector plus small per-image noise (fast,
for unit tests only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np


def _seeded_embedding(identity: int, image: int, dim: int, seed: int) -> np.ndarray:
    base = np.random.default_rng([seed, 101, identity]).standard_normal(dim)
    noise = np.random.default_rng([seed, 102, identity, image]).standard_normal(dim) * 0.15
    v = base / np.linalg.norm(base) + noise / np.sqrt(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def build_rows(identities: int, images_per_identity: int, *, render_size: int = 128, image_size: int = 64,
               crop_size: int = 64, landmark_size: int = 96, embeddings: Literal["dlib", "seeded"] = "seeded",
               test_identities: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    from PIL import Image

    from components.core.shards import encode_png
    from components.synth.samples import png_bytes, render_sample
    from model.landmarks import render_landmarks
    from model.motion import face_prompt
    from model.pipeline import face_crop_box

    analyzer = None
    if embeddings == "dlib":
        from model.face_analysis.backends import DlibFaceAnalyzer

        analyzer = DlibFaceAnalyzer()
    rows = []
    for i in range(identities):
        for j in range(images_per_identity):
            pixels, ann, caption = render_sample(seed, i, j, render_size)
            if analyzer is not None:
                faces = analyzer.detect(pixels)
                if len(faces) != 1:
                    continue
                emb = np.asarray(faces[0].embedding, dtype=np.float32)
            else:
                emb = _seeded_embedding(i, j, 128, seed)
            x0, y0, x1, y1 = ann["box"]
            left, top, right, bottom = face_crop_box(np.array([x0, y0, x1, y1]), pixels.shape[:2])
            side = right - left
            crop = np.asarray(Image.fromarray(pixels[top:bottom, left:right]).resize((crop_size,) * 2, Image.BICUBIC))
            pts = np.asarray(ann["landmarks"], dtype=np.float32) - np.array([left, top], dtype=np.float32)
            lmk = (render_landmarks(pts, (side, side), size=landmark_size)[0] * 255).astype(np.uint8)
            small = np.asarray(Image.fromarray(pixels).resize((image_size,) * 2, Image.BICUBIC))
            pose = ann["pose"]
            rows.append({
                "key": hashlib.sha256(png_bytes(pixels)).hexdigest(),
                "identity": ann["identity"], "image": f"{ann['identity']}/{j:04d}.png",
                "split": "test" if i >= identities - test_identities else "train",
                "caption": caption, "pixels": encode_png(small), "face_crop": encode_png(crop),
                "face_box": [y0 / render_size, x0 / render_size, y1 / render_size, x1 / render_size],
                "embedding": emb.tolist(), "landmarks": (pts / side).reshape(-1).tolist(),
                "landmark_image": encode_png(lmk),
                "yaw": pose["yaw"], "pitch": pose["pitch"], "roll": pose["roll"],
                "expression": ann["expression"], "face_prompt": face_prompt(ann["expression"], pose["yaw"], pose["pitch"]),
            })
    return rows


def write_testbed(out: str | Path, identities: int, images_per_identity: int, **kw: Any) -> dict[str, Any]:
    from components.core.shards import write_shards

    rows = build_rows(identities, images_per_identity, **kw)
    return write_shards(out, rows, shard_size=256, manifest_extra={"source": "components.train.testbed"})

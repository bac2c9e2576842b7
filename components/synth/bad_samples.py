"""Deliberately bad files for prepare's quarantine: their kinds, reasons and bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from components.synth.geometry import Placement, build_face, place
from components.synth.identities import (
    BACKGROUNDS,
    _pick,
    sample_identity,
    sample_motion,
)
from components.synth.render import render
from components.synth.samples import png_bytes

if TYPE_CHECKING:
    import numpy as np

BAD_KINDS = ("truncated_png", "zero_byte", "no_face", "two_faces", "duplicate", "tiny_face")
BAD_REASONS = {
    "truncated_png": "unreadable image (PNG cut short)",
    "zero_byte": "empty file",
    "no_face": "no face found",
    "two_faces": "more than one face",
    "duplicate": "exact duplicate of another image",
    "tiny_face": "face too small",
}


def _bad_sample_bytes(kind: str, seed: int, index: int, size: int, ss: int, duplicate_of: bytes) -> bytes:
    """Bytes of one deliberately bad file; people in them come from their own random stream."""
    import numpy as np

    rng = np.random.default_rng([seed, 3, index])

    def person(k: int, scale: float, cx: float, cy: float) -> Placement:
        idn = sample_identity(seed, 1_000_000 + 10 * index + k)  # not one of the test-bed's identities
        motion = sample_motion(seed, 1_000_000 + 10 * index + k, 0)
        face = build_face(idn, "neutral")
        pl = place(face, motion, size)
        pl.scale *= scale
        pl.cx, pl.cy = cx * size, cy * size
        return pl

    background = _pick(rng, BACKGROUNDS)[1]
    if kind == "zero_byte":
        return b""
    if kind == "duplicate":
        return duplicate_of
    if kind == "truncated_png":
        data = png_bytes(render([person(0, 1.0, 0.5, 0.45)], size, background, ss=ss))
        return data[: len(data) // 2]
    if kind == "two_faces":
        return png_bytes(render([person(0, 0.6, 0.27, 0.42), person(1, 0.6, 0.73, 0.42)], size, background, ss=ss))
    if kind == "tiny_face":
        corner = float(rng.uniform(0.12, 0.88))
        return png_bytes(render([person(0, 0.09, corner, 0.15)], size, background, ss=ss))
    if kind == "no_face":
        return png_bytes(_abstract_image(rng, size, background))
    raise ValueError(f"unknown bad-sample kind {kind!r}")


def _abstract_image(rng: "np.random.Generator", size: int, background: Sequence[float]) -> "np.ndarray":
    """Background with a few soft shapes and no face."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.new("RGB", (size, size), tuple(int(255 * c) for c in background))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = rng.uniform(0, size * 0.8, 2)
        w, h = rng.uniform(size * 0.1, size * 0.4, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)))

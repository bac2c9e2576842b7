"""Per-person command-line arguments, shared by ``dynamicid generate`` and ``dynamicid infer``: the i-th
--bbox/--expression/--driving-image/--landmarks/--person-id-scale belongs to the i-th --id-image, '-' skips one.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``y0,x0,y1,x1`` in [0, 1] -> a tuple; an argparse type, so a bad box is a usage error."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bbox {text!r}: expected y0,x0,y1,x1 numbers") from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"bbox {text!r}: expected 4 numbers y0,x0,y1,x1")
    return vals  # type: ignore[return-value]


def nth_value(values: list[str], i: int) -> str | None:
    """The i-th value of a repeated per-person option, or None when it is absent or '-'."""
    if i < len(values) and values[i] not in ("-", ""):
        return values[i]
    return None


def load_landmarks(path: str) -> list[list[float]]:
    """A ``--landmarks`` file: JSON, a list of [x, y] pairs in pixels of the person's --id-image.

    Only the file's form is checked here; the point count (the face analyzer's layout) is checked
    where the analyzer is known, by the pipeline or the server.
    """
    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"--landmarks {path}: no such file")
    try:
        points = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"--landmarks {path}: not valid JSON ({err})") from None
    ok = isinstance(points, list) and points and all(
        isinstance(pt, list) and len(pt) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pt)
        for pt in points)
    if not ok:
        raise argparse.ArgumentTypeError(f"--landmarks {path}: expected a JSON list of [x, y] number pairs "
                                         "(pixels of the --id-image)")
    return [[float(x), float(y)] for x, y in points]


def parse_scale(text: str) -> float:
    """A ``--person-id-scale`` value: a finite number >= 0 (the server checks its upper limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--person-id-scale {text!r}: expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--person-id-scale {text!r}: expected a finite number >= 0")
    return value


def person_scales(values: list[str], n: int) -> list[float | None] | None:
    """The repeated ``--person-id-scale`` values -> one per person (None: the image's --id-scale),
    or None when no person has one."""
    scales = [parse_scale(v) if (v := nth_value(values, k)) else None for k in range(n)]
    return scales if any(s is not None for s in scales) else None

"""Per-person command-line arguments, shared by ``dynamicid generate`` and ``dynamicid infer``: the i-th
--bbox/--expression/... belongs to the i-th --id-image, '-' skips one.
"""

from __future__ import annotations

import argparse


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

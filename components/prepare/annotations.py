"""Annotation records of ``dynamicid prepare`` (one line of annotations.jsonl): the schema and its validation.

An annotated image skips detection: its 5 keypoints align the recogniser's crop; box, dense
landmarks, pose and expression are used when given (docs/data.md).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from components.prepare.results import Reject

LANDMARK_COUNTS = (68, 106)  # iBUG (dlib) and insightface 2d106


def _finite_points(v: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if not all(math.isfinite(c) for p in v for c in p):
        raise ValueError("contains NaN or infinite coordinates")
    return v


class AnnotatedPose(BaseModel):
    model_config = ConfigDict(extra="ignore")
    yaw: float
    pitch: float
    roll: float = 0.0


class Annotation(BaseModel):
    """One annotations.jsonl record (docs/data.md); fields other than these are informative only."""

    model_config = ConfigDict(extra="ignore")  # identity, attributes, landmark_format ...
    kps: list[tuple[float, float]]  # [5, 2] ArcFace order
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    landmarks: list[tuple[float, float]] | None = None  # [68 | 106, 2]
    pose: AnnotatedPose | None = None
    expression: str | None = None

    @field_validator("kps")
    @classmethod
    def _five(cls, v):
        if len(v) != 5:
            raise ValueError(f"needs 5 points (eyes, nose tip, mouth corners), got {len(v)}")
        return _finite_points(v)

    @field_validator("landmarks")
    @classmethod
    def _dense(cls, v):
        if v is not None and len(v) not in LANDMARK_COUNTS:
            raise ValueError(f"needs {' or '.join(map(str, LANDMARK_COUNTS))} points, got {len(v)}")
        return None if v is None else _finite_points(v)

    @field_validator("box")
    @classmethod
    def _box(cls, v):
        if v is not None and not (all(math.isfinite(c) for c in v) and v[2] > v[0] and v[3] > v[1]):
            raise ValueError(f"must be finite [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {list(v)}")
        return v

    @field_validator("expression")
    @classmethod
    def _expression(cls, v):
        from model.motion import EXPRESSIONS

        if v is not None and v.strip().lower() not in EXPRESSIONS:
            raise ValueError(f"unknown expression {v!r}; expected one of {', '.join(EXPRESSIONS)}")
        return None if v is None else v.strip().lower()


def parse_annotation(text: str) -> Annotation:
    """Validate one record; Reject (invalid_annotation, naming the field) on any problem."""
    try:
        return Annotation.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Reject("invalid_annotation", f"{where}: {first['msg']}") from None

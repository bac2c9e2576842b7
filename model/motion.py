"""Source-motion description: an expression estimate from landmarks, head-pose words, face prompts.

The IMR (method.md) needs a *source* face prompt for every reference photo ("the expression is
happy, the face is slightly turned to the left"). The research release builds it with an
expression classifier module it does not ship; we ship this small, documented geometric
estimator instead (a caller can always pass the prompt explicitly). It is pure numpy so that it
runs anywhere the landmarks come from (dlib 68-point iBUG layout or insightface 2d106).

The rule reads four scale-free measurements from landmark *groups* (which points belong to the
mouth, each eye, each brow), never from the order of points inside a group: the two layouts
order their points differently, and for 2d106 only the group ranges are reliably known. See
docs/face_analysis.md for the thresholds, how they were chosen, and the rule's limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# What the estimator can output, and the wider vocabulary a caller may ask for as a target
# (KDEF, used by the release for stage 2, has these seven).
ESTIMATED_EXPRESSIONS: tuple[str, ...] = ("neutral", "happy", "surprised", "sad", "angry")
EXPRESSIONS: tuple[str, ...] = ESTIMATED_EXPRESSIONS + ("fearful", "disgusted")


@dataclass(frozen=True)
class LandmarkLayout:
    """Index groups of one dense-landmark layout. "left"/"right" are image sides (viewer's)."""

    name: str
    count: int
    contour: tuple[int, ...]
    eyes: tuple[tuple[int, ...], tuple[int, ...]]
    brows: tuple[tuple[int, ...], tuple[int, ...]]
    nose: tuple[int, ...]
    mouth: tuple[int, ...]


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


# iBUG 300-W 68-point markup (dlib's shape_predictor_68_face_landmarks).
IBUG_68 = LandmarkLayout(
    name="ibug68",
    count=68,
    contour=_r(0, 17),
    eyes=(_r(36, 42), _r(42, 48)),
    brows=(_r(17, 22), _r(22, 27)),
    nose=_r(27, 36),
    mouth=_r(48, 68),
)

# insightface 2d106det markup: contour 0-32, one eye 33-42 and its brow 43-51, mouth 52-71,
# nose 72-86, other eye 87-96 and its brow 97-105.
INSIGHTFACE_106 = LandmarkLayout(
    name="2d106",
    count=106,
    contour=_r(0, 33),
    eyes=(_r(33, 43), _r(87, 97)),
    brows=(_r(43, 52), _r(97, 106)),
    nose=_r(72, 87),
    mouth=_r(52, 72),
)

LAYOUTS: dict[int, LandmarkLayout] = {IBUG_68.count: IBUG_68, INSIGHTFACE_106.count: INSIGHTFACE_106}


def layout_for(landmarks: np.ndarray) -> LandmarkLayout:
    """The layout of a [P, 2] landmark array, chosen by P (68 or 106)."""
    pts = np.asarray(landmarks)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] not in LAYOUTS:
        raise ValueError(
            f"landmarks must have shape [68, 2] (iBUG) or [106, 2] (insightface 2d106), got {list(pts.shape)}"
        )
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN or infinite values")
    return LAYOUTS[pts.shape[0]]


@dataclass(frozen=True)
class FaceFrame:
    """A face-aligned 2-D frame: origin between the eyes, x along the eye line, y towards the mouth.

    Measuring in this frame, in units of the inter-ocular distance, makes every feature
    independent of image size, face position and in-plane rotation (roll).
    """

    origin: np.ndarray  # [2] eye midpoint, pixels
    x_axis: np.ndarray  # [2] unit vector along the eye line
    y_axis: np.ndarray  # [2] unit vector perpendicular to it, pointing to the mouth
    iod: float  # inter-ocular distance (eye centre to eye centre), pixels

    def project(self, points: np.ndarray) -> np.ndarray:
        """[N, 2] pixels -> [N, 2] face-frame coordinates in inter-ocular units."""
        d = np.asarray(points, dtype=np.float64) - self.origin  # [N, 2]
        return np.stack([d @ self.x_axis, d @ self.y_axis], axis=-1) / self.iod


def face_frame(landmarks: np.ndarray) -> FaceFrame:
    """The face frame of a landmark set; the y axis is oriented by the mouth, not by group order."""
    pts = np.asarray(landmarks, dtype=np.float64)
    layout = layout_for(pts)
    eye_a, eye_b = (pts[list(g)].mean(axis=0) for g in layout.eyes)
    iod = float(np.linalg.norm(eye_b - eye_a))
    if iod < 1e-6:
        raise ValueError("degenerate landmarks: both eye centres coincide")
    u = (eye_b - eye_a) / iod
    y = np.array([-u[1], u[0]])
    mid = (eye_a + eye_b) / 2
    if (pts[list(layout.mouth)].mean(axis=0) - mid) @ y < 0:
        y = -y
    x = np.array([y[1], -y[0]])  # right-handed with y: image axes when the face is upright
    return FaceFrame(origin=mid, x_axis=x, y_axis=y, iod=iod)


@dataclass(frozen=True)
class ExpressionFeatures:
    """Scale-free shape measurements the expression rule reads (face frame, see FaceFrame)."""

    mouth_open: float  # mouth height / mouth width (outer extents of the mouth group)
    mouth_width: float  # mouth width / inter-ocular distance
    corner_lift: float  # (mouth mid-height - mean corner height) / mouth width; > 0: corners up
    eye_open: float  # eye height / eye width, mean of both eyes
    brow_raise: float  # (mean eye height - mean brow height) / inter-ocular distance


def expression_features(landmarks: np.ndarray) -> ExpressionFeatures:
    """Measure the mouth, eyes and brows of one face in its face frame."""
    pts = np.asarray(landmarks, dtype=np.float64)
    layout = layout_for(pts)
    frame = face_frame(pts)
    local = frame.project(pts)  # [P, 2], inter-ocular units, y down the face

    mouth = local[list(layout.mouth)]  # [M, 2]
    width = float(np.ptp(mouth[:, 0]))
    height = float(np.ptp(mouth[:, 1]))
    if width < 1e-6:
        raise ValueError("degenerate landmarks: mouth has no width")
    corners = mouth[[int(np.argmin(mouth[:, 0])), int(np.argmax(mouth[:, 0]))]]  # [2, 2]
    mid_height = (mouth[:, 1].min() + mouth[:, 1].max()) / 2
    lift = float(mid_height - corners[:, 1].mean()) / width

    eye_ratios = []
    for group in layout.eyes:
        eye = local[list(group)]
        eye_ratios.append(np.ptp(eye[:, 1]) / max(np.ptp(eye[:, 0]), 1e-6))
    eyes_y = np.concatenate([local[list(g)][:, 1] for g in layout.eyes]).mean()
    brows_y = np.concatenate([local[list(g)][:, 1] for g in layout.brows]).mean()
    return ExpressionFeatures(
        mouth_open=height / width,
        mouth_width=width,
        corner_lift=lift,
        eye_open=float(np.mean(eye_ratios)),
        brow_raise=float(eyes_y - brows_y),
    )


@dataclass(frozen=True)
class ExpressionThresholds:
    """Decision thresholds of estimate_expression (values and their origin: docs/face_analysis.md)."""

    open_mouth: float = 0.60  # mouth_open at or above: mouth clearly open
    smile_lift: float = 0.06  # corner_lift at or above: corners raised (smile)
    laugh_lift: float = 0.05  # an open mouth with corners at least this high reads as a laugh
    sad_lift: float = -0.04  # corner_lift at or below: corners pulled down
    raised_brows: float = 0.55  # brow_raise at or above, with wide eyes: surprise without an open mouth
    wide_eyes: float = 0.42  # eye_open at or above: eyes wide open
    lowered_brows: float = 0.30  # brow_raise at or below: brows pulled down (frown)


def estimate_expression(
    landmarks: np.ndarray, thresholds: ExpressionThresholds = ExpressionThresholds()
) -> str:
    """One of ESTIMATED_EXPRESSIONS from landmark geometry alone (68 or 106 points).

    Order of the rules matters: an open mouth is the strongest cue (laugh vs surprise is
    decided by the corners), then raised corners, then raised brows with wide eyes, then
    lowered brows, then lowered corners. Anything else is neutral.
    """
    f = expression_features(landmarks)
    t = thresholds
    if f.mouth_open >= t.open_mouth:
        return "happy" if f.corner_lift >= t.laugh_lift else "surprised"
    if f.corner_lift >= t.smile_lift:
        return "happy"
    if f.brow_raise >= t.raised_brows and f.eye_open >= t.wide_eyes:
        return "surprised"
    if f.brow_raise <= t.lowered_brows:
        return "angry"
    if f.corner_lift <= t.sad_lift:
        return "sad"
    return "neutral"


# Head-pose words. Angles in degrees with the convention of model.face_analysis.geometry.estimate_head_pose:
# yaw > 0 when the nose points to the image's right, pitch > 0 when it points up.
FRONTAL_DEG = 10.0  # |angle| below: no word for that axis
STRONG_DEG = 25.0  # |angle| from here: no "slightly"
_YAW_WORDS = {"left": -1.0, "right": 1.0}
_PITCH_WORDS = {"up": 1.0, "down": -1.0}


def _amount(angle: float) -> str | None:
    a = abs(angle)
    if a < FRONTAL_DEG:
        return None
    return "slightly " if a < STRONG_DEG else ""


def describe_pose(yaw: float, pitch: float) -> str:
    """Words for a head pose, from the viewer's side: "the face is slightly turned to the left".

    "left"/"right" are the image's (viewer's) left and right: a person turning to *their* left
    appears "turned to the right". Below FRONTAL_DEG on both axes the face is "frontal".
    """
    if not (np.isfinite(yaw) and np.isfinite(pitch)):
        raise ValueError(f"pose angles must be finite, got yaw={yaw}, pitch={pitch}")
    parts = []
    amount = _amount(yaw)
    if amount is not None:
        parts.append(f"{amount}turned to the {'right' if yaw > 0 else 'left'}")
    amount = _amount(pitch)
    if amount is not None:
        parts.append(f"{amount}tilted {'up' if pitch > 0 else 'down'}")
    return "the face is " + (" and ".join(parts) if parts else "frontal")


def face_prompt(expression: str, yaw: float, pitch: float) -> str:
    """The IMR's face prompt: "the expression is happy, the face is slightly turned to the left"."""
    word = expression.strip().lower()
    if word not in EXPRESSIONS:
        raise ValueError(f"unknown expression {expression!r}; expected one of {', '.join(EXPRESSIONS)}")
    return f"the expression is {word}, {describe_pose(yaw, pitch)}"


@dataclass(frozen=True)
class FacePrompt:
    """A parsed face prompt; angles are the middle of the described range (0 when not mentioned)."""

    expression: str | None
    yaw: float
    pitch: float


_EXPRESSION_RE = re.compile(r"the expression is (\w+)")
_YAW_RE = re.compile(r"(slightly )?turned to the (left|right)")
_PITCH_RE = re.compile(r"(slightly )?tilted (up|down)")
# Representative angle of each range: middle of [FRONTAL, STRONG) and a typical strong turn.
_SLIGHT_DEG = (FRONTAL_DEG + STRONG_DEG) / 2
_FULL_DEG = 35.0


def parse_face_prompt(text: str) -> FacePrompt:
    """Invert face_prompt (also accepts a fragment such as "happy, turned to the right").

    The expression is taken from "the expression is X" or, failing that, the first known
    expression word; unknown wording is an error so a typo never becomes a silent "neutral".
    """
    low = " ".join(text.lower().split())
    m = _EXPRESSION_RE.search(low)
    expression = m.group(1) if m else next((w for w in re.findall(r"\w+", low) if w in EXPRESSIONS), None)
    if expression is not None and expression not in EXPRESSIONS:
        raise ValueError(f"unknown expression {expression!r} in face prompt {text!r}")
    yaw = pitch = 0.0
    if (m := _YAW_RE.search(low)) is not None:
        yaw = _YAW_WORDS[m.group(2)] * (_SLIGHT_DEG if m.group(1) else _FULL_DEG)
    if (m := _PITCH_RE.search(low)) is not None:
        pitch = _PITCH_WORDS[m.group(2)] * (_SLIGHT_DEG if m.group(1) else _FULL_DEG)
    if expression is None and yaw == 0.0 and pitch == 0.0 and "frontal" not in low:
        raise ValueError(f"face prompt {text!r} names no expression and no pose")
    return FacePrompt(expression=expression, yaw=yaw, pitch=pitch)

"""``dynamicid synth``: a deterministic synthetic face test-bed in the accepted input layout.

Why it exists: the embedded default (tiny profile, CPU, no network) must train and evaluate
DynamicID without downloading a face data set. The test-bed mimics what stage 2 needs
(VariFace / KDEF style: many images per person in varied motion) and what stage 1 needs
(one face per image with a caption), with exact annotations because every landmark comes
from the same 3-D geometry that is rendered.

Layout written under ``out``::

    id_0000/0000.png ... id_0047/0034.png   one folder per identity
    annotations.jsonl                       one JSON object per good image (schema below)
    captions.jsonl                          {"image", "caption"} per good image
    bad_samples/*.png                       deliberately bad files (see synth_manifest.json)
    synth_manifest.json                     params key, sha256 of every file, bad-sample list

Annotation schema (image path relative to ``out``)::

    {"image": "id_0003/0012.png", "identity": "id_0003",
     "box": [x0, y0, x1, y1], "kps": [[x, y] x 5], "landmarks": [[x, y] x 68],
     "landmark_format": "68", "pose": {"yaw", "pitch", "roll"}, "expression": "happy",
     "attributes": {...identity factors...}}

Conventions (documented here because every consumer depends on them):

* Pixel coordinates follow OpenCV / insightface / dlib: an integer coordinate is a pixel
  centre, the image spans [-0.5, size - 0.5).
* ``kps`` are in the ArcFace template order and "left"/"right" are as seen in the image:
  eye on the image left (the person's right eye), eye on the image right, nose tip, mouth
  corner on the image left, mouth corner on the image right.
* ``landmarks`` are iBUG-68 (0-16 jaw from image left to image right, 17-26 brows, 27-35
  nose, 36-47 eyes, 48-67 mouth). Jaw points 0-16 lie on the visible outline of the face,
  from eye level on the image left, under the chin, to eye level on the image right, as
  iBUG annotators place them.
* ``box`` is the tight box around the 68 landmarks and a mid-forehead point (hairline
  height), i.e. forehead-to-chin and cheek-to-cheek like a face detector's box.
* ``pose`` in degrees, head relative to the camera, applied as yaw, then pitch, then roll:
  yaw > 0: the person turns their head to THEIR left, so the nose moves to the image right;
  pitch > 0: the person looks up (the nose moves up in the image);
  roll > 0: the head tilts so that its top moves to the image right (clockwise as seen).
  Captions say "turned to their left/right" with the same meaning.

Rendering: each head is a union of ellipsoids (cranium, jaw, nose, nostril wings, ears, hair
shell, neck, torso) ray-cast in closed form under orthographic projection, so yaw/pitch move
every feature consistently; eyes, brows, lips, beard and shading are solid textures in head
coordinates, evaluated at the ray hit point. The image is rendered at ``supersample`` times
the output size (params, default 2) and box-filtered down (anti-aliasing), with face-metered
exposure like a camera's. Deterministic: every random draw comes from
``numpy.random.default_rng([seed, stream, identity, image])``; no time or process state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # heavy imports stay inside functions (the CLI imports this module)
    import numpy as np

    from components.core.config import Params
    from components.core.config.data import SynthParams

log = logging.getLogger(__name__)

# Bump when the rendered bytes change: it is part of the manifest key, so a rerun with new
# code re-renders instead of trusting stale hashes.
RENDER_VERSION = "synth-1"
SUPERSAMPLE = 2  # default samples per pixel side (params.synth.supersample)
EXPOSURE_TARGET = 0.5  # mean skin intensity the exposure aims for
MANIFEST = "synth_manifest.json"
ANNOTATIONS = "annotations.jsonl"
CAPTIONS = "captions.jsonl"
BAD_DIR = "bad_samples"

EXPRESSIONS = ("neutral", "happy", "surprised", "sad", "angry")
# (yaw, pitch) in degrees; KDEF-like 5 yaw angles (without profiles, which a frontal face
# detector cannot see) plus looking up / down. Image j gets POSES[j % 7] and
# EXPRESSIONS[j % 5]: 5 and 7 are coprime, so 35 images cover every combination once and a
# handful of images already varies both factors.
POSES = ((0.0, 0.0), (-18.0, 0.0), (18.0, 0.0), (-32.0, 0.0), (32.0, 0.0), (0.0, 14.0), (0.0, -14.0))
BAD_KINDS = ("truncated_png", "zero_byte", "no_face", "two_faces", "duplicate", "tiny_face")
BAD_REASONS = {
    "truncated_png": "unreadable image (PNG cut short)",
    "zero_byte": "empty file",
    "no_face": "no face found",
    "two_faces": "more than one face",
    "duplicate": "exact duplicate of another image",
    "tiny_face": "face too small",
}

# Palettes: (name, sRGB in [0, 1]).
SKIN_TONES = (
    ("very light", (0.96, 0.80, 0.70)), ("light", (0.92, 0.74, 0.61)), ("light", (0.88, 0.70, 0.56)),
    ("medium", (0.80, 0.60, 0.45)), ("medium", (0.72, 0.52, 0.38)), ("tan", (0.62, 0.43, 0.30)),
    ("brown", (0.50, 0.33, 0.22)), ("dark", (0.38, 0.25, 0.17)),
)
HAIR_COLOURS = (
    ("black", (0.07, 0.06, 0.06)), ("dark brown", (0.20, 0.13, 0.08)), ("brown", (0.36, 0.22, 0.12)),
    ("red", (0.58, 0.23, 0.10)), ("blonde", (0.82, 0.68, 0.42)), ("grey", (0.56, 0.56, 0.56)),
    ("white", (0.88, 0.88, 0.86)),
)
HAIR_STYLES = ("short", "long", "curly", "buzz", "bald")
IRIS_COLOURS = (
    ("brown", (0.30, 0.18, 0.10)), ("dark", (0.14, 0.09, 0.06)), ("blue", (0.30, 0.45, 0.65)),
    ("green", (0.30, 0.45, 0.30)), ("hazel", (0.45, 0.35, 0.18)),
)
BACKGROUNDS = (
    ("blue", (0.30, 0.45, 0.75)), ("green", (0.35, 0.60, 0.40)), ("grey", (0.55, 0.56, 0.58)),
    ("white", (0.90, 0.90, 0.88)), ("teal", (0.20, 0.50, 0.52)), ("purple", (0.45, 0.35, 0.60)),
    ("dark grey", (0.22, 0.23, 0.25)), ("light blue", (0.62, 0.76, 0.90)),
)
CLOTHES = (
    ("red", (0.70, 0.15, 0.15)), ("navy", (0.12, 0.16, 0.35)), ("white", (0.90, 0.90, 0.90)),
    ("black", (0.10, 0.10, 0.11)), ("green", (0.20, 0.45, 0.25)), ("yellow", (0.85, 0.72, 0.20)),
    ("grey", (0.45, 0.45, 0.47)),
)
HAT_COLOURS = (("red", (0.72, 0.12, 0.12)), ("blue", (0.15, 0.25, 0.60)), ("green", (0.18, 0.42, 0.22)),
               ("black", (0.08, 0.08, 0.09)), ("yellow", (0.85, 0.70, 0.15)))
FRAME_COLOURS = (("black", (0.05, 0.05, 0.05)), ("brown", (0.30, 0.18, 0.10)), ("gold", (0.75, 0.62, 0.30)))

# Expression -> geometry of eyes, brows and mouth (head units; the face is about 1.5 wide).
EXPRESSION_SHAPES: dict[str, dict[str, float]] = {
    "neutral": dict(eye_open=1.0, lower_lid=1.0, brow_raise=0.0, brow_inner=0.0, mouth_width=1.0,
                    corner_lift=0.0, mouth_open=0.0, lip_scale=1.0, jaw_drop=0.0, teeth=0.0),
    "happy": dict(eye_open=0.8, lower_lid=0.6, brow_raise=0.01, brow_inner=0.0, mouth_width=1.18,
                  corner_lift=0.075, mouth_open=0.05, lip_scale=0.85, jaw_drop=0.01, teeth=1.0),
    "surprised": dict(eye_open=1.45, lower_lid=1.05, brow_raise=0.075, brow_inner=0.01, mouth_width=0.72,
                      corner_lift=0.0, mouth_open=0.17, lip_scale=0.9, jaw_drop=0.07, teeth=0.0),
    "sad": dict(eye_open=0.82, lower_lid=1.0, brow_raise=0.0, brow_inner=0.055, mouth_width=0.95,
                corner_lift=-0.055, mouth_open=0.0, lip_scale=1.0, jaw_drop=0.0, teeth=0.0),
    "angry": dict(eye_open=0.72, lower_lid=0.9, brow_raise=-0.03, brow_inner=-0.065, mouth_width=0.9,
                  corner_lift=-0.02, mouth_open=0.0, lip_scale=0.65, jaw_drop=0.0, teeth=0.0),
}
EXPRESSION_PHRASES = {
    "neutral": "with a neutral expression", "happy": "smiling", "surprised": "looking surprised",
    "sad": "looking sad", "angry": "looking angry",
}

# Materials of the ray-cast scene.
BG, SKIN, HAIR, HAT, CLOTH, NECK = 0, 1, 2, 3, 4, 5


# --------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class Identity:
    """Factors fixed for one person (sampled once per identity)."""

    index: int
    skin_name: str
    skin: tuple[float, float, float]
    hair_name: str
    hair: tuple[float, float, float]
    hair_style: str
    fringe: float
    face_width: float
    face_height: float
    jaw: float
    chin: float
    eye_spacing: float
    eye_width: float
    eye_height: float
    eye_tilt: float
    iris_name: str
    iris: tuple[float, float, float]
    brow_thickness: float
    brow_arch: float
    brow_height: float
    nose_length: float
    nose_width: float
    nose_depth: float
    mouth_width: float
    lip_upper: float
    lip_lower: float
    socket: float
    blush: float
    lip_tint: float
    glasses: str | None
    glasses_shape: str
    glasses_colour: tuple[float, float, float]
    beard: str | None
    hat: str | None
    hat_colour: tuple[float, float, float]
    clothes: tuple[float, float, float]
    head_scale: float

    @property
    def name(self) -> str:
        return identity_name(self.index)

    def attributes(self) -> dict[str, Any]:
        """The identity factors as JSON-friendly values (stored in every annotation)."""
        keep = ("skin_name", "skin", "hair_name", "hair_style", "iris_name", "glasses", "beard", "hat", "face_width",
                "face_height", "jaw", "eye_spacing", "eye_width", "brow_thickness", "brow_arch",
                "nose_length", "nose_width", "mouth_width")
        d = asdict(self)

        def tidy(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 4)
            return [tidy(a) for a in v] if isinstance(v, (tuple, list)) else v

        return {k: tidy(d[k]) for k in keep}


@dataclass(frozen=True)
class Motion:
    """Factors of one image: pose, expression, lighting, background, framing."""

    yaw: float
    pitch: float
    roll: float
    expression: str
    background_name: str
    background: tuple[float, float, float]
    light: tuple[float, float, float]
    ambient: float
    gain: float
    gaze: tuple[float, float]
    shift: tuple[float, float]
    scale: float


def identity_name(index: int) -> str:
    return f"id_{index:04d}"


def _pick(rng: "np.random.Generator", palette: Sequence[Any]) -> Any:
    return palette[int(rng.integers(len(palette)))]


def sample_identity(seed: int, index: int) -> Identity:
    """Identity factors from a generator seeded by (seed, identity) only: rerun-stable and order-free."""
    import numpy as np

    rng = np.random.default_rng([seed, 0, index])
    u = rng.uniform
    # Skin: a continuous tone between neighbouring palette entries (named after the nearer one).
    pos = float(rng.uniform(0, len(SKIN_TONES) - 1))
    lo, frac = int(pos), pos - int(pos)
    hi = min(lo + 1, len(SKIN_TONES) - 1)
    skin_name = SKIN_TONES[lo if frac < 0.5 else hi][0]
    skin = tuple(float(a + frac * (b - a)) for a, b in zip(SKIN_TONES[lo][1], SKIN_TONES[hi][1]))
    hair_name, hair = _pick(rng, HAIR_COLOURS)
    style = HAIR_STYLES[int(rng.choice(len(HAIR_STYLES), p=[0.32, 0.26, 0.16, 0.14, 0.12]))]
    hat = None
    hat_colour = (0.0, 0.0, 0.0)
    if rng.random() < 0.15:
        hat, hat_colour = _pick(rng, HAT_COLOURS)
    glasses = None
    glasses_colour = (0.0, 0.0, 0.0)
    if rng.random() < 0.3:
        glasses, glasses_colour = _pick(rng, FRAME_COLOURS)
    beard = None
    if rng.random() < 0.3:
        beard = "full beard" if rng.random() < 0.6 else "goatee"
    return Identity(
        index=index, skin_name=skin_name, skin=skin, hair_name=hair_name, hair=hair, hair_style=style,
        fringe=float(u(0.0, 0.25)) if style in ("short", "long") else 0.0,
        face_width=float(u(0.82, 1.12)), face_height=float(u(0.93, 1.08)), jaw=float(u(0.6, 0.92)),
        chin=float(u(0.9, 1.12)), eye_spacing=float(u(0.27, 0.35)), eye_width=float(u(0.11, 0.16)),
        eye_height=float(u(0.045, 0.07)), eye_tilt=float(u(-0.1, 0.2)),
        iris_name=(iris := _pick(rng, IRIS_COLOURS))[0], iris=iris[1],
        brow_thickness=float(u(0.04, 0.09)), brow_arch=float(u(0.0, 0.05)), brow_height=float(u(0.13, 0.22)),
        nose_length=float(u(0.3, 0.44)), nose_width=float(u(0.09, 0.17)), nose_depth=float(u(0.12, 0.24)),
        mouth_width=float(u(0.18, 0.28)), lip_upper=float(u(0.03, 0.065)), lip_lower=float(u(0.045, 0.085)),
        socket=float(u(0.35, 0.55)), blush=float(u(0.04, 0.2)), lip_tint=float(u(0.8, 1.2)),
        glasses=glasses, glasses_shape="round" if rng.random() < 0.5 else "square", glasses_colour=glasses_colour,
        beard=beard, hat=hat, hat_colour=hat_colour, clothes=_pick(rng, CLOTHES)[1],
        head_scale=float(u(0.96, 1.04)),
    )


def sample_motion(seed: int, identity: int, image: int) -> Motion:
    """Motion factors of image ``image`` of ``identity``: the pose/expression grid plus small jitter."""
    import numpy as np

    rng = np.random.default_rng([seed, 1, identity, image])
    yaw, pitch = POSES[image % len(POSES)]
    bg_name, bg = _pick(rng, BACKGROUNDS)
    lx, ly = rng.uniform(-0.5, 0.3), rng.uniform(0.15, 0.5)
    light = np.array([lx, ly, 1.0]) / math.sqrt(lx * lx + ly * ly + 1.0)
    return Motion(
        yaw=float(yaw + rng.uniform(-3, 3)), pitch=float(pitch + rng.uniform(-3, 3)),
        roll=float(rng.uniform(-6, 6)), expression=EXPRESSIONS[image % len(EXPRESSIONS)],
        background_name=bg_name, background=bg, light=tuple(float(v) for v in light),
        ambient=float(rng.uniform(0.32, 0.45)), gain=float(rng.uniform(0.92, 1.08)),
        gaze=(float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.01, 0.01))),
        shift=(float(rng.uniform(-0.025, 0.025)), float(rng.uniform(-0.02, 0.02))),
        scale=float(rng.uniform(0.96, 1.04)),
    )


def caption(identity: Identity, motion: Motion) -> str:
    """A short caption naming the identity's visible factors, the expression, pose and background."""
    extras = []
    if identity.hair_style == "bald":
        if not identity.hat:
            extras.append("a bald head")
    elif identity.hat:  # only the colour shows under a hat
        extras.append(f"{identity.hair_name} hair")
    elif identity.hair_style == "buzz":
        extras.append(f"a {identity.hair_name} buzz cut")
    else:
        extras.append(f"{identity.hair_style} {identity.hair_name} hair")
    if identity.beard:
        extras.append(f"a {identity.beard}")
    if identity.glasses:
        extras.append("glasses")
    parts = ["a photo of a person"]
    if extras:
        text = extras[0] if len(extras) == 1 else ", ".join(extras[:-1]) + " and " + extras[-1]
        parts[0] += f" with {text}"
    if identity.hat:
        parts.append(f"wearing a {identity.hat} hat")
    parts.append(EXPRESSION_PHRASES[motion.expression])
    parts.append(_pose_phrase(motion))
    parts.append(f"on a {motion.background_name} background")
    return ", ".join(parts)


def _pose_phrase(motion: Motion) -> str:
    if abs(motion.yaw) >= 10:
        side = "left" if motion.yaw > 0 else "right"
        return f"head turned {'slightly ' if abs(motion.yaw) < 25 else ''}to their {side}"
    if abs(motion.pitch) >= 8:
        return "looking up" if motion.pitch > 0 else "looking down"
    return "facing the camera"


# --------------------------------------------------------------------------- geometry


def rotation(yaw: float, pitch: float, roll: float) -> "np.ndarray":
    """World-from-head rotation [3, 3] (degrees; x right, y up, z to the camera): roll @ pitch @ yaw."""
    import numpy as np

    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), math.sin(b)], [0, -math.sin(b), math.cos(b)]])
    rz = np.array([[math.cos(c), math.sin(c), 0], [-math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _tilt_x(angle: float) -> "np.ndarray":
    import numpy as np

    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


@dataclass
class Blob:
    """An ellipsoid of a head: centre and semi-axes in head (or body) coordinates, plus a material.

    ``mask(unit)`` may reject hits (unit [3, ...]: hit point in the ellipsoid's unit-sphere
    frame), which is how the hair shell gets a hairline. ``smooth`` > 0 joins a skin blob to
    the skin before it with a smooth maximum of that width (head units) instead of a crease.
    """

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    material: int
    tilt: float = 0.0
    body: bool = False
    mask: Callable | None = None
    smooth: float = 0.0


@dataclass
class Face:
    """Head geometry of one identity with one expression: blobs, feature shapes, landmarks."""

    identity: Identity
    expression: str
    blobs: list[Blob]
    skin_blobs: list[Blob]
    shape: dict[str, float]
    eye_y: float
    mouth_y: float
    hairline: float

    # -- analytic feature curves (head coordinates) --------------------------------------
    def eye_curves(self, x: "np.ndarray", side: int) -> tuple["np.ndarray", ...]:
        """(r, y_upper, y_lower) of the eye on ``side`` (-1 image left, +1 image right) at head x."""
        import numpy as np

        idn, sh = self.identity, self.shape
        ex = side * idn.eye_spacing * idn.face_width
        r = side * (x - ex) / idn.eye_width  # -1 inner corner, +1 outer corner
        base = self.eye_y + idn.eye_tilt * idn.eye_width * r * 0.5
        prof = np.clip(1.0 - r * r, 0.0, None)
        up = base + idn.eye_height * sh["eye_open"] * prof**0.75 * (1.0 - 0.12 * r)
        lo = base - idn.eye_height * 0.62 * sh["lower_lid"] * prof**0.9
        return r, up, lo

    def brow_curve(self, x: "np.ndarray", side: int) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        """(t, centre y, thickness) of the brow: t = -1 at the inner end, +1 at the outer end."""
        import numpy as np

        idn, sh = self.identity, self.shape
        ex = side * idn.eye_spacing * idn.face_width
        inner, outer = 0.14, 0.19
        lx = side * (x - ex)
        t = (lx - (outer - inner) / 2) / ((outer + inner) / 2)
        base = self.eye_y + idn.brow_height + sh["brow_raise"]
        arch = (idn.brow_arch + 0.3 * sh["brow_raise"]) * (1.0 - np.clip(t - 0.1, -1, 1) ** 2)
        inner_shift = sh["brow_inner"] * np.clip(-t, 0.0, 1.0) ** 1.2
        y = base + arch + inner_shift - 0.025 * np.clip(t, 0, 1) ** 2 + 0.02 * idn.eye_tilt * t
        thick = idn.brow_thickness * (1.05 - 0.45 * (t + 1) / 2)
        return t, y, thick

    def mouth_curves(self, x: "np.ndarray") -> tuple["np.ndarray", ...]:
        """(r, outer upper, inner upper, inner lower, outer lower, seam) y of the lips at head x."""
        import numpy as np

        idn, sh = self.identity, self.shape
        mw = idn.mouth_width * sh["mouth_width"]
        r = x / mw
        rr = np.clip(r * r, 0.0, 1.0)
        base = self.mouth_y + sh["corner_lift"] * rr
        open_ = sh["mouth_open"]
        iu = base + 0.5 * open_ * (1 - rr) ** 0.6
        il = base - 0.5 * open_ * (1 - rr) ** 0.6
        ou = iu + idn.lip_upper * sh["lip_scale"] * (1 - rr) ** 0.45 * (1 - 0.3 * np.exp(-(r / 0.18) ** 2))
        ol = il - idn.lip_lower * sh["lip_scale"] * (1 - rr) ** 0.55
        return r, ou, iu, il, ol, base

    # -- landmarks -------------------------------------------------------------------------
    def surface_z(self, x: "np.ndarray", y: "np.ndarray") -> "np.ndarray":
        """Front-most skin depth at head (x, y): the same ellipsoids the renderer ray-casts."""
        import numpy as np

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        best = np.full(x.shape, -np.inf)
        for blob in self.skin_blobs:  # same order and joins as Canvas.add_head
            hit, t, *_ = _raycast(x, y, _tilt_x(blob.tilt), np.array(blob.centre), blob.axes)
            if blob.smooth > 0:
                t = np.where(np.isfinite(best), _smooth_max(best, t, blob.smooth), t)
            best = np.where(hit & (t >= best), t, best)
        return best

    def landmarks_3d(self) -> "np.ndarray":
        """iBUG-68 points [68, 3] in head coordinates (jaw 0-16 excluded: they depend on the view)."""
        import numpy as np

        idn = self.identity
        pts = np.zeros((68, 3))
        # brows 17-26, image left to right.
        for side, sl in ((-1, slice(17, 22)), (1, slice(22, 27))):
            ex = side * idn.eye_spacing * idn.face_width
            lx = np.linspace(0.19, -0.14, 5) if side < 0 else np.linspace(-0.14, 0.19, 5)
            xs = ex + side * lx
            _, ys, _ = self.brow_curve(xs, side)
            pts[sl, 0], pts[sl, 1] = xs, ys
        # nose bridge 27-30 and base 31-35.
        tip = self.nose_tip()
        ys = np.linspace(self.eye_y + 0.02, tip[1], 4)
        pts[27:30, 0], pts[27:30, 1] = 0.0, ys[:3]
        nl, nw = idn.nose_length, idn.nose_width
        pts[31:36, 0] = np.array([-0.8, -0.4, 0.0, 0.4, 0.8]) * nw
        pts[31:36, 1] = self.eye_y - nl + np.array([0.05, 0.0, -0.015, 0.0, 0.05])
        # eyes 36-47: image-left corner, upper lid, image-right corner, lower lid.
        for side, sl in ((-1, slice(36, 42)), (1, slice(42, 48))):
            ex = side * idn.eye_spacing * idn.face_width
            w = idn.eye_width
            xs = ex + np.array([-w, -w / 3, w / 3, w, w / 3, -w / 3])
            _, up, lo = self.eye_curves(xs, side)
            pts[sl, 0] = xs
            pts[sl, 1] = np.where(np.arange(6) < 3, up, lo)  # at the corners (|r| = 1) the lids meet
        # mouth 48-67.
        mw = idn.mouth_width * self.shape["mouth_width"]
        r_out = np.array([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, -1 / 3, -2 / 3])
        xs = r_out * mw
        _, ou, _, _, ol, base = self.mouth_curves(xs)
        ys = np.where(np.arange(12) <= 6, ou, ol)
        ys[0], ys[6] = base[0], base[6]
        pts[48:60, 0], pts[48:60, 1] = xs, ys
        r_in = np.array([-0.9, -1 / 3, 0, 1 / 3, 0.9, 1 / 3, 0, -1 / 3])
        xs = r_in * mw
        _, _, iu, il, _, base = self.mouth_curves(xs)
        ys = np.where(np.arange(8) <= 4, iu, il)
        ys[0], ys[4] = base[0], base[4]
        pts[60:68, 0], pts[60:68, 1] = xs, ys
        pts[17:68, 2] = self.surface_z(pts[17:68, 0], pts[17:68, 1])
        pts[30] = tip
        return pts

    @property
    def chin_blob(self) -> Blob:
        return self.skin_blobs[5]

    def nose_tip(self) -> "np.ndarray":
        """Front-most point of the nose ellipsoid (pronasale), head coordinates [3]."""
        import numpy as np

        nose = self.skin_blobs[2]
        rot = _tilt_x(nose.tilt)
        m_inv = rot @ np.diag(np.square(nose.axes)) @ rot.T  # inverse of the quadric matrix
        d = m_inv[:, 2] / math.sqrt(m_inv[2, 2])
        return np.array(nose.centre) + d


def build_face(identity: Identity, expression: str) -> Face:
    """Blobs and feature shapes of ``identity`` making ``expression``."""
    idn = identity
    sh = EXPRESSION_SHAPES[expression]
    fw, fh = idn.face_width, idn.face_height
    cran_c, cran_a = (0.0, 0.14 * fh, 0.0), (0.78 * fw, 1.0 * fh, 0.9)
    jaw_drop = sh["jaw_drop"]
    jaw_c = (0.0, -0.3 * fh - jaw_drop / 2, 0.05)
    jaw_a = (0.78 * fw * idn.jaw, 0.72 * fh * idn.chin + jaw_drop / 2, 0.78)
    eye_y = 0.0
    nl = idn.nose_length
    mouth_y = eye_y - nl - 0.2 - jaw_drop * 0.3
    nose_c = (0.0, eye_y - 0.56 * nl, 0.9 - idn.nose_depth * 0.55)
    nose = Blob(nose_c, (0.07 + 0.2 * idn.nose_width, 0.56 * nl, 0.3), SKIN, tilt=-0.3, smooth=0.06)
    ala_z = 0.72 + idn.nose_depth * 0.15
    alae = [Blob((s * idn.nose_width * 0.72, eye_y - nl + 0.055, ala_z), (0.06, 0.05, 0.075), SKIN, smooth=0.03)
            for s in (-1, 1)]
    ears = [Blob((s * cran_a[0] * 0.96, eye_y - 0.1, -0.08), (0.08, 0.17, 0.12), SKIN) for s in (-1, 1)]
    chin_y = jaw_c[1] - jaw_a[1] + 0.12
    chin = Blob((0.0, chin_y, 0.3), (0.21 * fw, 0.125, 0.25), SKIN, smooth=0.12)
    skin = [Blob(cran_c, cran_a, SKIN), Blob(jaw_c, jaw_a, SKIN, smooth=0.12), nose, *alae, chin, *ears]
    # skin_blobs order is fixed: 0 cranium, 1 jaw, 2 nose, 3-4 nostril wings, 5 chin, 6-7 ears.
    hairline = eye_y + idn.brow_height + 0.36
    blobs = list(skin)
    blobs += _hair_blobs(idn, cran_c, cran_a, hairline)
    blobs += [
        Blob((0.0, -1.25, -0.12), (0.34 * fw, 0.6, 0.32), NECK, body=True),
        Blob((0.0, -2.32, -0.3), (1.45, 0.88, 0.55), CLOTH, body=True),
    ]
    return Face(idn, expression, blobs, skin, sh, eye_y, mouth_y, hairline)


def _hair_blobs(idn: Identity, cran_c: tuple[float, float, float], cran_a: tuple[float, float, float],
                hairline: float) -> list[Blob]:
    """Hair shell (and a back-hair volume for long hair), plus a beanie when the identity wears a hat."""
    import numpy as np

    style = idn.hair_style
    volume = {"short": 0.06, "long": 0.07, "curly": 0.15, "buzz": 0.018, "bald": 0.02}[style]
    centre = (cran_c[0], cran_c[1] + 0.02, cran_c[2] - 0.02)
    axes = tuple(a * (1 + volume) for a in cran_a)
    front = (hairline - centre[1]) / axes[1]
    side = {"short": -0.08, "long": -0.8, "curly": -0.3, "buzz": 0.0, "bald": -0.3}[style]
    fringe = idn.fringe

    lo, hi = (0.1, 0.45) if style == "long" else (0.4, 0.8)  # long hair falls behind the cheeks

    def hair_mask(unit: "np.ndarray") -> "np.ndarray":
        ux, uy, uz = unit
        w = np.clip((hi - uz) / (hi - lo), 0.0, 1.0)
        line = (front - fringe * np.exp(-(ux / 0.45) ** 2)) * (1 - w) + side * w
        return uy > line

    blobs = [] if style == "bald" else [Blob(centre, axes, HAIR, mask=hair_mask)]
    if style == "long":
        blobs.append(Blob((0.0, -0.55, -0.45), (0.86 * idn.face_width, 0.95, 0.55), HAIR))
    if idn.hat:
        hat_axes = tuple(a * (1 + volume + 0.06) for a in cran_a)
        hat_line = (hairline + 0.06 - centre[1]) / hat_axes[1]
        blobs.append(Blob(centre, hat_axes, HAT, mask=lambda unit: unit[1] > hat_line))
    return blobs


def _raycast(x: "np.ndarray", y: "np.ndarray", g: "np.ndarray", centre: Sequence[float],
             axes: Sequence[float]) -> tuple["np.ndarray", "np.ndarray", tuple["np.ndarray", ...], "np.ndarray"]:
    """Front hit of orthographic rays (x, y, +inf -> -inf) with an ellipsoid.

    g [3, 3] maps ellipsoid-frame vectors to the ray frame, centre is in the ray frame.
    Returns (hit, t, d, m): hit mask, depth t of the hit, d = hit - centre (3 arrays), quadric m.
    The quadric (p - c)^T M (p - c) = 1 with M = G diag(1/a^2) G^T gives a quadratic in t.
    """
    import numpy as np

    m = (g * (1.0 / np.square(np.asarray(axes, dtype=np.float64)))) @ g.T
    # Python floats keep the arrays' precision (float32 pixels, float64 landmarks).
    (m00, m01, m02), (_, m11, m12), (_, _, m22) = m.tolist()
    c0, c1, c2 = (float(v) for v in centre)
    dx = x - c0
    dy = y - c1
    b = m02 * dx + m12 * dy
    c = m00 * dx * dx + 2.0 * m01 * dx * dy + m11 * dy * dy - 1.0
    disc = b * b - m22 * c
    hit = disc > 0.0
    tau = (-b + np.sqrt(np.maximum(disc, 0.0))) / m22
    return hit, c2 + tau, (dx, dy, tau), m


# --------------------------------------------------------------------------- rendering


@dataclass
class Placement:
    """Where a head sits in the image: centre of the eye line (pixels) and pixels per head unit."""

    face: Face
    motion: Motion
    cx: float
    cy: float
    scale: float

    @cached_property
    def rot(self) -> "np.ndarray":
        return rotation(self.motion.yaw, self.motion.pitch, self.motion.roll)

    @cached_property
    def body_rot(self) -> "np.ndarray":
        m = self.motion
        return rotation(0.25 * m.yaw, 0.15 * m.pitch, 0.3 * m.roll)

    def project(self, pts: "np.ndarray") -> "np.ndarray":
        """Head points [N, 3] -> image points [N, 2] (OpenCV pixel-centre convention)."""
        world = pts @ self.rot.T
        return _to_pixels(world, self.cx, self.cy, self.scale)


def _to_pixels(world: "np.ndarray", cx: float, cy: float, scale: float) -> "np.ndarray":
    """World points [N, 3] (head units, y up) -> pixels [N, 2] (y down)."""
    import numpy as np

    return np.stack([cx + scale * world[:, 0], cy - scale * world[:, 1]], axis=1)


def place(face: Face, motion: Motion, size: int) -> Placement:
    """Default framing: eye line a little above the centre, face about 60 % of the image wide."""
    s = 0.335 * size * face.identity.head_scale * motion.scale
    return Placement(face, motion, size * (0.5 + motion.shift[0]), size * (0.45 + motion.shift[1]), s)


def annotate(pl: Placement) -> dict[str, Any]:
    """Exact 2-D annotations of a placed head: 68 landmarks, 5 kps, box, from the rendered geometry."""
    import numpy as np

    face = pl.face
    pts3 = face.landmarks_3d()
    lm = pl.project(pts3)
    lm[0:17] = _jaw_outline(pl)
    fy = face.hairline - 0.02
    forehead = np.array([[0.0, fy, float(face.surface_z(np.array([0.0]), np.array([fy]))[0])]])
    allp = np.concatenate([lm, pl.project(forehead)])
    box = [float(allp[:, 0].min()), float(allp[:, 1].min()), float(allp[:, 0].max()), float(allp[:, 1].max())]
    kps = np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
    return {"landmarks": lm, "kps": kps, "box": box}


def _jaw_outline(pl: Placement) -> "np.ndarray":
    """Points 0-16: the visible outline of the face (cranium, jaw and chin ellipsoids), as iBUG places them.

    The silhouette of an ellipsoid under orthographic projection is the ellipse given by the
    Schur complement of its projected quadric. Point i lies on the outer envelope of these
    ellipses along a ray from a centre inside the face (head point (0, eye_y - 0.35, 0)); the
    rays' head-frame angles run evenly from eye level on the image left, under the chin, to
    eye level on the image right, and rotate with the head.
    """
    import numpy as np

    face, r = pl.face, pl.rot
    centre3 = np.array([0.0, face.eye_y - 0.35, 0.0])
    centre = (r @ centre3)[:2]
    half_width = 0.78 * face.identity.face_width
    alpha = math.atan2(0.3, half_width)  # ray 0 points at (-half_width, eye_y - 0.05)
    ang = np.linspace(math.pi - alpha, 2 * math.pi + alpha, 17)
    dirs = (np.stack([np.cos(ang), np.sin(ang), np.zeros(17)], axis=1) @ r.T)[:, :2]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    reach = np.zeros(17)
    for blob in (face.skin_blobs[0], face.skin_blobs[1], face.chin_blob):
        m = (r * (1.0 / np.square(np.asarray(blob.axes)))) @ r.T
        conic = m[:2, :2] - np.outer(m[:2, 2], m[:2, 2]) / m[2, 2]  # 2-D ellipse of the outline
        off = centre - (r @ np.array(blob.centre))[:2]
        a = np.einsum("ni,ij,nj->n", dirs, conic, dirs)
        b = dirs @ conic @ off
        c = off @ conic @ off - 1.0
        disc = b * b - a * c
        far = np.where(disc >= 0, (-b + np.sqrt(np.maximum(disc, 0.0))) / a, 0.0)
        reach = np.maximum(reach, far)
    world = np.concatenate([centre + dirs * reach[:, None], np.zeros((17, 1))], axis=1)
    return _to_pixels(world, pl.cx, pl.cy, pl.scale)


class Canvas:
    """Super-sampled z-buffer scene: per sample depth, material, head and winning blob.

    Normals and head-frame hit points are computed once at the end (``finish``) for the
    samples that survived, not for every blob that was ray-cast.
    """

    def __init__(self, size: int, ss: int):
        import numpy as np

        self.size, self.ss = size, ss
        n = size * ss
        self.n = n
        coords = (np.arange(n, dtype=np.float32) + 0.5) / ss - 0.5  # OpenCV pixel-centre coords
        self.u = coords[None, :]
        self.v = coords[:, None]
        self.z = np.full((n, n), -np.inf, dtype=np.float32)
        self.mat = np.zeros((n, n), dtype=np.int8)
        self.head = np.full((n, n), -1, dtype=np.int8)
        self.blob = np.full((n, n), -1, dtype=np.int16)
        self.blobs: list[tuple] = []  # (placement, g, centre, axes, bbox) per blob id
        self.placements: list[Placement] = []

    def add_head(self, pl: Placement) -> None:
        """Ray-cast every ellipsoid of a placed head (within its screen box) into the z-buffer."""
        import numpy as np

        index = len(self.placements)
        self.placements.append(pl)
        for blob in pl.face.blobs:
            rot = pl.body_rot if blob.body else pl.rot
            g = rot @ _tilt_x(blob.tilt)
            centre = rot @ np.array(blob.centre)
            radius = max(blob.axes)
            c0, c1 = self._span(pl.cx + pl.scale * (centre[0] - radius), pl.cx + pl.scale * (centre[0] + radius))
            r0, r1 = self._span(pl.cy - pl.scale * (centre[1] + radius), pl.cy - pl.scale * (centre[1] - radius))
            if c0 >= c1 or r0 >= r1:
                continue
            xs = (self.u[:, c0:c1] - pl.cx) / pl.scale
            ys = (pl.cy - self.v[r0:r1, :]) / pl.scale
            xs, ys = np.broadcast_arrays(xs, ys)
            hit, t, d, _ = _raycast(xs, ys, g, centre, blob.axes)
            if blob.mask is not None:
                unit = np.einsum("ji,jhw->ihw", g, np.stack(d)) / np.asarray(blob.axes, dtype=np.float32)[:, None, None]
                hit &= blob.mask(unit)
            depth = (t * pl.scale).astype(np.float32)
            zs = self.z[r0:r1, c0:c1]
            if blob.smooth > 0:  # smooth union with this head's skin: no crease between cheek and jaw
                own = hit & (self.head[r0:r1, c0:c1] == index) & (self.mat[r0:r1, c0:c1] == SKIN)
                blended = _smooth_max(zs, depth, blob.smooth * pl.scale)
                depth = np.where(own, blended, depth)
            win = hit & (depth >= zs)
            if not win.any():
                continue
            bid = len(self.blobs)
            self.blobs.append((pl, g, centre, blob.axes, (r0, r1, c0, c1)))
            np.copyto(zs, depth, where=win)
            np.copyto(self.mat[r0:r1, c0:c1], blob.material, where=win)
            np.copyto(self.head[r0:r1, c0:c1], index, where=win)
            np.copyto(self.blob[r0:r1, c0:c1], bid, where=win)

    def _span(self, a: float, b: float) -> tuple[int, int]:
        lo = int(math.floor((a + 0.5) * self.ss)) - 1
        hi = int(math.ceil((b + 0.5) * self.ss)) + 1
        return max(lo, 0), min(hi, self.n)

    def finish(self) -> tuple["np.ndarray", "np.ndarray", tuple[slice, slice]]:
        """Unit normals [3, h, w] (world) and head-frame hit points [3, h, w] inside the covered crop.

        Skin normals come from finite differences of the depth buffer, so the smooth unions
        shade smoothly; where the depth jumps (occlusion edges) the analytic normal of the
        winning ellipsoid is used instead. Only the crop that holds heads is processed.
        """
        import numpy as np

        covered = self.mat != BG
        rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
        if rows.size == 0:
            crop = (slice(0, 0), slice(0, 0))
            return np.zeros((3, 0, 0), np.float32), np.zeros((3, 0, 0), np.float32), crop
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = (slice(r0, r1), slice(c0, c1))
        h, w = r1 - r0, c1 - c0
        zc, mat, blob = self.z[crop], self.mat[crop], self.blob[crop]
        u, v = self.u[0, c0:c1], self.v[r0:r1, 0]
        normal = np.zeros((3, h, w), dtype=np.float32)
        q = np.zeros((3, h, w), dtype=np.float32)
        for bid, (pl, g, centre, axes, (b0, b1, b2, b3)) in enumerate(self.blobs):
            # search only the blob's own box (clipped to the crop)
            b0, b1, b2, b3 = max(b0, r0) - r0, min(b1, r1) - r0, max(b2, c0) - c0, min(b3, c1) - c0
            rr, cc = np.nonzero(blob[b0:b1, b2:b3] == bid)
            if rr.size == 0:
                continue
            rr += b0
            cc += b2
            e0, e1, e2 = (float(a) for a in centre)
            d = np.stack([(u[cc] - pl.cx) / pl.scale - e0, (pl.cy - v[rr]) / pl.scale - e1, zc[rr, cc] / pl.scale - e2])
            m = ((g * (1.0 / np.square(np.asarray(axes)))) @ g.T).astype(np.float32)
            nrm = m @ d
            normal[:, rr, cc] = nrm / (np.linalg.norm(nrm, axis=0, keepdims=True) + 1e-12)
        skin = mat == SKIN
        srows, scols = np.flatnonzero(skin.any(1)), np.flatnonzero(skin.any(0))
        if srows.size:
            sk = (slice(max(srows[0] - 1, 0), srows[-1] + 2), slice(max(scols[0] - 1, 0), scols[-1] + 2))
            zs = zc[sk]
            finite = np.where(np.isfinite(zs), zs, np.float32(-1e4))
            dz_dv, dz_du = np.gradient(finite, np.float32(1.0 / self.ss))
            fd = np.stack([-dz_du, dz_dv, np.ones_like(dz_du)])
            fd /= np.linalg.norm(fd, axis=0, keepdims=True)
            smooth = skin[sk] & (np.abs(dz_du) < 3.0) & (np.abs(dz_dv) < 3.0)
            np.copyto(normal[:, sk[0], sk[1]], fd, where=smooth[None])
        head = self.head[crop]
        for index, pl in enumerate(self.placements):
            rr, cc = np.nonzero((head == index) & (mat != CLOTH) & (mat != NECK))
            p = np.stack([(u[cc] - pl.cx) / pl.scale, (pl.cy - v[rr]) / pl.scale, zc[rr, cc] / pl.scale])
            q[:, rr, cc] = pl.rot.T.astype(np.float32) @ p
        return normal, q, crop


def _smooth_max(a: "np.ndarray", b: "np.ndarray", k: float) -> "np.ndarray":
    """Polynomial smooth maximum (C1 continuous); equals max(a, b) where |a - b| >= k."""
    import numpy as np

    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.maximum(a, b) + h * h * (k * 0.25)


def _mix(base: "np.ndarray", colour: Any, alpha: Any) -> "np.ndarray":
    """base [3, N] toward colour [3] or [3, N] by alpha [N]."""
    import numpy as np

    colour = np.asarray(colour, dtype=np.float32)
    if colour.ndim == 1:
        colour = colour[:, None]
    return base * (1 - alpha) + colour * alpha


def _noise(q: "np.ndarray") -> "np.ndarray":
    """Cheap deterministic hash noise in [0, 1) of head-frame points [3, N] (skin pores, hair grain)."""
    import numpy as np

    return np.modf(np.abs(np.sin(q[0] * 127.1 + q[1] * 311.7 + q[2] * 74.7) * 43758.5453))[0]


def _window(x: "np.ndarray", y: "np.ndarray", x0: float, x1: float, y0: float, y1: float) -> "np.ndarray":
    """Indices of the samples inside a head-frame rectangle: features are evaluated only near themselves."""
    import numpy as np

    return np.flatnonzero((x > x0) & (x < x1) & (y > y0) & (y < y1))


def _skin_texture(face: Face, q: "np.ndarray", gaze: tuple[float, float]) -> tuple["np.ndarray", "np.ndarray"]:
    """Albedo [3, N] and shading factor [N] of skin samples at head points q [3, N]."""
    import numpy as np

    idn = face.identity
    x, y = q[0], q[1]
    n = x.shape[0]
    skin = np.asarray(idn.skin, dtype=np.float32)
    col = skin[:, None] * (0.96 + 0.06 * _noise(q))[None]  # [3, N]
    shade = np.ones(n, dtype=np.float32)
    ey, my = face.eye_y, face.mouth_y
    tip_y = ey - idn.nose_length
    # Eye sockets: real faces are darkest around the eyes; cheeks get a touch of red.
    for side in (-1, 1):
        ex = side * idn.eye_spacing * idn.face_width
        k = _window(x, y, ex - 0.4, ex + 0.4, ey - 0.25, ey + 0.3)
        shade[k] *= 1.0 - idn.socket * np.exp(-(((x[k] - ex) / 0.17) ** 2) - ((y[k] - ey - 0.03) / 0.1) ** 2)
        cx = side * 0.36 * idn.face_width
        k = _window(x, y, cx - 0.35, cx + 0.35, ey - 0.6, ey)
        g = np.exp(-(((x[k] - cx) / 0.14) ** 2) - ((y[k] - ey + 0.3) / 0.12) ** 2)
        col[:, k] = _mix(col[:, k], (0.85, 0.35, 0.3), idn.blush * g)
    # Under-nose and under-lip shadows.
    k = _window(x, y, -0.4, 0.4, tip_y - 0.25, tip_y + 0.1)
    shade[k] *= 1.0 - 0.22 * np.exp(-((x[k] / 0.12) ** 2) - ((y[k] - tip_y + 0.07) / 0.05) ** 2)
    k = _window(x, y, -0.4, 0.4, my - 0.25, my)
    shade[k] *= 1.0 - 0.15 * np.exp(-((x[k] / 0.16) ** 2) - ((y[k] - my + 0.12) / 0.05) ** 2)
    if face.shape["corner_lift"] > 0.03:  # nasolabial folds of a smile
        k = _window(x, y, -0.6, 0.6, my - 0.02, tip_y + 0.03)
        for side in (-1, 1):
            fx = side * (idn.nose_width * 0.9 + (tip_y - y[k]) * 0.45)
            shade[k] *= 1.0 - 0.25 * np.exp(-(((x[k] - fx) / 0.02) ** 2))
    hair = np.asarray(idn.hair, dtype=np.float32)
    # Brows stay darker than the skin whatever the hair colour: they carry much of a face's contrast.
    brow_col = np.minimum(hair * 0.55 + 0.03 if hair.mean() > 0.4 else hair * 0.9, skin * 0.28)
    if idn.beard:
        k = _window(x, y, -2.0, 2.0, -3.0, ey - 0.15)
        xk, yk = x[k], y[k]
        if idn.beard == "full beard":
            top = my + 0.12 + 0.5 * (np.abs(xk) / (0.78 * idn.face_width * idn.jaw)) ** 2
            region = yk < np.minimum(top, ey - 0.3)
        else:
            mw = idn.mouth_width * face.shape["mouth_width"]
            region = (np.abs(xk) < mw + 0.03) & (yk < my + 0.11) & (yk > my - 0.45)
        alpha = region * (0.65 + 0.3 * _noise(q[:, k] * 3.1))
        col[:, k] = _mix(col[:, k], hair * 0.8, alpha)
    for side in (-1, 1):  # brows
        ex = side * idn.eye_spacing * idn.face_width
        k = _window(x, y, ex - 0.3, ex + 0.3, ey + 0.05, ey + 0.45)
        t, yc, thick = face.brow_curve(x[k], side)
        inside = (np.abs(y[k] - yc) < thick / 2) & (t > -1) & (t < 1)
        col[:, k] = _mix(col[:, k], brow_col, inside * (0.85 + 0.1 * _noise(q[:, k] * 1.7)))
    for side in (-1, 1):  # nostrils
        nx = side * idn.nose_width * 0.42
        k = _window(x, y, nx - 0.04, nx + 0.04, tip_y - 0.03, tip_y + 0.03)
        g = (((x[k] - nx) / 0.034) ** 2 + ((y[k] - tip_y + 0.005) / 0.018) ** 2) < 1
        col[:, k] = _mix(col[:, k], (0.12, 0.06, 0.05), 0.85 * g)
    # Lips, the mouth opening and teeth.
    k = _window(x, y, -0.5, 0.5, my - 0.35, my + 0.25)
    xk, yk = x[k], y[k]
    r, ou, iu, il, ol, base = face.mouth_curves(xk)
    inner = np.abs(r) < 1
    lip_col = skin * np.array([0.75, 0.48 / idn.lip_tint, 0.5 / idn.lip_tint], dtype=np.float32) + np.float32(0.02)
    lips = inner & (((yk < ou) & (yk > iu)) | ((yk < il) & (yk > ol)))
    ck = _mix(col[:, k], lip_col, lips * 0.9)
    seam = inner & (np.abs(yk - base) < 0.008 + 0.5 * (iu - il))
    ck = _mix(ck, (0.16, 0.05, 0.05), seam * 0.95)
    if face.shape["teeth"] > 0:
        teeth = inner & (yk < iu) & (yk > iu - 0.55 * (iu - il)) & (np.abs(r) < 0.8)
        ck = _mix(ck, (0.92, 0.9, 0.84), teeth * 0.9)
    col[:, k] = ck
    # Eyes: lash line, lid crease, sclera, iris, pupil, glint.
    for side in (-1, 1):
        ex = side * idn.eye_spacing * idn.face_width
        k = _window(x, y, ex - 0.2, ex + 0.2, ey - 0.12, ey + 0.2)
        xk, yk = x[k], y[k]
        ck, sk = col[:, k], shade[k]
        r, up, lo = face.eye_curves(xk, side)
        inside = (np.abs(r) < 1) & (yk < up) & (yk > lo)
        lash = (np.abs(r) < 1.08) & (yk >= up) & (yk < up + 0.014 + 0.012 * np.clip(r, 0, 1))
        ck = _mix(ck, (0.06, 0.04, 0.04), lash * 0.95)
        sk = np.where(lash, 1.0, sk)
        crease = (np.abs(r) < 0.95) & (np.abs(yk - (ey + idn.eye_height * 1.9)) < 0.008)
        sk = sk * (1.0 - 0.2 * crease)
        ir = idn.eye_height * 1.05
        dx, dy = xk - ex - gaze[0], yk - ey - gaze[1] - 0.004
        rho = np.sqrt(dx * dx + dy * dy)
        iris = np.asarray(idn.iris, dtype=np.float32)[:, None] * (0.7 + 0.3 * (rho / ir))[None]
        eye_col = np.where(rho < ir, iris, np.array([0.9, 0.88, 0.85], dtype=np.float32)[:, None])
        eye_col = np.where(rho < ir * 0.42, 0.03, eye_col)
        glint = ((dx + ir * 0.3) ** 2 + (dy - ir * 0.35) ** 2) < (ir * 0.18) ** 2
        eye_col = np.where(glint, 0.95, eye_col)
        col[:, k] = np.where(inside, eye_col, ck)
        shade[k] = np.where(inside, 0.9 + 0.1 * sk, sk)
    return col, shade


def _hair_texture(face: Face, q: "np.ndarray", hat: bool) -> "np.ndarray":
    """Strand / knit modulation [N] of hair or hat samples."""
    import numpy as np

    ang = np.arctan2(q[0], q[2])
    if hat:
        return 0.85 + 0.15 * (np.sin(ang * 40) > 0)
    if face.identity.hair_style == "curly":
        return 0.7 + 0.3 * np.abs(np.sin(q[0] * 38) * np.sin(q[1] * 38) * np.sin(q[2] * 38 + 1))
    return 0.8 + 0.12 * np.sin(ang * 36 + q[1] * 9) + 0.08 * _noise(q)


def render(placements: Sequence[Placement], size: int, background: tuple[float, float, float],
           ss: int = SUPERSAMPLE, glasses: bool = True) -> "np.ndarray":
    """Render placed heads over a background gradient: uint8 image [size, size, 3]."""
    import numpy as np

    canvas = Canvas(size, ss)
    for pl in placements:
        canvas.add_head(pl)
    normal, q, crop = canvas.finish()
    n = canvas.n
    vv = np.broadcast_to(canvas.v / size, (n, n))
    uu = np.broadcast_to(canvas.u / size, (n, n))
    bg = np.asarray(background)[:, None, None]
    vignette = 1.0 - 0.25 * ((uu - 0.5) ** 2 + (vv - 0.4) ** 2)
    img = (bg * (1.08 - 0.22 * vv)[None] * vignette[None]).astype(np.float32)
    for i, pl in enumerate(placements):
        _shade_head(canvas, i, pl, img, normal, q, crop)
    if glasses:
        for i, pl in enumerate(placements):
            if pl.face.identity.glasses:
                img = _draw_glasses(canvas, pl, img)
    # Face-metered exposure, as a camera would: dark skin gets more exposure (and its background too).
    skin = canvas.mat[crop] == SKIN
    if skin.any():
        lum = float(img[:, crop[0], crop[1]][:, skin].mean())
        img *= np.float32(min(max(EXPOSURE_TARGET / max(lum, 1e-3), 0.9), 1.7))
    # Box filter ss x ss -> one pixel (anti-aliasing), then to 8 bit.
    small = img.reshape(3, size, ss, size, ss).mean(axis=(2, 4))
    return np.ascontiguousarray((np.clip(small, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def _shade_head(canvas: Canvas, index: int, pl: Placement, img: "np.ndarray", normal: "np.ndarray",
                q_all: "np.ndarray", crop: tuple[slice, slice]) -> None:
    """Colour the samples of head ``index`` inside ``crop`` (in place): albedo x Lambert + specular."""
    import numpy as np

    m = pl.motion
    light = np.asarray(m.light, dtype=np.float32)
    half = light + np.array([0.0, 0.0, 1.0], dtype=np.float32)
    half /= np.linalg.norm(half)
    sel = canvas.head[crop] == index
    mats = canvas.mat[crop]
    view = img[:, crop[0], crop[1]]
    for mat in (SKIN, NECK, HAIR, HAT, CLOTH):
        where = sel & (mats == mat)
        if not where.any():
            continue
        nrm = normal[:, where]
        q = q_all[:, where]
        lam = np.clip(light @ nrm, 0.0, None)
        spec = np.clip(half @ nrm, 0.0, None) ** 24
        idn = pl.face.identity
        if mat == SKIN:
            col, shade = _skin_texture(pl.face, q, m.gaze)
            out = col * (m.ambient + (1 - m.ambient) * lam)[None] * shade[None] + 0.1 * spec[None]
        elif mat == NECK:
            out = np.asarray(idn.skin)[:, None] * (0.7 * (m.ambient + (1 - m.ambient) * lam))[None]
        elif mat in (HAIR, HAT):
            base = np.asarray(idn.hair if mat == HAIR else idn.hat_colour)[:, None]
            tex = _hair_texture(pl.face, q, mat == HAT)
            out = base * ((0.3 + 0.7 * lam) * tex)[None] + 0.12 * spec[None]
        else:
            out = np.asarray(idn.clothes)[:, None] * (m.ambient + (1 - m.ambient) * lam)[None]
        view[:, where] = out * m.gain


def _draw_glasses(canvas: Canvas, pl: Placement, img: "np.ndarray") -> "np.ndarray":
    """Frames as 3-D polylines in front of the eyes, depth-tested against the head, drawn with PIL."""
    import numpy as np
    from PIL import Image, ImageDraw

    face, idn = pl.face, pl.face.identity
    ss = canvas.ss
    z0 = float(face.surface_z(np.array([0.0]), np.array([face.eye_y]))[0]) + 0.05
    lines = []
    for side in (-1, 1):
        ex = side * idn.eye_spacing * idn.face_width
        rx, ry = idn.eye_width * 1.35, idn.eye_width * 1.0
        a = np.linspace(0, 2 * math.pi, 49)
        p = 2.0 if idn.glasses_shape == "round" else 5.0
        cx = np.sign(np.cos(a)) * np.abs(np.cos(a)) ** (2 / p)
        cy = np.sign(np.sin(a)) * np.abs(np.sin(a)) ** (2 / p)
        ring = np.stack([ex + rx * cx, face.eye_y + 0.01 + ry * cy, np.full_like(a, z0)], axis=1)
        lines.append(ring)
        ear = np.array([side * 0.78 * idn.face_width * 0.98, face.eye_y + 0.03, -0.05])
        start = np.array([ex + side * rx, face.eye_y + 0.03, z0])
        lines.append(start + np.linspace(0, 1, 24)[:, None] * (ear - start))
    bridge_l = np.array([-idn.eye_spacing * idn.face_width + idn.eye_width * 1.35, face.eye_y + 0.03, z0])
    lines.append(bridge_l + np.linspace(0, 1, 8)[:, None] * (np.array([-bridge_l[0], bridge_l[1], z0]) - bridge_l))
    mask = Image.new("L", (canvas.n, canvas.n), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, int(round(0.022 * pl.scale * ss)))
    for line in lines:
        world = line @ pl.rot.T
        px = _to_pixels(world, pl.cx, pl.cy, pl.scale)
        depth = world[:, 2] * pl.scale
        cols = np.clip(((px[:, 0] + 0.5) * ss).astype(int), 0, canvas.n - 1)
        rows = np.clip(((px[:, 1] + 0.5) * ss).astype(int), 0, canvas.n - 1)
        visible = depth >= canvas.z[rows, cols] - 0.02 * pl.scale
        pts = [tuple(p) for p in ((px + 0.5) * ss).tolist()]
        run: list[tuple[float, float]] = []
        for k, pt in enumerate(pts):  # draw each run of visible points as one polyline
            if visible[k]:
                run.append(pt)
            if (not visible[k] or k == len(pts) - 1) and len(run) > 1:
                draw.line(run, fill=255, width=width, joint="curve")
            if not visible[k]:
                run = []
    box = mask.getbbox()
    if box is None:
        return img
    c0, r0, c1, r1 = box
    alpha = np.asarray(mask.crop(box), dtype=np.float32) / 255.0
    colour = np.asarray(idn.glasses_colour, dtype=np.float32)[:, None, None]
    img[:, r0:r1, c0:c1] = img[:, r0:r1, c0:c1] * (1 - alpha) + colour * alpha
    return img


# --------------------------------------------------------------------------- images


def plan_sample(seed: int, identity: int, image: int, size: int) -> tuple[Placement, dict[str, Any], str]:
    """Geometry, annotation (without the image key) and caption of one image: cheap, no pixels."""
    idn = sample_identity(seed, identity)
    motion = sample_motion(seed, identity, image)
    pl = place(build_face(idn, motion.expression), motion, size)
    ann = annotate(pl)
    record = {
        "identity": idn.name,
        "box": [round(v, 2) for v in ann["box"]],
        "kps": [[round(float(a), 2), round(float(b), 2)] for a, b in ann["kps"]],
        "landmarks": [[round(float(a), 2), round(float(b), 2)] for a, b in ann["landmarks"]],
        "landmark_format": "68",
        "pose": {"yaw": round(motion.yaw, 2), "pitch": round(motion.pitch, 2), "roll": round(motion.roll, 2)},
        "expression": motion.expression,
        "attributes": idn.attributes(),
    }
    return pl, record, caption(idn, motion)


def render_sample(seed: int, identity: int, image: int, size: int,
                  ss: int = SUPERSAMPLE) -> tuple["np.ndarray", dict[str, Any], str]:
    """Pixels [size, size, 3] uint8, annotation (without the image key) and caption of one image."""
    pl, record, text = plan_sample(seed, identity, image, size)
    return render([pl], size, pl.motion.background, ss=ss), record, text


def png_bytes(pixels: "np.ndarray") -> bytes:
    """Encode without metadata, so equal pixels give equal bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


# --------------------------------------------------------------------------- files


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


def _identity_job(seed: int, identity: int, images: int, size: int, ss: int, out_dir: str,
                  known: dict[str, str] | None) -> list[dict[str, Any]]:
    """Plan (and, unless already on disk with the known hash, render and write) one identity's images.

    Runs in a worker process; returns one entry per image: annotation record, caption,
    sha256 and whether the file was written.
    """
    out = Path(out_dir)
    entries = []
    for j in range(images):
        rel = image_path(identity, j)
        pl, record, text = plan_sample(seed, identity, j, size)
        digest = (known or {}).get(rel)
        wrote = False
        if digest is None or sha256_file(out / rel) != digest:
            data = png_bytes(render([pl], size, pl.motion.background, ss=ss))
            digest = sha256_bytes(data)
            wrote = write_if_changed(out / rel, data)
        entries.append({"image": rel, "record": {"image": rel, **record}, "caption": text, "sha256": digest,
                        "wrote": wrote})
    return entries


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


def manifest_key(params: "SynthParams") -> str:
    """Everything that decides the bytes of the test-bed (not the worker count)."""
    blob = json.dumps({"generator": RENDER_VERSION, "identities": params.identities,
                       "images_per_identity": params.images_per_identity, "size": params.size,
                       "seed": params.seed, "bad_samples": params.bad_samples,
                       "supersample": params.supersample}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


_OUR_NAMES = (ANNOTATIONS, CAPTIONS, MANIFEST, BAD_DIR)


def _foreign_entries(out_dir: Path) -> list[str]:
    """Top-level entries that this generator would never write (refuse to write over real data)."""
    import re

    if not out_dir.exists():
        return []
    return sorted(p.name for p in out_dir.iterdir()
                  if p.name not in _OUR_NAMES and not re.fullmatch(r"id_\d{4,}", p.name) and not p.name.startswith("."))


def _verify(out_dir: Path, files: dict[str, str]) -> bool:
    return all(sha256_file(out_dir / rel) == digest for rel, digest in files.items())


def synthesize(out_dir: Path, params: "SynthParams", *, progress: bool = True,
               check_faces: bool | None = None) -> dict[str, Any]:
    """Write (or bring up to date) the synthetic test-bed under ``out_dir``; returns a summary.

    A rerun with the same params finds every file with its recorded hash and does no work;
    files that are missing or changed are re-rendered (only those), files of a previous,
    larger run that the manifest lists are removed. ``check_faces`` (default
    ``params.check_faces``) also runs dlib's detector and recognizer on the result.
    """
    from components.core.errors import UserError

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"synth: {out_dir} exists and is not a directory")
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise UserError(f"synth: {out_dir} holds files the generator did not write ({', '.join(foreign[:5])}); "
                        "choose an empty directory or one written by `dynamicid synth`")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = manifest_key(params)
    old = read_manifest(out_dir)
    known = old["files"] if old and old.get("key") == key else None
    summary: dict[str, Any] = {
        "out": str(out_dir), "identities": params.identities,
        "images": params.identities * params.images_per_identity, "bad_samples": params.bad_samples,
        "size": params.size,
    }
    if known is not None and _verify(out_dir, known):
        summary.update(written=0, up_to_date=True, files=len(known))
        log.info("synth: %s is up to date (%d files)", out_dir, len(known))
    else:
        summary.update(_generate(out_dir, params, key, known, old, progress), up_to_date=False)
    if params.check_faces if check_faces is None else check_faces:
        summary["faces"] = measure_faces(out_dir, workers=params.workers, progress=progress)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _generate(out_dir: Path, params: "SynthParams", key: str, known: dict[str, str] | None,
              old: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    n_id, n_img = params.identities, params.images_per_identity
    workers = _pool_size(params.workers, n_id, n_id * n_img)
    results: dict[int, list[dict[str, Any]]] = {}
    args = [(params.seed, i, n_img, params.size, params.supersample, str(out_dir), known) for i in range(n_id)]
    with tqdm(total=n_id * n_img, unit="img", desc="synth", disable=not progress) as bar:
        if workers <= 1:
            for i, a in enumerate(args):
                results[i] = _identity_job(*a)
                bar.update(n_img)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: safe even when the caller holds threads (torch, dlib), unlike fork.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(_identity_job, *a): i for i, a in enumerate(args)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(n_img)
    entries = [e for i in range(n_id) for e in results[i]]
    files = {e["image"]: e["sha256"] for e in entries}
    written = sum(e["wrote"] for e in entries)

    bad = []
    first = (out_dir / entries[0]["image"]).read_bytes()
    for k, kind in enumerate(BAD_KINDS[: params.bad_samples]):
        rel = f"{BAD_DIR}/{k:02d}_{kind}.png"
        data = _bad_sample_bytes(kind, params.seed, k, params.size, params.supersample, first)
        written += write_if_changed(out_dir / rel, data)
        files[rel] = sha256_bytes(data)
        item = {"image": rel, "kind": kind, "reason": BAD_REASONS[kind]}
        if kind == "duplicate":
            item["duplicate_of"] = entries[0]["image"]
        bad.append(item)

    for name, rows in ((ANNOTATIONS, [e["record"] for e in entries]),
                       (CAPTIONS, [{"image": e["image"], "caption": e["caption"]} for e in entries])):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        written += write_if_changed(out_dir / name, data)
        files[name] = sha256_bytes(data)

    removed = _remove_stale(out_dir, set(files), old)
    manifest = {
        "generator": RENDER_VERSION, "key": key,
        "params": {"identities": n_id, "images_per_identity": n_img, "size": params.size, "seed": params.seed,
                   "bad_samples": params.bad_samples, "supersample": params.supersample},
        "counts": {"identities": n_id, "images": len(entries), "bad_samples": len(bad)},
        "conventions": {
            "pixels": "OpenCV: integer coordinates are pixel centres",
            "kps": "eye on the image left, eye on the image right, nose tip, mouth corner image left, image right",
            "landmarks": "iBUG-68",
            "pose": "degrees; yaw > 0: head turned to the person's left (nose to the image right); "
                    "pitch > 0: looking up; roll > 0: top of the head to the image right",
        },
        "bad_samples": bad,
        "files": files,
    }
    written += write_if_changed(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return {"written": written, "removed": removed, "files": len(files)}


def _pool_size(workers: int, jobs: int, images: int) -> int:
    """Processes to use: as asked, or (0 = auto) all cores unless the job is too small to pay for spawning."""
    if workers == 0:
        workers = 1 if images < 64 else (os.cpu_count() or 1)
    return max(1, min(workers, jobs))


def _remove_stale(out_dir: Path, keep: set[str], old: dict[str, Any] | None) -> int:
    """Delete files an earlier run listed that this run does not write (e.g. fewer identities)."""
    removed = 0
    for rel in (old or {}).get("files", {}):
        if rel not in keep and (out_dir / rel).is_file():
            (out_dir / rel).unlink()
            removed += 1
            parent = (out_dir / rel).parent
            if parent != out_dir and not any(parent.iterdir()):
                parent.rmdir()
    return removed


# --------------------------------------------------------------------------- face checks


def dlib_model_dir() -> Path:
    """Folder of face_recognition_models' .dat files, found without importing the package.

    (Its ``__init__`` imports pkg_resources, which recent setuptools no longer ships.)
    """
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        from components.core.errors import UserError

        raise UserError("synth --check-faces needs the face-recognition-models package (pip install "
                        "face-recognition-models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _faces_job(out_dir: str, records: list[dict[str, Any]], bad: list[dict[str, Any]]) -> dict[str, Any]:
    """dlib HOG detection (upsample 1) and 128-d descriptors for a chunk of images (worker process)."""
    import dlib
    import numpy as np
    from PIL import Image

    models = dlib_model_dir()
    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    out: dict[str, Any] = {"hits": [], "descriptors": [], "bad": []}
    for rec in records:
        img = np.asarray(Image.open(Path(out_dir) / rec["image"]).convert("RGB"))
        x0, y0, x1, y1 = rec["box"]
        match = None
        for det in detector(img, 1):
            cx, cy = (det.left() + det.right()) / 2, (det.top() + det.bottom()) / 2
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                match = det
                break
        out["hits"].append(match is not None)
        if match is not None:
            desc = encoder.compute_face_descriptor(img, shape(img, match))
            out["descriptors"].append((rec["identity"], np.asarray(desc, dtype=np.float32)))
    for item in bad:
        try:
            img = np.asarray(Image.open(Path(out_dir) / item["image"]).convert("RGB"))
            faces = len(detector(img, 1))
        except Exception:  # noqa: BLE001 - unreadable is the point of some bad samples
            faces = None
        out["bad"].append({"image": item["image"], "kind": item["kind"], "faces": faces})
    return out


def measure_faces(out_dir: Path, *, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """How real face tools see the test-bed: dlib HOG detection rate (overall, per |yaw| and per
    expression) and whether dlib's 128-d recognizer separates identities (mean same- vs
    different-identity distance, 1-NN identification accuracy)."""
    import numpy as np
    from tqdm import tqdm

    out_dir = Path(out_dir)
    records = [json.loads(line) for line in (out_dir / ANNOTATIONS).read_text().splitlines() if line]
    bad = (read_manifest(out_dir) or {}).get("bad_samples", [])
    by_id: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_id.setdefault(rec["identity"], []).append(rec)
    chunks = list(by_id.values())
    n_workers = _pool_size(workers, len(chunks), len(records))
    parts: list[dict[str, Any]] = []
    with tqdm(total=len(records), unit="img", desc="faces", disable=not progress) as bar:
        jobs = [(str(out_dir), c, bad if i == 0 else []) for i, c in enumerate(chunks)]
        if n_workers <= 1:
            for job in jobs:
                parts.append(_faces_job(*job))
                bar.update(len(job[1]))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for job, part in zip(jobs, pool.map(_faces_job, *zip(*jobs))):
                    parts.append(part)
                    bar.update(len(job[1]))
    hits = np.array([h for p in parts for h in p["hits"]])
    ordered = [r for c in chunks for r in c]
    yaw = np.array([abs(r["pose"]["yaw"]) for r in ordered])
    pitch = np.array([r["pose"]["pitch"] for r in ordered])
    expr = np.array([r["expression"] for r in ordered])

    def rate(mask) -> dict[str, Any]:
        return {"images": int(mask.sum()), "rate": round(float(hits[mask].mean()), 4) if mask.any() else None}

    bins = {"|yaw|<10": yaw < 10, "10<=|yaw|<25": (yaw >= 10) & (yaw < 25), "|yaw|>=25": yaw >= 25}
    result: dict[str, Any] = {
        "detector": "dlib HOG frontal, upsample 1",
        "detection_rate": round(float(hits.mean()), 4) if hits.size else None,
        "frontal_detection_rate": rate((yaw < 10) & (np.abs(pitch) < 8))["rate"],
        "by_abs_yaw": {k: rate(m) for k, m in bins.items()},
        "by_pitch": {"looking down": rate(pitch <= -8), "level": rate(np.abs(pitch) < 8), "looking up": rate(pitch >= 8)},
        "by_expression": {e: rate(expr == e) for e in EXPRESSIONS},
        "bad_samples": [b for p in parts for b in p["bad"]],
    }
    result["recognition"] = _recognition_stats([d for p in parts for d in p["descriptors"]])
    return result


def _recognition_stats(descriptors: list[tuple[str, "np.ndarray"]]) -> dict[str, Any]:
    """Mean same- vs different-identity descriptor distance and leave-one-out 1-NN accuracy."""
    import numpy as np

    if len(descriptors) < 2:
        return {"faces": len(descriptors)}
    names = np.array([n for n, _ in descriptors])
    emb = np.stack([d for _, d in descriptors]).astype(np.float64)  # [N, 128]
    sq = np.square(emb).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * emb @ emb.T, 0.0))  # [N, N]
    same = names[:, None] == names[None, :]
    off = ~np.eye(len(names), dtype=bool)
    np.fill_diagonal(dist, np.inf)
    nn = names[dist.argmin(1)]
    return {
        "faces": len(names),
        "same_identity_mean": round(float(dist[same & off].mean()), 4) if (same & off).any() else None,
        "different_identity_mean": round(float(dist[~same].mean()), 4) if (~same).any() else None,
        "same_below_0.6": round(float((dist[same & off] < 0.6).mean()), 4) if (same & off).any() else None,
        "different_below_0.6": round(float((dist[~same] < 0.6).mean()), 4) if (~same).any() else None,
        "nn_identification_accuracy": round(float((nn == names).mean()), 4),
    }


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the deterministic synthetic face test-bed (embedded default data)",
        description=(
            "Render a synthetic face data set in the accepted input layout, so that the embedded\n"
            "profile trains and evaluates without downloading faces:\n"
            "  <out>/id_NNNN/NNNN.png    one folder per identity (KDEF-like: 5 expressions x 7 poses)\n"
            "  <out>/annotations.jsonl   box, 5 kps, iBUG-68 landmarks, pose, expression, identity factors\n"
            "  <out>/captions.jsonl      one caption per image\n"
            "  <out>/bad_samples/        deliberately bad files for prepare's quarantine (listed in\n"
            "                            synth_manifest.json, never in annotations.jsonl)\n"
            "Sizes come from the synth: section of params.yaml (identities, images_per_identity,\n"
            "size, seed, bad_samples, supersample, workers, check_faces)."
        ),
        epilog=(
            "Same params give byte-identical files; a rerun skips every file that already holds\n"
            "the right content (no work, mtimes unchanged).\n"
            "Pose convention: yaw > 0 = head turned to the person's left (nose to the image right),\n"
            "pitch > 0 = looking up, roll > 0 = top of the head to the image right.\n"
            "Example: dynamicid -S synth.identities=8 synth --out /tmp/faces --check-faces"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: data.raw from params)")
    p.add_argument("--check-faces", action="store_true", default=None,
                   help="after writing, measure dlib face detection (overall, per |yaw|) and recognition "
                   "(same vs different identity distance) and add them to the printed summary "
                   "(default: synth.check_faces)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, params: "Params") -> int:
    from components.core.errors import UserError

    out = args.out or params.data.raw
    if "://" in str(out):
        raise UserError(f"synth writes a local directory; got {out!r} (pass --out DIR, then push it with dvc)")
    summary = synthesize(Path(out), params.synth, progress=not args.no_progress, check_faces=args.check_faces)
    print(json.dumps(summary, indent=2))
    return 0

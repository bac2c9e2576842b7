"""Identity and motion factors of the test-bed: palettes, the pose / expression grid, seeded sampling.

Deterministic, like the whole test-bed: every random draw comes from
``numpy.random.default_rng([seed, stream, identity, image])``; no time or process state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np

EXPRESSIONS = ("neutral", "happy", "surprised", "sad", "angry")
# (yaw, pitch) in degrees; KDEF-like 5 yaw angles (without profiles, which a frontal face
# detector cannot see) plus looking up / down. Image j gets POSES[j % 7] and
# EXPRESSIONS[j % 5]: 5 and 7 are coprime, so 35 images cover every combination once and a
# handful of images already varies both factors.
POSES = ((0.0, 0.0), (-18.0, 0.0), (18.0, 0.0), (-32.0, 0.0), (32.0, 0.0), (0.0, 14.0), (0.0, -14.0))

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

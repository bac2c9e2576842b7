"""One test-bed image end to end: its plan (placement, annotation record, caption), its pixels, its PNG bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from components.synth.captions import caption
from components.synth.geometry import Placement, annotate, build_face, place
from components.synth.identities import sample_identity, sample_motion
from components.synth.render import SUPERSAMPLE, render

if TYPE_CHECKING:
    import numpy as np


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

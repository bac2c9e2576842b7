"""3-D head geometry: ellipsoid blobs, a ``Face`` per identity and expression, placement, exact annotations.

Heads are unions of ellipsoids in head coordinates (x right, y up, z to the camera) hit in
closed form by orthographic rays (``_raycast``); ``Placement`` puts a head in the image and
``annotate`` projects the same geometry to the 68 landmarks, 5 kps and box that are written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Sequence

from components.synth.identities import Identity, Motion

if TYPE_CHECKING:
    import numpy as np

# Materials of the ray-cast scene.
BG, SKIN, HAIR, HAT, CLOTH, NECK = 0, 1, 2, 3, 4, 5

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


def _smooth_max(a: "np.ndarray", b: "np.ndarray", k: float) -> "np.ndarray":
    """Polynomial smooth maximum (C1 continuous); equals max(a, b) where |a - b| >= k."""
    import numpy as np

    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.maximum(a, b) + h * h * (k * 0.25)


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

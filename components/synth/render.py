"""Rendering of placed heads: the super-sampled z-buffer ``Canvas``, shading, glasses and exposure.

Each head is a union of ellipsoids (cranium, jaw, nose, nostril wings, ears, hair shell, neck,
torso) ray-cast in closed form under orthographic projection, so yaw/pitch move every feature
consistently; eyes, brows, lips, beard and shading are solid textures in head coordinates
(``textures``), evaluated at the ray hit point. The image is rendered at ``supersample`` times
the output size (params, default 2) and box-filtered down (anti-aliasing), with face-metered
exposure like a camera's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from components.synth.geometry import (
    BG,
    CLOTH,
    HAIR,
    HAT,
    NECK,
    SKIN,
    Placement,
    _raycast,
    _smooth_max,
    _tilt_x,
    _to_pixels,
)
from components.synth.textures import _hair_texture, _skin_texture

if TYPE_CHECKING:
    import numpy as np

SUPERSAMPLE = 2  # default samples per pixel side (params.synth.supersample)
EXPOSURE_TARGET = 0.5  # mean skin intensity the exposure aims for


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

"""Solid textures in head coordinates: skin (eyes, brows, lips, beard, shading), hair and hats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from components.synth.geometry import Face

if TYPE_CHECKING:
    import numpy as np


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

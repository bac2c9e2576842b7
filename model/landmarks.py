"""Landmark image rendering for the IMR's keypoint encoder (method.md, Components 3).

The keypoint encoder sees motion as a picture, white dots at the face's 2D landmarks on black,
rather than as a coordinate vector: the CNN then does not depend on the landmark count or
order (106 insightface points, 68 dlib points, or a user-drawn target all work), and a target
pose can be given as an image.

Coordinate convention (OpenCV's, which insightface and dlib landmarks follow): an integer
coordinate is a pixel *centre*, so a frame of width W spans x in [-0.5, W - 0.5). Scaling to
``size`` maps centres to centres: x' = (x + 0.5) * size / W - 0.5, then rounded to the nearest
pixel. A point is kept when 0 <= x < W and 0 <= y < H (the pixel grid of the frame);
anything else, NaN included, is dropped: a landmark the detector put outside the crop says
nothing about where the face is.

Frame: every landmark image is drawn in the face's CLIP face-crop frame (``face_landmark_image``),
whether it comes from ``dynamicid prepare``, a reference photo or an edit target
(model.motion_targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _disc_offsets(radius: int) -> np.ndarray:
    """Integer (dy, dx) offsets with dy^2 + dx^2 <= radius^2: radius 0 = one pixel, 1 = a 5-pixel plus."""
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    inside = dy**2 + dx**2 <= radius**2
    return np.stack([dy[inside], dx[inside]], axis=1)  # [D, 2]


def render_landmarks(points: np.ndarray, frame_hw: tuple[int, int], size: int = 96, radius: int = 1) -> np.ndarray:
    """Draw ``points`` [P, 2] (x, y, pixels of a frame_hw frame) as white dots on a black [1, size, size] float32 image."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"render_landmarks: points must be [P, 2] (x, y), got shape {pts.shape}")
    h, w = (int(v) for v in frame_hw)
    if h < 1 or w < 1:
        raise ValueError(f"render_landmarks: frame_hw must be positive, got {frame_hw}")
    if size < 1 or radius < 0:
        raise ValueError(f"render_landmarks: need size >= 1 and radius >= 0, got size={size} radius={radius}")
    image = np.zeros((1, size, size), dtype=np.float32)
    x, y = pts[:, 0], pts[:, 1]
    keep = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    if not keep.any():
        return image
    # Centre-to-centre scaling; clip only guards the half-pixel rim when size >= the frame side.
    col = np.clip(np.rint((x[keep] + 0.5) * size / w - 0.5), 0, size - 1).astype(np.int64)  # [P']
    row = np.clip(np.rint((y[keep] + 0.5) * size / h - 0.5), 0, size - 1).astype(np.int64)  # [P']
    offsets = _disc_offsets(radius)  # [D, 2]
    rows = (row[:, None] + offsets[None, :, 0]).ravel()  # [P' * D]
    cols = (col[:, None] + offsets[None, :, 1]).ravel()  # [P' * D]
    on_canvas = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    image[0, rows[on_canvas], cols[on_canvas]] = 1.0
    return image


def landmarks_to_tensor(
    points: Sequence[np.ndarray],
    frame_hw: tuple[int, int],
    size: int = 96,
    radius: int = 1,
    device: "torch.device | str | None" = None,
    dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """Batch of landmark sets (one per identity) -> keypoint-encoder input [B, 1, size, size]."""
    if len(points) == 0:
        raise ValueError("landmarks_to_tensor: need at least one landmark set")
    import torch  # only this helper needs torch; render_landmarks stays numpy-only for data workers

    images = np.stack([render_landmarks(p, frame_hw, size=size, radius=radius) for p in points])  # [B, 1, S, S]
    return torch.from_numpy(images).to(device=device, dtype=dtype or torch.float32)


def crop_landmark_image(landmarks: np.ndarray, crop_box: Sequence[int], size: int = 96) -> np.ndarray:
    """Landmarks [P, 2] (x, y, pixels of a photo) drawn in the frame of ``crop_box`` = (left, top,
    right, bottom) of that photo -> [1, size, size] float32.

    Points are shifted in float32, as ``dynamicid prepare`` always stored them: the same input
    then gives bit-identical images at training and at inference.
    """
    left, top, right, bottom = (int(v) for v in crop_box)
    pts = np.asarray(landmarks, dtype=np.float32) - np.array([left, top], dtype=np.float32)  # [P, 2] crop pixels
    return render_landmarks(pts, (bottom - top, right - left), size=size)


def face_landmark_image(landmarks: np.ndarray, face_bbox: np.ndarray, image_hw: tuple[int, int],
                        size: int = 96) -> np.ndarray:
    """A face's landmarks drawn in its CLIP face-crop frame (``face_crop_box`` of its detector box):
    the one frame every landmark image the keypoint encoder sees is drawn in (training samples,
    the reference photo's source image, and edit targets), so images differ only by motion."""
    from model.face_analysis.face import face_crop_box

    return crop_landmark_image(landmarks, face_crop_box(face_bbox, image_hw), size=size)

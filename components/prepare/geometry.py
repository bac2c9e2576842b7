"""Geometry of the images ``dynamicid prepare`` stores: square training image, CLIP face crop, landmark image.

The CLIP face crop is the one inference uses (model.face_analysis); the face box is stored in
the training image's frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def face_crop_box(bbox: "np.ndarray", hw: tuple[int, int], margin: float = 0.25) -> tuple[int, int, int, int]:
    """The CLIP face crop's square box: the one inference uses (model.face_analysis)."""
    from model.face_analysis.face import face_crop_box as shared

    return shared(bbox, hw, margin)


def square_frame(bbox: "np.ndarray", hw: tuple[int, int]) -> tuple[int, int, int]:
    """(left, top, side) of the training image: the largest square of the photo, as centred on the
    face as the borders allow (a square photo is kept whole)."""
    x0, y0, x1, y1 = [float(v) for v in bbox]
    h, w = hw
    side = min(h, w)
    left = int(round(min(max((x0 + x1) / 2 - side / 2, 0), w - side)))
    top = int(round(min(max((y0 + y1) / 2 - side / 2, 0), h - side)))
    return left, top, side


def _resize(array: "np.ndarray", size: int) -> "np.ndarray":
    import numpy as np
    from PIL import Image

    if array.shape[0] == size and array.shape[1] == size:
        return np.ascontiguousarray(array)
    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((size, size), Image.BICUBIC))


def sample_outputs(image: "np.ndarray", bbox: "np.ndarray", landmarks: "np.ndarray", *, image_size: int,
                   crop_size: int, landmark_size: int) -> tuple[dict[str, Any], list[float]]:
    """The stored pictures of one face: blobs (training image, CLIP crop, landmark image) and the
    crop-frame landmarks, plus face_box in the training image's frame (y0, x0, y1, x1 in [0, 1])."""
    import numpy as np

    from components.core.shards import encode_png
    from model.landmarks import crop_landmark_image

    h, w = image.shape[:2]
    left, top, side = square_frame(bbox, (h, w))
    pixels = _resize(image[top:top + side, left:left + side], image_size)  # [S, S, 3]
    x0, y0, x1, y1 = [float(v) for v in bbox]
    face_box = [float(np.clip(v, 0.0, 1.0)) for v in ((y0 - top) / side, (x0 - left) / side,
                                                     (y1 - top) / side, (x1 - left) / side)]
    cl, ct, cr, cb = face_crop_box(bbox, (h, w))
    crop = _resize(image[ct:cb, cl:cr], crop_size)  # [C, C, 3]
    pts = np.asarray(landmarks, dtype=np.float32) - np.array([cl, ct], dtype=np.float32)  # [P, 2] crop pixels
    # The one renderer of the model's frame: inference draws reference and target landmarks with it too.
    lmk = (crop_landmark_image(landmarks, (cl, ct, cr, cb), size=landmark_size)[0] * 255).astype(np.uint8)  # [L, L]
    norm = pts / np.array([cr - cl, cb - ct], dtype=np.float32)
    blobs = {"pixels": encode_png(pixels), "face_crop": encode_png(crop), "landmark_image": encode_png(lmk),
             "landmarks": norm.reshape(-1).astype(np.float32)}
    return blobs, face_box

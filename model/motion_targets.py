"""Edit targets a user can give for one person: a driving photo or landmark coordinates, each turned
into the IMR's target landmark image.

The keypoint encoder only ever learned from landmark images drawn one way: a face's landmarks in
the frame of its CLIP face crop, rendered at ``imr.landmark_size`` (model.landmarks.
face_landmark_image). Training samples, the reference photo's source image and both targets here
go through that one routine, so the target differs from the source only by the motion it shows,
never by how it was drawn. The rendered image stays an internal detail.

- ``driving_image``: a photo of anyone. The face analyzer picks its largest face (at least
  ``face.min_face_size``), and that face's landmarks are drawn in *its own* crop frame, the way
  every training target was drawn in its own photo's frame: where the face sits in the driving
  photo, and how large, does not matter.
- ``landmarks``: [L, 2] x, y in pixels of the identity's *reference* photo, in the analyzer's
  layout (68 iBUG points for dlib, 106 insightface 2d106 points). They are drawn in the reference
  face's crop frame, the frame of the source image: the reference's own landmarks, unchanged,
  reproduce the source image exactly, and moving points (open the mouth, turn the contour)
  describes the edit.

Errors are ValueErrors whose message starts with ``who`` and the field ("identity 1: landmarks:
..."), so the server can name the field of a bad request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model.face_analysis.face import FaceAnalysisError, face_crop_box, pick_face
from model.landmarks import crop_landmark_image, face_landmark_image

LAYOUT_NAMES = {68: "the iBUG 300-W 68-point order (dlib)", 106: "the insightface 2d106 order"}


def check_landmarks(points: Any, count: int, who: str) -> np.ndarray:
    """``points`` as [count, 2] float32 of finite x, y, or a ValueError saying what is wrong.

    The count is the analyzer's: its points are the layout the model was trained on, and a
    68-point set drawn for a 106-point model (or the reverse) would be a different picture.
    """
    layout = LAYOUT_NAMES.get(count, f"the face analyzer's {count}-point layout")
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: landmarks: expected {count} [x, y] number pairs ({layout})") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{who}: landmarks: expected {count} [x, y] pairs, got an array of shape {list(pts.shape)}")
    if pts.shape[0] != count:
        raise ValueError(f"{who}: landmarks: expected {count} points in {layout}, got {pts.shape[0]}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{who}: landmarks: coordinates must be finite numbers")
    return pts.astype(np.float32)


def driving_face(analyzer: Any, image: np.ndarray, who: str, min_face_size: int = 0) -> Any:
    """The face a driving photo (RGB uint8 [H, W, 3]) contributes: its largest usable one. No usable face is a
    ValueError naming ``who``'s driving_image, so the endpoint can answer with the field that is wrong."""
    where = f"{who}: driving_image"
    try:
        return pick_face(analyzer.detect(image), who=where, min_size=min_face_size)
    except FaceAnalysisError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def driving_landmark_image(analyzer: Any, image: np.ndarray, who: str, size: int, min_face_size: int = 0) -> np.ndarray:
    """[1, size, size] target image of a driving photo: its face's landmarks in its own face-crop frame."""
    face = driving_face(analyzer, image, who, min_face_size)
    return face_landmark_image(face.landmarks, face.bbox, image.shape[:2], size=size)


def coordinate_landmark_image(points: Any, count: int, reference_bbox: np.ndarray,
                              reference_hw: Sequence[int], who: str, size: int) -> np.ndarray:
    """[1, size, size] target image of landmark coordinates in pixels of the reference photo, drawn
    in the reference face's crop frame (the source image's frame)."""
    pts = check_landmarks(points, count, who)
    h, w = (int(v) for v in reference_hw[:2])
    left, top, right, bottom = face_crop_box(reference_bbox, (h, w))
    inside = (pts[:, 0] >= left) & (pts[:, 0] < right) & (pts[:, 1] >= top) & (pts[:, 1] < bottom)
    if not inside.any():
        hint = (" (they look normalised to [0, 1]; give pixels)"
                if pts.min() >= 0.0 and pts.max() <= 1.0 and min(h, w) > 2 else "")
        raise ValueError(
            f"{who}: landmarks: no point lies on the reference face (its crop spans x {left}..{right}, "
            f"y {top}..{bottom} of the {w}x{h} reference image); landmarks are pixels of the reference image{hint}"
        )
    return crop_landmark_image(pts, (left, top, right, bottom), size=size)


def landmark_target(analyzer: Any, who: str, size: int, *, driving_image: np.ndarray | None = None,
                    landmarks: Any = None, frame: tuple[np.ndarray, Sequence[int]] | None = None,
                    min_face_size: int = 0) -> np.ndarray | None:
    """The [1, size, size] target image of whichever user target is given (None: neither).

    ``frame`` is the reference face's (box, image size): what ``landmarks`` coordinates are pixels
    of; an identity given as precomputed embeddings has none.
    """
    if driving_image is not None:
        return driving_landmark_image(analyzer, driving_image, who, size, min_face_size)
    if landmarks is None:
        return None
    if frame is None:
        raise ValueError(f"{who}: landmarks: they are pixels of the reference image, and this identity has none "
                         "(give a driving_image instead)")
    return coordinate_landmark_image(landmarks, int(analyzer.landmark_count), frame[0], frame[1], who, size)


def rendered_landmark_image(image: Any, size: int) -> np.ndarray:
    """An already rendered landmark image (PIL, uint8, or float in [0, 1]; gray or RGB) -> [1, size,
    size] float32 in [0, 1]: the advanced form, e.g. a training sample's stored landmark image."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32).squeeze(), 0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(arr.squeeze())
    gray = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return gray[None]  # [1, S, S]


__all__ = ["LAYOUT_NAMES", "check_landmarks", "coordinate_landmark_image", "driving_face", "driving_landmark_image",
           "landmark_target", "rendered_landmark_image"]

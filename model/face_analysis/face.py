"""The face record and the analyzer interface: Face, FaceAnalyzer, the FaceAnalysisError family, pick_face, face_crop_box.

What every backend returns and every caller consumes; nothing here depends on a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


class FaceAnalysisError(ValueError):
    """A face could not be analysed (bad image, no usable face, missing models); message says why."""


class NoFaceError(FaceAnalysisError):
    """No (large enough) face where one was required."""


class MultipleFacesError(FaceAnalysisError):
    """Several faces where exactly one was required."""


@dataclass


class Face:
    """One analysed face. All coordinates are pixels of the analysed image; "left" = image left."""

    bbox: np.ndarray  # [4] x0, y0, x1, y1 (may extend past the image border)
    kps: np.ndarray  # [5, 2] left eye, right eye, nose tip, left mouth corner, right mouth corner
    landmarks: np.ndarray  # [P, 2] P = 106 (insightface 2d106) or 68 (dlib, iBUG order)
    embedding: np.ndarray  # [D] L2-normalised identity embedding (512 ArcFace, 128 dlib)
    score: float  # detector confidence (backend-specific scale; 1.0 in aligned mode)
    pose: tuple[float, float, float]  # yaw, pitch, roll in degrees, see estimate_head_pose

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@runtime_checkable


class FaceAnalyzer(Protocol):
    embedding_dim: int
    landmark_count: int

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces of an RGB uint8 [H, W, 3] image, largest box first."""
        ...

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        """[D] embedding of a crop that is already an aligned face (no detection)."""
        ...

    def analyze_aligned(self, crop: np.ndarray) -> Face:
        """Face record of an aligned crop: box = whole crop, landmarks predicted on it."""
        ...


def pick_face(faces: Sequence[Face], who: str, one_face: bool = False, min_size: int = 0) -> Face:
    """The face to use for ``who`` (e.g. "identity 2"): the largest one at least min_size px a side.

    Faces below min_size are dropped first, so a small face in the background neither counts as
    "multiple faces" nor gets picked. The release silently used a zero embedding when no face was
    found; here that is an error naming the identity.
    """
    usable = [f for f in faces if min(f.width, f.height) >= min_size]
    if not usable:
        if faces:
            biggest = max(faces, key=lambda f: f.area)
            raise NoFaceError(
                f"{who}: no face of at least {min_size} px; the largest found is "
                f"{biggest.width:.0f}x{biggest.height:.0f} px"
            )
        raise NoFaceError(f"{who}: no face found")
    if one_face and len(usable) > 1:
        raise MultipleFacesError(f"{who}: expected exactly one face, found {len(usable)}")
    return max(usable, key=lambda f: f.area)


def face_crop_box(bbox: np.ndarray, hw: tuple[int, int], margin: float = 0.25) -> tuple[int, int, int, int]:
    """The CLIP face crop (training and inference share it): square box around a face box (x0, y0, x1, y1), grown by ``margin`` and clipped to the image."""
    x0, y0, x1, y1 = [float(v) for v in bbox]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    h, w = hw
    side = min(side, h, w)
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    s = int(round(side))
    return left, top, left + s, top + s

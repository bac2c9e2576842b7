"""Keypoint geometry: the ArcFace template and aligned crop (align_face), head pose from keypoints (estimate_head_pose).

Backend-independent: both analyzers use it on their 5 keypoints and dense landmarks. cv2 and
skimage are imported inside the functions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from model.face_analysis.face import FaceAnalysisError
from model.motion import face_frame, layout_for

# ArcFace's reference positions of the 5 keypoints in a 112 x 112 aligned crop (left eye, right
# eye, nose tip, left and right mouth corner; "left" = image left). Published with ArcFace and used
# by every insightface recognition model, so crops made with it match what those models saw.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


# Generic 3-D face for head pose, millimetres. Axes of an OpenCV camera looking at a frontal face
# (X to the image right, Y down, Z away from the camera), origin at the nose tip. X/Y: the ArcFace
# template (an average of aligned frontal faces) scaled to 63 mm between the pupils, plus the chin
# where dlib puts it on such crops (1.76 inter-ocular distances below the eyes). Z (depth behind the
# nose tip): from insightface's bundled 3-D 68-point mean shape (meanshape_68.pkl) at the same scale.
# Order: the 5 ArcFace keypoints, then the chin.
HEAD_MODEL_POINTS = np.array(
    [
        [-31.5, -36.0, 34.0],  # image-left eye centre
        [31.5, -36.0, 34.0],  # image-right eye centre
        [0.0, 0.0, 0.0],  # nose tip
        [-26.0, 37.0, 26.0],  # image-left mouth corner
        [26.0, 37.0, 26.0],  # image-right mouth corner
        [0.0, 75.0, 25.0],  # chin (lowest contour point)
    ],
    dtype=np.float64,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """[5, 2] ArcFace keypoint positions for a size x size aligned crop."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """[size, size, C] crop: the similarity transform (least squares, Umeyama) that maps the 5
    keypoints onto the ArcFace template scaled to ``size``, applied with bilinear sampling."""
    import cv2
    from skimage.transform import SimilarityTransform

    src = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    tform = SimilarityTransform.from_estimate(src, arcface_template(size))
    if not tform:
        raise FaceAnalysisError(f"cannot align face: degenerate keypoints {src.tolist()}")
    return cv2.warpAffine(np.ascontiguousarray(image), tform.params[:2], (size, size), borderValue=0.0)


def _chin(landmarks: np.ndarray) -> np.ndarray:
    """[2] the contour point lowest in the face frame (works for any contour ordering)."""
    layout = layout_for(landmarks)
    contour = np.asarray(landmarks, dtype=np.float64)[list(layout.contour)]  # [C, 2]
    return contour[int(np.argmax(face_frame(landmarks).project(contour)[:, 1]))]


def estimate_head_pose(
    kps: np.ndarray, landmarks: np.ndarray, image_shape: Sequence[int]
) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the 5 keypoints and the chin, by cv2.solvePnP against
    HEAD_MODEL_POINTS with a pinhole camera (focal = longest image side, centre = image centre).

    Sign convention (viewer's side, the same as model.motion.describe_pose):
      yaw > 0: the nose points to the image's right (the person turned to *their* left);
      pitch > 0: the nose points up (chin raised);
      roll > 0: the face is rotated clockwise on screen (its image-right side lower).
    The angles are read from the solved rotation as directions (nose vector, eye-line vector),
    not from an Euler decomposition, so each has the plain meaning above.
    """
    import cv2

    h, w = int(image_shape[0]), int(image_shape[1])
    pts2d = np.vstack([np.asarray(kps, dtype=np.float64).reshape(5, 2), _chin(landmarks)])  # [6, 2]
    f = float(max(h, w))
    camera = np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]])
    # Start from a frontal face at the distance its eye spacing implies: the 6-point problem has
    # mirror solutions, and a frontal start keeps the solver on the one in front of the camera.
    iod_px = max(float(np.linalg.norm(pts2d[1] - pts2d[0])), 1e-3)
    z0 = f * 63.0 / iod_px
    tvec = np.array([[(pts2d[2, 0] - w / 2) * z0 / f], [(pts2d[2, 1] - h / 2) * z0 / f], [z0]])
    rvec = np.zeros((3, 1))
    ok, rvec, tvec = cv2.solvePnP(
        HEAD_MODEL_POINTS, pts2d, camera, None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok or not np.all(np.isfinite(rvec)):
        raise FaceAnalysisError("head pose estimation failed (solvePnP did not converge)")
    rot, _ = cv2.Rodrigues(rvec)  # [3, 3] model -> camera
    nose = rot @ np.array([0.0, 0.0, -1.0])  # direction the face points, camera axes
    across = rot @ np.array([1.0, 0.0, 0.0])  # image-left eye -> image-right eye direction
    yaw = np.degrees(np.arctan2(nose[0], -nose[2]))
    pitch = np.degrees(np.arctan2(-nose[1], np.hypot(nose[0], nose[2])))
    roll = np.degrees(np.arctan2(across[1], across[0]))
    return float(yaw), float(pitch), float(roll)

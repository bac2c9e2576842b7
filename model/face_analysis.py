"""Face analysis behind one small interface: detection, 5 keypoints, dense landmarks, identity
embedding and head pose, from one of two real backends chosen by params (FaceParams).

- ``insightface``: a model pack (buffalo_l, antelopev2, ...) through ``insightface.app.FaceAnalysis``:
  SCRFD detector with 5 keypoints, 2d106 landmarks, 512-d ArcFace embedding. What the method
  (method.md) is defined with; the production profile's default.
- ``dlib``: the models of ``face-recognition-models`` (installed with the package, so the tiny profile
  and CI need nothing downloaded): HOG or CNN (mmod) detector, 68-point iBUG landmarks, 5-point
  predictor for the embedding alignment, 128-d ResNet embedding.

Both return the same ``Face`` record; callers never branch on the backend except for the embedding
width (``embedding_dim``). Nothing here downloads: a missing model pack is an error naming the path.
Heavy imports (dlib, insightface, cv2, skimage, PIL) happen inside functions so importing this
module stays cheap.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from model.config import DlibParams, FaceParams, InsightFaceParams
from model.motion import face_frame, layout_for

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Image input, selection, alignment, pose: backend-independent helpers.


def load_image(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a file path or encoded bytes to RGB uint8 [H, W, 3], honouring EXIF orientation.

    Phone photos store the camera's orientation in EXIF instead of rotating pixels; ignoring it
    would hand the detector a sideways face. Every decoding failure becomes FaceAnalysisError with
    the decoder's reason, so a bad upload is a clear 4xx/quarantine reason, never a traceback.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = f"<{len(source)} bytes>", io.BytesIO(bytes(source))
        if len(source) == 0:
            raise FaceAnalysisError(f"cannot read image {name}: empty data")
    else:
        name, fp = str(source), Path(source)
        if not fp.is_file():
            raise FaceAnalysisError(f"cannot read image {name}: no such file")
    try:
        with Image.open(fp) as im:
            im.load()  # decode now: truncated data fails here, inside the try
            rgb = pil_to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise FaceAnalysisError(f"cannot read image {name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise FaceAnalysisError(f"cannot read image {name}: too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FaceAnalysisError(f"cannot read image {name}: {exc}") from None
    return rgb  # [H, W, 3]


_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def pil_to_rgb(im) -> np.ndarray:
    """RGB uint8 [H, W, 3] of any PIL mode; shared by inference and ``dynamicid prepare``.

    PIL's own ``convert("RGB")`` gets two cases wrong for photos: it clips 16-bit grey to 255 (a
    white picture) and it drops alpha, exposing whatever colour the transparent pixels happen to
    store. Grey is scaled 65535 -> 255; transparency is composited over white.
    """
    from PIL import Image

    if im.mode in _WIDE_GREY_MODES:
        grey = np.asarray(im).astype(np.float64)  # [H, W], 0..65535
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)  # [H, W, 3]
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """RGB uint8 [H, W, 3], C-contiguous (dlib and onnxruntime both need that)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = list(image.shape) if isinstance(image, np.ndarray) else type(image).__name__
        raise FaceAnalysisError(f"{what} must be an RGB array [H, W, 3], got {shape}")
    if image.dtype != np.uint8:
        raise FaceAnalysisError(f"{what} must be uint8, got {image.dtype}")
    if min(image.shape[:2]) < 8:
        raise FaceAnalysisError(f"{what} is too small to hold a face: {image.shape[1]}x{image.shape[0]}")
    return np.ascontiguousarray(image)


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


def kps_from_68(landmarks: np.ndarray) -> np.ndarray:
    """[5, 2] ArcFace-order keypoints from iBUG 68 points: eye centres (mean of each eye's six
    contour points), nose tip (30), mouth corners (48, 54)."""
    lm = np.asarray(landmarks, dtype=np.float32)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n < 1e-12:
        raise FaceAnalysisError("the recognition model returned a zero or non-finite embedding")
    return v / n


# --------------------------------------------------------------------------------------------
# dlib backend


def dlib_model_dir() -> Path:
    """Directory of face-recognition-models' .dat files, found without pkg_resources (the package
    itself uses pkg_resources, which recent setuptools no longer ships)."""
    spec = find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FaceAnalysisError(
            "face backend 'dlib' needs the face-recognition-models package (pip install face-recognition-models)"
        )
    return Path(spec.origin).parent / "models"


class DlibFaceAnalyzer:
    """dlib models: detector (HOG or CNN), 68-point landmarks, 5-point alignment, ResNet embedding.

    The embedding is aligned with the 5-point predictor (dlib's own, freely licensed) rather than
    the 68-point one, so identity does not depend on the non-commercial iBUG-trained model; the
    68 points are used for landmarks, keypoints and pose only.
    """

    embedding_dim = 128
    landmark_count = 68

    def __init__(self, params: DlibParams | None = None, model_dir: Path | None = None) -> None:
        import dlib

        self.params = params or DlibParams()
        d = Path(model_dir) if model_dir is not None else dlib_model_dir()
        files = {
            "shape68": d / "shape_predictor_68_face_landmarks.dat",
            "shape5": d / "shape_predictor_5_face_landmarks.dat",
            "recognizer": d / "dlib_face_recognition_resnet_model_v1.dat",
        }
        if self.params.detector == "cnn":
            files["cnn"] = d / "mmod_human_face_detector.dat"
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FaceAnalysisError(f"dlib model files missing: {', '.join(missing)}")
        self._shape68 = dlib.shape_predictor(str(files["shape68"]))
        self._shape5 = dlib.shape_predictor(str(files["shape5"]))
        self._recognizer = dlib.face_recognition_model_v1(str(files["recognizer"]))
        if self.params.detector == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(str(files["cnn"]))
        else:
            self._hog = dlib.get_frontal_face_detector()
        logger.info("dlib face analyzer ready (%s detector, upsample %d)", self.params.detector, self.params.upsample)

    def _boxes(self, image: np.ndarray) -> list[tuple[Any, float]]:
        if self.params.detector == "cnn":
            return [(d.rect, float(d.confidence)) for d in self._cnn(image, self.params.upsample)]
        rects, scores, _ = self._hog.run(image, self.params.upsample, 0.0)
        return list(zip(rects, (float(s) for s in scores)))

    def _face(self, image: np.ndarray, rect: Any, score: float, bbox: np.ndarray | None = None) -> Face:
        shape68 = self._shape68(image, rect)
        landmarks = np.array([(p.x, p.y) for p in shape68.parts()], dtype=np.float32)  # [68, 2]
        kps = kps_from_68(landmarks)
        if bbox is None:
            bbox = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32)
        return Face(
            bbox=bbox,
            kps=kps,
            landmarks=landmarks,
            embedding=self._embed(image, rect),
            score=score,
            pose=estimate_head_pose(kps, landmarks, image.shape),
        )

    def _embed(self, image: np.ndarray, rect: Any) -> np.ndarray:
        shape5 = self._shape5(image, rect)
        # padding 0.25 and no jitter: dlib's documented defaults for this model.
        return _unit(np.array(self._recognizer.compute_face_descriptor(image, shape5, 0, 0.25)))

    def detect(self, image: np.ndarray) -> list[Face]:
        img = _check_image(image)
        faces = [self._face(img, rect, score) for rect, score in self._boxes(img)]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    @staticmethod
    def _crop_rect(crop: np.ndarray) -> Any:
        import dlib

        h, w = crop.shape[:2]
        return dlib.rectangle(0, 0, w - 1, h - 1)

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        img = _check_image(crop, "aligned crop")
        return self._embed(img, self._crop_rect(img))

    def analyze_aligned(self, crop: np.ndarray) -> Face:
        img = _check_image(crop, "aligned crop")
        h, w = img.shape[:2]
        return self._face(img, self._crop_rect(img), 1.0, bbox=np.array([0, 0, w, h], dtype=np.float32))


# --------------------------------------------------------------------------------------------
# insightface backend

_INSIGHTFACE_TASKS = ("detection", "landmark_2d_106", "recognition")


class InsightFaceAnalyzer:
    """An insightface model pack run by insightface's own FaceAnalysis (detector, 2d106, ArcFace).

    The pack must already be at <root>/models/<name>/ with .onnx files: FaceAnalysis would
    otherwise try to download it, and the pipeline never downloads. The pack directory is passed
    to FaceAnalysis as an absolute path, so no same-named folder in the working directory can
    shadow it and its download code path is never reached.
    """

    landmark_count = 106

    def __init__(self, params: InsightFaceParams) -> None:
        import onnxruntime
        from insightface.app import FaceAnalysis

        root = Path(params.root).expanduser()
        pack = (root / "models" / params.name).resolve()
        if not pack.is_dir() or not any(pack.glob("*.onnx")):
            raise FaceAnalysisError(
                f"insightface model pack {params.name!r} not found: {pack} must contain its .onnx files "
                f"(face.insightface.root / face.insightface.name); models are never downloaded at run time"
            )
        available = set(onnxruntime.get_available_providers())
        providers = [p for p in params.providers if p in available]
        if not providers:
            raise FaceAnalysisError(
                f"none of face.insightface.providers {params.providers} is available; "
                f"this onnxruntime has {sorted(available)}"
            )
        self.app = FaceAnalysis(
            name=str(pack), root=str(root), providers=providers, allowed_modules=list(_INSIGHTFACE_TASKS)
        )
        missing = [t for t in _INSIGHTFACE_TASKS if t not in self.app.models]
        if missing:
            raise FaceAnalysisError(f"insightface model pack {pack} has no {', '.join(missing)} model")
        ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1
        self.app.prepare(ctx_id=ctx_id, det_size=(params.det_size, params.det_size))
        self._landmark = self.app.models["landmark_2d_106"]
        self._recognizer = self.app.models["recognition"]
        out = self._recognizer.output_shape[-1]
        self.embedding_dim = int(out) if isinstance(out, (int, np.integer)) else 512
        self.crop_size = int(self._recognizer.input_size[0])
        logger.info("insightface analyzer ready: %s on %s", pack, providers)

    def _face(self, rgb_shape: Sequence[int], f: Any, embedding: np.ndarray) -> Face:
        if f.kps is None or f.landmark_2d_106 is None:
            raise FaceAnalysisError("insightface pack returned a face without keypoints or 2d106 landmarks")
        kps = np.asarray(f.kps, dtype=np.float32)
        landmarks = np.asarray(f.landmark_2d_106, dtype=np.float32)
        # The 2d106 model gives no pose (only the optional 3d68 one does, with its own axes), so
        # both backends share one documented estimate.
        return Face(
            bbox=np.asarray(f.bbox, dtype=np.float32)[:4],
            kps=kps,
            landmarks=landmarks,
            embedding=embedding,
            score=float(f.det_score),
            pose=estimate_head_pose(kps, landmarks, rgb_shape),
        )

    def detect(self, image: np.ndarray) -> list[Face]:
        img = _check_image(image)
        bgr = np.ascontiguousarray(img[..., ::-1])  # insightface works on OpenCV's BGR order
        faces = [self._face(img.shape, f, _unit(f.normed_embedding)) for f in self.app.get(bgr)]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def _aligned_bgr(self, crop: np.ndarray) -> np.ndarray:
        import cv2

        img = _check_image(crop, "aligned crop")
        if img.shape[0] != img.shape[1]:
            raise FaceAnalysisError(f"aligned crop must be square, got {img.shape[1]}x{img.shape[0]}")
        if img.shape[0] != self.crop_size:
            img = cv2.resize(img, (self.crop_size, self.crop_size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(img[..., ::-1])

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        return _unit(self._recognizer.get_feat(self._aligned_bgr(crop)))

    def analyze_aligned(self, crop: np.ndarray) -> Face:
        from insightface.app.common import Face as InsightFace

        img = _check_image(crop, "aligned crop")
        bgr = self._aligned_bgr(img)  # [S, S, 3] at the recogniser's size S
        s = self.crop_size
        f = InsightFace(bbox=np.array([0, 0, s, s], dtype=np.float32), det_score=1.0)
        self._landmark.get(bgr, f)  # sets f.landmark_2d_106 from the whole-crop box
        # An aligned crop has its keypoints on the template by definition; map S back to the input size.
        scale = img.shape[0] / s
        f.kps = arcface_template(s) * scale
        f.landmark_2d_106 = np.asarray(f.landmark_2d_106) * scale
        f.bbox = f.bbox * scale
        return self._face(img.shape, f, _unit(self._recognizer.get_feat(bgr)))


def build_face_analyzer(face: FaceParams, profile: str = "tiny") -> FaceAnalyzer:
    """The analyzer ``face.backend`` selects (auto: dlib for the tiny profile, insightface for sd15)."""
    backend = face.resolved_backend(profile)
    if backend == "dlib":
        return DlibFaceAnalyzer(face.dlib)
    return InsightFaceAnalyzer(face.insightface)


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

"""The face analysis backends: DlibFaceAnalyzer, InsightFaceAnalyzer, and build_face_analyzer that picks one.

See ``model.face_analysis`` for what each backend runs. Both return the same ``Face`` record;
dlib and insightface are imported inside the constructors.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model.config import DlibParams, FaceParams, InsightFaceParams
from model.face_analysis.face import Face, FaceAnalysisError, FaceAnalyzer
from model.face_analysis.geometry import arcface_template, estimate_head_pose
from model.face_analysis.images import _check_image

logger = logging.getLogger(__name__)


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


def landmark_count(face: FaceParams, profile: str = "tiny") -> int:
    """The dense-landmark count of the analyzer ``face.backend`` selects (68 dlib, 106 insightface),
    known without loading it: the server checks user landmark coordinates before any model work."""
    backend = face.resolved_backend(profile)
    return DlibFaceAnalyzer.landmark_count if backend == "dlib" else InsightFaceAnalyzer.landmark_count


def build_face_analyzer(face: FaceParams, profile: str = "tiny") -> FaceAnalyzer:
    """The analyzer ``face.backend`` selects (auto: dlib for the tiny profile, insightface for sd15)."""
    backend = face.resolved_backend(profile)
    if backend == "dlib":
        return DlibFaceAnalyzer(face.dlib)
    return InsightFaceAnalyzer(face.insightface)

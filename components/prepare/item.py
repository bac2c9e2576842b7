"""The per-image processor of ``dynamicid prepare`` (ItemProcessor) and its pool-worker plumbing.

One image in, one result out: either a sample (every column of the shard format) or a reject
with a reason, stored content-addressed in the ResultStore (components.prepare.results).

What is computed, per image (docs/data.md has the full reasoning):

- with an annotation record (annotations.jsonl): no detection. The 5 keypoints align an
  ArcFace crop; the identity embedding is the configured recogniser on that crop. Annotated
  landmarks are used when they have the analyzer's landmark count (68 dlib, 106 insightface),
  otherwise the analyzer predicts them on the aligned crop and they are mapped back. Pose and
  expression come from the record when given, else from the same rules as for detected faces.
- without: the analyzer detects; ``pick_face`` picks the face (min size, one face required).

Heavy imports (numpy, PIL, cv2, dlib, insightface, torch via model.landmarks) stay inside functions.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from components.prepare.annotations import parse_annotation
from components.prepare.decode import decode_image
from components.prepare.geometry import sample_outputs
from components.prepare.results import (
    PREPARE_VERSION,
    ItemSettings,
    Reject,
    ResultStore,
    WorkItem,
    item_key,
)

if TYPE_CHECKING:
    import numpy as np

    from components.prepare.source import LocalSource, S3Source

log = logging.getLogger(__name__)

DLIB_ALIGN_SIZE = 150  # dlib's recogniser chips are 150 px; insightface uses its recogniser's input size


class AnalyzerUnavailable(RuntimeError):
    """The configured face backend cannot be built (missing pack or model files): stops the run."""


# --------------------------------------------------------------------------------------------
# The processor


class ItemProcessor:
    """Turns WorkItems into results; one per process. The analyzer is built on first use, so a
    run whose every result is cached never loads a model."""

    def __init__(self, settings: ItemSettings, source: "LocalSource | S3Source"):
        self.s = settings
        self.source = source
        self.store = ResultStore(settings.work_dir)
        self._analyzer = None

    @property
    def analyzer(self):
        if self._analyzer is None:
            from model.config import FaceParams
            from model.face_analysis.backends import build_face_analyzer
            from model.face_analysis.face import FaceAnalysisError

            try:
                self._analyzer = build_face_analyzer(FaceParams.model_validate(self.s.face), self.s.profile)
            except FaceAnalysisError as err:
                raise AnalyzerUnavailable(str(err)) from None
        return self._analyzer

    def __call__(self, item: WorkItem) -> dict[str, Any]:
        out: dict[str, Any] = {"path": item.path, "fingerprint": item.fingerprint, "sha256": None, "key": None,
                               "analysed": False, "check": None}
        if item.size > self.s.max_bytes:
            out["meta"] = _reject_meta("too_large", f"{item.size} bytes > {self.s.max_bytes}")
            return out
        try:
            data = self.source.read(item.key)
        except Exception as err:  # noqa: BLE001 - any I/O failure quarantines this file, never the run
            from components.core.storage import StorageError

            reason = "unsafe_path" if isinstance(err, StorageError) else "read_error"
            out["meta"] = _reject_meta(reason, f"{type(err).__name__}: {err}")
            return out
        sha = hashlib.sha256(data).hexdigest()
        key = item_key(sha, self.s.params_key, item.ann_digest)
        out.update(sha256=sha, key=key)
        if self.store.has(key):
            meta = self.store.meta(key)
        else:
            try:
                meta, blobs = self.analyse(data, item)
            except AnalyzerUnavailable:
                raise
            except Exception as err:  # noqa: BLE001 - a bug or odd input must not stop the data set
                log.warning("prepare: %s failed unexpectedly", item.path, exc_info=True)
                out["meta"] = _reject_meta("analysis_failed", f"{type(err).__name__}: {err}")
                out["key"] = None  # not cached: a fixed bug retries it
                return out
            meta["sha256"] = sha
            self.store.write(key, meta, blobs)
            out["analysed"] = True
        if item.check and meta["status"] == "ok":
            check = self.store.check(key)
            if check is None:
                check = self.detection_check(data, meta, self.store.blobs(key)["embedding"])
                self.store.write_check(key, check)
                out["analysed"] = True
            out["check"] = check
        out["meta"] = meta
        return out

    # -- analysis ---------------------------------------------------------------------------
    def analyse(self, data: bytes, item: WorkItem) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            image = decode_image(data, self.s.max_pixels)  # [H, W, 3] RGB uint8
            if item.annotation is not None:
                face = self._annotated_face(image, item.annotation)
            else:
                face = self._detected_face(image, item.path)
            return self._sample(image, face)
        except Reject as rej:
            return _reject_meta(rej.reason, rej.detail), None

    def _detected_face(self, image: "np.ndarray", who: str) -> dict[str, Any]:
        from model.face_analysis.face import (
            FaceAnalysisError,
            MultipleFacesError,
            NoFaceError,
            pick_face,
        )
        from model.motion import estimate_expression

        try:
            faces = self.analyzer.detect(image)
        except FaceAnalysisError as err:
            raise Reject("analysis_failed", str(err)) from None
        try:
            face = pick_face(faces, who, one_face=self.s.one_face, min_size=self.s.min_face_size)
        except MultipleFacesError as err:
            raise Reject("multiple_faces", str(err)) from None
        except NoFaceError as err:
            raise Reject("face_too_small" if faces else "no_face", str(err)) from None
        try:
            expression = estimate_expression(face.landmarks)
        except ValueError as err:
            raise Reject("analysis_failed", f"expression: {err}") from None
        yaw, pitch, roll = face.pose
        return {"bbox": face.bbox, "landmarks": face.landmarks, "embedding": face.embedding, "yaw": yaw,
                "pitch": pitch, "roll": roll, "expression": expression, "faces": len(faces),
                "source": "detection", "landmark_source": "analyzer", "pose_source": "rule",
                "expression_source": "rule"}

    def _annotated_face(self, image: "np.ndarray", text: str) -> dict[str, Any]:
        import numpy as np
        from skimage.transform import SimilarityTransform

        from model.face_analysis.face import FaceAnalysisError
        from model.face_analysis.geometry import (
            align_face,
            arcface_template,
            estimate_head_pose,
        )
        from model.motion import estimate_expression

        analyzer = self.analyzer
        ann = parse_annotation(text)
        kps = np.asarray(ann.kps, dtype=np.float64)  # [5, 2]
        size = int(getattr(analyzer, "crop_size", DLIB_ALIGN_SIZE))
        try:
            crop = align_face(image, kps, size)  # [size, size, 3] ArcFace-aligned
        except FaceAnalysisError as err:
            raise Reject("invalid_annotation", f"kps: {err}") from None
        own = ann.landmarks is not None and len(ann.landmarks) == analyzer.landmark_count
        box = None
        if ann.box is not None or ann.landmarks is not None:
            box = np.asarray(ann.box if ann.box is not None else _extent(ann.landmarks), np.float32)
            self._check_size(box)  # before the costly recogniser
        if own:
            landmarks = np.asarray(ann.landmarks, dtype=np.float32)  # [P, 2]
            embedding = analyzer.embed_aligned(crop)
        else:
            # The analyzer's own landmarks on the aligned crop, mapped back into the photo: every
            # sample of a data set then has the analyzer's layout, as inference will.
            aligned = analyzer.analyze_aligned(crop)
            embedding = aligned.embedding
            tform = SimilarityTransform.from_estimate(kps, arcface_template(size))
            landmarks = np.asarray(tform.inverse(np.asarray(aligned.landmarks, np.float64)), np.float32)
        if box is None:
            box = np.asarray(_extent(landmarks), np.float32)
            self._check_size(box)
        try:
            if ann.pose is not None:
                yaw, pitch, roll = ann.pose.yaw, ann.pose.pitch, ann.pose.roll
            else:
                yaw, pitch, roll = estimate_head_pose(kps, landmarks, image.shape)
            expression = ann.expression or estimate_expression(landmarks)
        except (ValueError, FaceAnalysisError) as err:
            raise Reject("analysis_failed", str(err)) from None
        return {"bbox": box, "landmarks": landmarks, "embedding": embedding, "yaw": yaw, "pitch": pitch,
                "roll": roll, "expression": expression, "source": "annotation",
                "landmark_source": "annotation" if own else "analyzer",
                "pose_source": "annotation" if ann.pose is not None else "rule",
                "expression_source": "annotation" if ann.expression else "rule"}

    def _check_size(self, box: "np.ndarray") -> None:
        side = float(min(box[2] - box[0], box[3] - box[1]))
        if side < self.s.min_face_size:
            raise Reject("face_too_small", f"annotated face is {box[2] - box[0]:.0f}x{box[3] - box[1]:.0f} px, "
                                           f"below face.min_face_size {self.s.min_face_size}")

    def _sample(self, image: "np.ndarray", face: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        import numpy as np

        from model.motion import face_prompt

        blobs, face_box = sample_outputs(image, face["bbox"], face["landmarks"], image_size=self.s.image_size,
                                         crop_size=self.s.crop_size, landmark_size=self.s.landmark_size)
        blobs["embedding"] = np.asarray(face["embedding"], dtype=np.float32)
        yaw, pitch, roll = (round(float(face[k]), 4) for k in ("yaw", "pitch", "roll"))
        meta = {
            "status": "ok", "version": PREPARE_VERSION, "face_box": face_box,
            "box_px": [round(float(v), 3) for v in face["bbox"]], "image_hw": list(image.shape[:2]),
            "yaw": yaw, "pitch": pitch, "roll": roll, "expression": face["expression"],
            "face_prompt": face_prompt(face["expression"], yaw, pitch),
            "embedding_dim": int(blobs["embedding"].shape[0]), "landmark_count": len(face["landmarks"]),
            **{k: face[k] for k in ("source", "landmark_source", "pose_source", "expression_source")},
        }
        return meta, blobs

    # -- detector measurement ------------------------------------------------------------------
    def detection_check(self, data: bytes, meta: dict[str, Any], embedding: "np.ndarray") -> dict[str, Any]:
        """Run the detector on an annotated image: is the annotated face found (box centre inside the
        annotated box), how well do the boxes overlap, how far is the detected face's embedding."""
        import numpy as np

        from model.face_analysis.face import FaceAnalysisError

        x0, y0, x1, y1 = meta["box_px"]
        try:
            faces = self.analyzer.detect(decode_image(data, self.s.max_pixels))
        except (FaceAnalysisError, Reject):
            faces = []
        hits = [f for f in faces if x0 <= (f.bbox[0] + f.bbox[2]) / 2 <= x1 and y0 <= (f.bbox[1] + f.bbox[3]) / 2 <= y1]
        out: dict[str, Any] = {"detected": bool(hits), "faces": len(faces), "abs_yaw": abs(meta["yaw"]),
                               "pitch": meta["pitch"], "expression": meta["expression"], "iou": None,
                               "embedding_distance": None}
        if hits:
            f = max(hits, key=lambda f: f.area)
            ix = max(0.0, min(x1, f.bbox[2]) - max(x0, f.bbox[0]))
            iy = max(0.0, min(y1, f.bbox[3]) - max(y0, f.bbox[1]))
            inter = ix * iy
            union = (x1 - x0) * (y1 - y0) + f.area - inter
            out["iou"] = round(float(inter / union), 4) if union > 0 else 0.0
            out["embedding_distance"] = round(float(np.linalg.norm(np.asarray(f.embedding) - embedding)), 4)
        return out


def _extent(landmarks: "np.ndarray | list") -> list[float]:
    """Face box when the record has none: the extent of the dense landmarks (annotated, else predicted)."""
    import numpy as np

    pts = np.asarray(landmarks, np.float64)  # [P, 2]
    return [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())]


def _reject_meta(reason: str, detail: str) -> dict[str, Any]:
    return {"status": "reject", "reason": reason, "detail": detail, "version": PREPARE_VERSION}


# --------------------------------------------------------------------------------------------
# Pool plumbing (spawned workers)

_PROCESSOR: ItemProcessor | None = None  # per worker process: models are loaded once per worker


def init_worker(settings: ItemSettings, source: "LocalSource | S3Source") -> None:
    global _PROCESSOR
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    _PROCESSOR = ItemProcessor(settings, source)


def run_batch(items: list[WorkItem]) -> list[dict[str, Any]]:
    assert _PROCESSOR is not None, "init_worker did not run"
    return [_PROCESSOR(item) for item in items]


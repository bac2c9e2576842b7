"""Per-image work of ``dynamicid prepare``, content-addressed, run in pool workers.

One image in, one result out: either a sample (every column of the shard format) or a reject
with a reason. Results live in a work directory keyed by

    key = sha256(file sha256, params key, annotation record digest)

so the same bytes analysed with the same settings are never analysed twice, whatever their
path, and a killed run loses at most the images in flight. Each result is two files written
atomically (temp file + rename): ``<key>.npz`` (PNG blobs, embedding, landmarks) first, then
``<key>.json`` (status, pose, expression, ...): the JSON's presence means "done".

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
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

if TYPE_CHECKING:
    import numpy as np

    from components.prepare.source import LocalSource, S3Source

log = logging.getLogger(__name__)

# Part of every result key: bump when the bytes or fields of a result change.
PREPARE_VERSION = "prepare-2"  # 2: decode_image (header limits, alpha over white, 16-bit grey)
DEFAULT_CAPTION = "a photo of a person"

# Reject reasons (rejects.jsonl "reason"), in the order the checks run. docs/data.md lists them.
REASONS = {
    "unsafe_path": "the file's key or link points outside the input root",
    "bad_filename": "the path is not valid UTF-8 (shown with \\x escapes); never read",
    "not_a_file": "a directory, FIFO, socket or device named like an image; never read",
    "no_identity": "image directly under the root: no <identity>/ folder",
    "too_large": "file larger than prepare.max_file_mb (not read)",
    "read_error": "the file could not be read (I/O or object-store error after retries)",
    "empty_file": "zero-byte file",
    "not_an_image": "content is not JPEG, PNG or WebP, whatever the extension (text, GIF, EPS ...); never decoded",
    "too_many_pixels": "the header declares more than prepare.max_pixels pixels (decompression bomb); never decoded",
    "unreadable": "a JPEG/PNG/WebP that cannot be decoded (truncated, corrupt)",
    "invalid_annotation": "annotations.jsonl record for this image is malformed",
    "no_face": "the detector found no face",
    "face_too_small": "every face found is smaller than face.min_face_size",
    "multiple_faces": "several faces of at least face.min_face_size where prepare.one_face requires one",
    "analysis_failed": "landmarks/pose/embedding could not be computed for the face",
    "duplicate": "exact byte duplicate of another input image (the annotated copy, else the first by path, is kept)",
}
LANDMARK_COUNTS = (68, 106)  # iBUG (dlib) and insightface 2d106
DLIB_ALIGN_SIZE = 150  # dlib's recogniser chips are 150 px; insightface uses its recogniser's input size


@dataclass(frozen=True)
class ItemSettings:
    """Everything a worker needs; picklable (sent once per worker)."""

    face: dict[str, Any]  # FaceParams.model_dump()
    profile: str
    image_size: int
    crop_size: int
    landmark_size: int
    min_face_size: int
    one_face: bool
    max_bytes: int
    max_pixels: int
    work_dir: str
    params_key: str


@dataclass(frozen=True)
class WorkItem:
    path: str
    key: str  # what the source's read() takes
    size: int
    fingerprint: str
    annotation: str | None  # canonical JSON record
    ann_digest: str  # "" when not annotated
    check: bool  # also run detection to measure the detector against the annotation


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class AnalyzerUnavailable(RuntimeError):
    """The configured face backend cannot be built (missing pack or model files): stops the run."""


def item_key(sha256: str, params_key: str, ann_digest: str) -> str:
    return hashlib.sha256(f"{sha256}\n{params_key}\n{ann_digest}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Result store


class ResultStore:
    """``<root>/items/<k[:2]>/<k>.{npz,json,check.json}``: one result per key, written atomically."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root) / "items"

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def has(self, key: str, check: bool = False) -> bool:
        return self._path(key, ".json").is_file() and (not check or self._path(key, ".check.json").is_file())

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads(self._path(key, ".json").read_text())

    def check(self, key: str) -> dict[str, Any] | None:
        p = self._path(key, ".check.json")
        return json.loads(p.read_text()) if p.is_file() else None

    def blobs(self, key: str) -> dict[str, Any]:
        """PNG blobs as bytes, embedding / landmarks as float32 arrays."""
        import numpy as np

        with np.load(self._path(key, ".npz"), allow_pickle=False) as z:
            return {k: (z[k].tobytes() if z[k].dtype == np.uint8 else z[k].copy()) for k in z.files}

    def _atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def write(self, key: str, meta: dict[str, Any], blobs: dict[str, Any] | None) -> None:
        import numpy as np

        if blobs is not None:
            buf = io.BytesIO()
            np.savez(buf, **{k: (np.frombuffer(v, np.uint8) if isinstance(v, bytes) else v) for k, v in blobs.items()})
            self._atomic(self._path(key, ".npz"), buf.getvalue())
        self._atomic(self._path(key, ".json"), json.dumps(meta, sort_keys=True).encode())

    def write_check(self, key: str, check: dict[str, Any]) -> None:
        self._atomic(self._path(key, ".check.json"), json.dumps(check, sort_keys=True).encode())


# --------------------------------------------------------------------------------------------
# Annotation records


def _finite_points(v: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if not all(math.isfinite(c) for p in v for c in p):
        raise ValueError("contains NaN or infinite coordinates")
    return v


class AnnotatedPose(BaseModel):
    model_config = ConfigDict(extra="ignore")
    yaw: float
    pitch: float
    roll: float = 0.0


class Annotation(BaseModel):
    """One annotations.jsonl record (docs/data.md); fields other than these are informative only."""

    model_config = ConfigDict(extra="ignore")  # identity, attributes, landmark_format ...
    kps: list[tuple[float, float]]  # [5, 2] ArcFace order
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    landmarks: list[tuple[float, float]] | None = None  # [68 | 106, 2]
    pose: AnnotatedPose | None = None
    expression: str | None = None

    @field_validator("kps")
    @classmethod
    def _five(cls, v):
        if len(v) != 5:
            raise ValueError(f"needs 5 points (eyes, nose tip, mouth corners), got {len(v)}")
        return _finite_points(v)

    @field_validator("landmarks")
    @classmethod
    def _dense(cls, v):
        if v is not None and len(v) not in LANDMARK_COUNTS:
            raise ValueError(f"needs {' or '.join(map(str, LANDMARK_COUNTS))} points, got {len(v)}")
        return None if v is None else _finite_points(v)

    @field_validator("box")
    @classmethod
    def _box(cls, v):
        if v is not None and not (all(math.isfinite(c) for c in v) and v[2] > v[0] and v[3] > v[1]):
            raise ValueError(f"must be finite [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {list(v)}")
        return v

    @field_validator("expression")
    @classmethod
    def _expression(cls, v):
        from model.motion import EXPRESSIONS

        if v is not None and v.strip().lower() not in EXPRESSIONS:
            raise ValueError(f"unknown expression {v!r}; expected one of {', '.join(EXPRESSIONS)}")
        return None if v is None else v.strip().lower()


def parse_annotation(text: str) -> Annotation:
    """Validate one record; Reject (invalid_annotation, naming the field) on any problem."""
    try:
        return Annotation.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Reject("invalid_annotation", f"{where}: {first['msg']}") from None


# --------------------------------------------------------------------------------------------
# Decoding hostile bytes

# Formats prepare decodes, whatever the file's extension: the content is sniffed. Everything else
# PIL could open (GIF, TIFF, EPS -> Ghostscript, ...) is refused before any plugin decodes it.
# Phone JPEGs with a second picture (MPO) come through the JPEG opener.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP")
_MAGIC = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n")  # + RIFF....WEBP, checked below


def _is_allowed_magic(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb(im: "Any") -> "np.ndarray":
    """The conversion inference uses too, so training and serving see the same pixels."""
    from model.face_analysis import pil_to_rgb

    return pil_to_rgb(im)


def decode_image(data: bytes, max_pixels: int) -> "np.ndarray":
    """Bytes of an untrusted file -> RGB uint8 [H, W, 3], or Reject with the reason.

    Why this order: the cheap, allocation-free checks run on the header only (``Image.open`` is
    lazy), so a 20 kB PNG declaring 12000 x 12000 pixels is refused before a single row is
    inflated; only then are pixels decoded. EXIF orientation is applied as in
    ``model.face_analysis.load_image``.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Reject("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except UnidentifiedImageError:
        if _is_allowed_magic(data):
            raise Reject("unreadable", "corrupt or truncated header") from None
        raise Reject("not_an_image", f"content is not JPEG, PNG or WebP (starts with {data[:16]!r})") from None
    except Image.DecompressionBombError as err:  # PIL's own header check, above 2 x Image.MAX_IMAGE_PIXELS
        raise Reject("too_many_pixels", f"header check: {err}; not decoded") from None
    except Exception as err:  # noqa: BLE001 - a malformed header is the file's problem, never the run's
        raise Reject("unreadable", f"header: {type(err).__name__}: {err}") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise Reject("too_many_pixels", f"header check: {im.format} declares {w}x{h} = {w * h} pixels "
                                            f"> prepare.max_pixels {max_pixels}; not decoded")
        if w < 1 or h < 1:
            raise Reject("unreadable", f"header check: {im.format} declares {w}x{h} pixels")
        try:
            im.load()  # truncated data fails here
            return _to_rgb(ImageOps.exif_transpose(im))
        except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, struct.error ... from odd files
            raise Reject("unreadable", f"{type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------------------------
# Geometry of the stored images


def face_crop_box(bbox: "np.ndarray", hw: tuple[int, int], margin: float = 0.25) -> tuple[int, int, int, int]:
    """The CLIP face crop's square box: the one inference uses (model.face_analysis)."""
    from model.face_analysis import face_crop_box as shared

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
    from model.landmarks import render_landmarks

    h, w = image.shape[:2]
    left, top, side = square_frame(bbox, (h, w))
    pixels = _resize(image[top:top + side, left:left + side], image_size)  # [S, S, 3]
    x0, y0, x1, y1 = [float(v) for v in bbox]
    face_box = [float(np.clip(v, 0.0, 1.0)) for v in ((y0 - top) / side, (x0 - left) / side,
                                                     (y1 - top) / side, (x1 - left) / side)]
    cl, ct, cr, cb = face_crop_box(bbox, (h, w))
    crop = _resize(image[ct:cb, cl:cr], crop_size)  # [C, C, 3]
    pts = np.asarray(landmarks, dtype=np.float32) - np.array([cl, ct], dtype=np.float32)  # [P, 2] crop pixels
    lmk = (render_landmarks(pts, (cb - ct, cr - cl), size=landmark_size)[0] * 255).astype(np.uint8)  # [L, L]
    norm = pts / np.array([cr - cl, cb - ct], dtype=np.float32)
    blobs = {"pixels": encode_png(pixels), "face_crop": encode_png(crop), "landmark_image": encode_png(lmk),
             "landmarks": norm.reshape(-1).astype(np.float32)}
    return blobs, face_box


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
            from model.face_analysis import FaceAnalysisError, build_face_analyzer

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
        from model.face_analysis import FaceAnalysisError, MultipleFacesError, NoFaceError, pick_face
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

        from model.face_analysis import FaceAnalysisError, align_face, arcface_template, estimate_head_pose
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

        from model.face_analysis import FaceAnalysisError

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


"""model/face_analysis/ on real images and real models.

dlib: the face-recognition-models weights on insightface's bundled photos (t1.jpg: six people;
Tom_Hanks_54745.png: an ArcFace-aligned 112 px crop). insightface: its real FaceAnalysis code path
over a model pack built in code (tests/fixtures/insightface_pack.py), checked against values this
file recomputes from the fixture's known weights.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
from PIL import Image

from model.config import FaceParams
from model.face_analysis.backends import DlibFaceAnalyzer, InsightFaceAnalyzer, build_face_analyzer
from model.face_analysis.face import FaceAnalysisError, FaceAnalyzer, MultipleFacesError, NoFaceError, pick_face
from model.face_analysis.geometry import HEAD_MODEL_POINTS, align_face, estimate_head_pose
from model.face_analysis.images import load_image
from model.motion import estimate_expression
from tests.fixtures.insightface_pack import PackFace, build_insightface_pack

IMAGES = Path(insightface.__file__).parent / "data" / "images"
T1 = IMAGES / "t1.jpg"
TOM = IMAGES / "Tom_Hanks_54745.png"
# ArcFace's published 5-point template for 112 px crops (written out here, not imported, so a
# wrong constant in the module under test cannot hide itself).
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def _match(face, faces, width: int | None = None):
    """The face in ``faces`` whose box is nearest (optionally after mirroring ``face`` in x)."""
    x0 = face.bbox[0] if width is None else width - face.bbox[2]
    return min(faces, key=lambda g: abs(g.bbox[0] - x0) + abs(g.bbox[1] - face.bbox[1]))


# ---------------------------------------------------------------------------------------------
# dlib backend


@pytest.fixture(scope="module")
def dlib_analyzer() -> DlibFaceAnalyzer:
    analyzer = build_face_analyzer(FaceParams(backend="dlib", dlib={"detector": "hog", "upsample": 1}))
    assert isinstance(analyzer, DlibFaceAnalyzer)
    return analyzer


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return load_image(T1)


@pytest.fixture(scope="module")
def t1_faces(dlib_analyzer, t1):
    return dlib_analyzer.detect(t1)


@pytest.fixture(scope="module")
def t1_mirror_faces(dlib_analyzer, t1):
    return dlib_analyzer.detect(np.ascontiguousarray(t1[:, ::-1]))


def test_dlib_finds_all_six_people_largest_first(dlib_analyzer, t1_faces):
    assert isinstance(dlib_analyzer, FaceAnalyzer)
    assert (dlib_analyzer.embedding_dim, dlib_analyzer.landmark_count) == (128, 68)
    assert len(t1_faces) == 6
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in t1_faces]
    assert areas == sorted(areas, reverse=True)
    for f in t1_faces:
        assert f.bbox.shape == (4,) and f.kps.shape == (5, 2) and f.landmarks.shape == (68, 2)
        assert f.embedding.shape == (128,)
        assert np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
        lm = f.landmarks.astype(np.float64)
        # 5 keypoints from the iBUG points: eye centres, nose tip 30, mouth corners 48 / 54.
        expected = [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]
        np.testing.assert_allclose(f.kps, np.array(expected), atol=1e-4)
        assert f.kps[0, 0] < f.kps[1, 0] and f.kps[3, 0] < f.kps[4, 0]  # "left" is the image's left
        x0, y0, x1, y1 = f.bbox
        assert np.all((f.kps[:, 0] > x0) & (f.kps[:, 0] < x1) & (f.kps[:, 1] > y0) & (f.kps[:, 1] < y1))
        assert f.pose == pytest.approx(estimate_head_pose(f.kps, f.landmarks, (886, 1280)))


def test_pick_face_names_the_identity(t1_faces):
    with pytest.raises(MultipleFacesError, match=r"identity 2: expected exactly one face, found 6"):
        pick_face(t1_faces, "identity 2", one_face=True)
    assert pick_face(t1_faces, "identity 2") is t1_faces[0]  # largest when several are allowed


def test_flat_image_has_no_face(dlib_analyzer):
    faces = dlib_analyzer.detect(np.full((240, 320, 3), (120, 160, 200), np.uint8))
    assert faces == []
    with pytest.raises(NoFaceError, match="identity 1: no face found"):
        pick_face(faces, "identity 1")


def test_min_face_size_rejects_small_faces(t1_faces):
    sides = sorted((min(f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]) for f in t1_faces), reverse=True)
    # Only the largest face passes a bar between the two largest sizes, and then "one face" holds.
    bar = int((sides[0] + sides[1]) / 2)
    assert pick_face(t1_faces, "identity 1", one_face=True, min_size=bar) is t1_faces[0]
    with pytest.raises(NoFaceError, match=rf"identity 3: no face of at least {int(sides[0]) + 1} px"):
        pick_face(t1_faces, "identity 3", min_size=int(sides[0]) + 1)


def test_mirror_image_is_near_different_people_are_far(t1, t1_faces, t1_mirror_faces):
    assert len(t1_mirror_faces) == 6
    mirror = [_dist(f.embedding, _match(f, t1_mirror_faces, t1.shape[1]).embedding) for f in t1_faces]
    others = [_dist(a.embedding, b.embedding) for i, a in enumerate(t1_faces) for b in t1_faces[i + 1 :]]
    assert max(mirror) < 0.25 < 0.35 < min(others)
    assert max(mirror) < min(others) / 2


def test_aligned_mode_embeds_without_detection(dlib_analyzer, t1, t1_faces, monkeypatch):
    tom = load_image(TOM)  # already an ArcFace-aligned 112 px crop
    detected = pick_face(dlib_analyzer.detect(tom), "tom", one_face=True)

    def no_detection(*_):
        raise AssertionError("aligned mode must not run the detector")

    monkeypatch.setattr(dlib_analyzer, "_boxes", no_detection)
    emb = dlib_analyzer.embed_aligned(tom)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    assert _dist(emb, detected.embedding) < 0.15
    face = dlib_analyzer.analyze_aligned(tom)
    np.testing.assert_array_equal(face.bbox, [0, 0, 112, 112])
    assert face.landmarks.shape == (68, 2)
    np.testing.assert_allclose(face.embedding, emb, atol=1e-6)
    # An aligned crop of each t1 face embeds next to that face's detected embedding.
    gallery = np.stack([f.embedding for f in t1_faces])
    for i, f in enumerate(t1_faces):
        d = np.linalg.norm(gallery - dlib_analyzer.embed_aligned(align_face(t1, f.kps, 150)), axis=1)
        assert int(np.argmin(d)) == i and d[i] < 0.2


def test_dlib_cnn_detector_agrees_with_hog(dlib_analyzer):
    tom = load_image(TOM)
    cnn = build_face_analyzer(FaceParams(backend="dlib", dlib={"detector": "cnn", "upsample": 0}))
    by_cnn = pick_face(cnn.detect(tom), "tom", one_face=True)
    by_hog = pick_face(dlib_analyzer.detect(tom), "tom", one_face=True)
    assert by_cnn.score > 0 and _dist(by_cnn.embedding, by_hog.embedding) < 0.1
    assert np.abs(by_cnn.kps - by_hog.kps).max() < 4  # pixels, on a 112 px face crop


def test_pose_of_real_faces_flips_with_the_mirror_image(t1, t1_faces, t1_mirror_faces):
    for f in t1_faces:
        g = _match(f, t1_mirror_faces, t1.shape[1])
        assert f.pose[0] == pytest.approx(-g.pose[0], abs=6)  # yaw flips
        assert f.pose[1] == pytest.approx(g.pose[1], abs=6)  # pitch stays
        assert f.pose[2] == pytest.approx(-g.pose[2], abs=6)  # roll flips
    # The largest face (standing man, top right) looks far to the image's left.
    assert t1_faces[0].pose[0] < -30


def test_expression_estimate_on_real_faces(t1_faces):
    def at(x: float, y: float):
        return next(f for f in t1_faces if f.bbox[0] < x < f.bbox[2] and f.bbox[1] < y < f.bbox[3])

    # Smiling / laughing in the photo: centre-left man, centre-right man, right woman.
    for x, y in [(500, 350), (780, 420), (1170, 340)]:
        assert estimate_expression(at(x, y).landmarks) == "happy", (x, y)
    assert estimate_expression(at(320, 220).landmarks) == "neutral"  # dark-haired woman, closed mouth


# ---------------------------------------------------------------------------------------------
# Backend-independent helpers


def _posed_head(yaw: float, pitch: float, roll: float, h: int = 480, w: int = 640):
    """Rotation, keypoints and 68 landmarks of HEAD_MODEL_POINTS turned by plain rotation matrices:
    about the vertical axis (nose to +x for yaw > 0), then the horizontal axis (nose up for
    pitch > 0), then the optical axis (clockwise on screen for roll > 0), 60 cm from the camera."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, -np.sin(y)], [0, 1, 0], [np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    rot = rz @ rx @ ry
    cam = (rot @ HEAD_MODEL_POINTS.T).T + [20.0, -10.0, 600.0]
    f = float(max(h, w))
    pts = f * cam[:, :2] / cam[:, 2:] + [w / 2, h / 2]  # [6, 2] pinhole projection
    lm = np.tile(pts[:2].mean(0), (68, 1))  # eyes collapse to their centres, chin = lowest contour point
    lm[36:42], lm[42:48], lm[48:68], lm[8] = pts[0], pts[1], pts[3:5].mean(0), pts[5]
    return rot, pts[:5], lm


def test_head_pose_recovers_known_rotations():
    for yaw, pitch, roll in [(0, 0, 0), (30, 0, 0), (-25, 10, 0), (15, -20, 12), (-40, 5, -15), (0, 0, 25)]:
        rot, kps, lm = _posed_head(yaw, pitch, roll)
        nose, across = rot @ [0.0, 0.0, -1.0], rot @ [1.0, 0.0, 0.0]  # the documented definitions
        expected = (
            np.degrees(np.arctan2(nose[0], -nose[2])),
            np.degrees(np.arctan2(-nose[1], np.hypot(nose[0], nose[2]))),
            np.degrees(np.arctan2(across[1], across[0])),
        )
        assert estimate_head_pose(kps, lm, (480, 640)) == pytest.approx(expected, abs=0.5), (yaw, pitch, roll)
    # What the signs mean, without the definitions: nose right, nose up, clockwise.
    assert estimate_head_pose(*_posed_head(30, 0, 0)[1:], (480, 640)) == pytest.approx((30, 0, 0), abs=0.5)
    assert estimate_head_pose(*_posed_head(0, 20, 0)[1:], (480, 640)) == pytest.approx((0, 20, 0), abs=0.5)
    assert estimate_head_pose(*_posed_head(0, 0, 20)[1:], (480, 640)) == pytest.approx((0, 0, 20), abs=0.5)


def test_align_face_is_the_template_similarity(t1, t1_faces):
    # Keypoints that are the template shifted by whole pixels: the crop is a plain window.
    for size in (112, 224):
        kps = ARCFACE_112 * size / 112 + [300, 200]
        np.testing.assert_array_equal(align_face(t1, kps, size), t1[200 : 200 + size, 300 : 300 + size])
    # Real keypoints: the same warp as insightface's own norm_crop (an independent implementation).
    from insightface.utils.face_align import norm_crop

    for f in t1_faces[:3]:
        ours = align_face(t1, f.kps, 112).astype(int)
        assert np.abs(ours - norm_crop(t1, f.kps, 112).astype(int)).max() <= 1
    with pytest.raises(FaceAnalysisError, match="degenerate keypoints"):
        align_face(t1, np.zeros((5, 2)), 112)


def test_load_image_decodes_and_applies_exif_orientation(tmp_path):
    rgb = load_image(TOM)
    assert rgb.dtype == np.uint8 and rgb.shape == (112, 112, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", exif=exif)
    np.testing.assert_array_equal(load_image(buf.getvalue()), np.rot90(rgb, k=-1))
    gray = tmp_path / "gray.png"
    Image.fromarray(rgb[..., 0]).save(gray)
    out = load_image(gray)
    assert out.shape == (112, 112, 3) and np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: T1.read_bytes()[: len(T1.read_bytes()) // 2], "truncated"),
        (lambda: TOM.read_bytes()[:2000], "truncated"),
        (lambda: b"this is not an image at all", "not a recognised image format"),
        (lambda: b"", "empty"),
    ],
)
def test_unreadable_images_raise_with_a_reason(make, reason):
    with pytest.raises(FaceAnalysisError, match=rf"cannot read image <\d+ bytes>: .*({reason})"):
        load_image(make())


def test_bad_inputs_raise_face_analysis_errors(dlib_analyzer, tmp_path):
    with pytest.raises(FaceAnalysisError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(FaceAnalysisError, match=r"RGB array \[H, W, 3\]"):
        dlib_analyzer.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(FaceAnalysisError, match="uint8"):
        dlib_analyzer.detect(np.zeros((64, 64, 3), np.float32))
    assert issubclass(NoFaceError, ValueError) and issubclass(MultipleFacesError, FaceAnalysisError)


# ---------------------------------------------------------------------------------------------
# insightface backend over the fixture pack

DET = 160  # detector input; test images are 320 x 320, so insightface scales them by 0.5
KPS_A = ARCFACE_112 + [100, 110]  # the template shifted by whole pixels: its crop is a window
BOX_A = (112.0, 120.0, 210.0, 230.0)
ANGLE_B, SCALE_B, CENTRE_B = np.radians(15.0), 0.4, np.array([40.0, 45.0])
ROT_B = np.array([[np.cos(ANGLE_B), -np.sin(ANGLE_B)], [np.sin(ANGLE_B), np.cos(ANGLE_B)]])
SHIFT_B = CENTRE_B - SCALE_B * ROT_B @ ARCFACE_112.mean(0)
KPS_B = SCALE_B * ARCFACE_112 @ ROT_B.T + SHIFT_B  # a rotated, scaled template
BOX_B = (10.0, 10.0, 70.0, 80.0)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface_root")
    faces = (  # detector-input coordinates; B is smaller but scores higher
        PackFace(bbox=tuple(np.array(BOX_A) / 2), kps=KPS_A / 2, score=0.7),
        PackFace(bbox=tuple(np.array(BOX_B) / 2), kps=KPS_B / 2, score=0.9),
    )
    return build_insightface_pack(root, faces, det_size=DET)


def _params(pack, **over) -> FaceParams:
    cfg = {"root": str(pack.root), "name": pack.name, "det_size": DET, "providers": ["CPUExecutionProvider"]}
    return FaceParams(backend="insightface", insightface={**cfg, **over})


@pytest.fixture(scope="module")
def ins_analyzer(pack) -> InsightFaceAnalyzer:
    analyzer = build_face_analyzer(_params(pack), profile="tiny")  # explicit backend beats the profile
    assert isinstance(analyzer, InsightFaceAnalyzer)
    return analyzer


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return np.ascontiguousarray(load_image(T1)[300:620, 400:720])  # real pixels, 320 x 320


def _expected_embedding(crop_rgb: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """The fixture recogniser by hand: (x - 127.5) / 127.5, 8x8 average pool, C-H-W flatten, project."""
    x = (crop_rgb.astype(np.float64) - 127.5) / 127.5  # [112, 112, 3]
    pooled = x.transpose(2, 0, 1).reshape(3, 14, 8, 14, 8).mean(axis=(2, 4)).reshape(-1)  # [588]
    e = pooled @ projection.astype(np.float64)
    return e / np.linalg.norm(e)


def _expected_landmarks(box, normalised: np.ndarray) -> np.ndarray:
    """2d106 output mapped back from its crop: centred on the box, 1.5 x its longer side wide."""
    x0, y0, x1, y1 = box
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + 0.75 * max(x1 - x0, y1 - y0) * normalised


def test_insightface_runs_the_real_face_analysis(ins_analyzer):
    from insightface.app import FaceAnalysis

    assert isinstance(ins_analyzer.app, FaceAnalysis)
    assert set(ins_analyzer.app.models) == {"detection", "landmark_2d_106", "recognition"}
    assert (ins_analyzer.embedding_dim, ins_analyzer.landmark_count) == (512, 106)
    assert isinstance(ins_analyzer, FaceAnalyzer)


def test_insightface_boxes_keypoints_landmarks_embeddings(ins_analyzer, pack, scene):
    faces = ins_analyzer.detect(scene)
    assert len(faces) == 2
    a, b = faces  # by area, although the detector ranks B first by score
    np.testing.assert_allclose(a.bbox, BOX_A, atol=1e-3)
    np.testing.assert_allclose(b.bbox, BOX_B, atol=1e-3)
    assert (a.score, b.score) == pytest.approx((0.7, 0.9), abs=1e-6)
    np.testing.assert_allclose(a.kps, KPS_A, atol=1e-3)
    np.testing.assert_allclose(b.kps, KPS_B, atol=1e-3)
    np.testing.assert_allclose(a.landmarks, _expected_landmarks(BOX_A, pack.landmarks), atol=1e-3)
    np.testing.assert_allclose(b.landmarks, _expected_landmarks(BOX_B, pack.landmarks), atol=1e-3)
    # A: the aligned crop is the 112 px window at the template's shift.
    np.testing.assert_allclose(a.embedding, _expected_embedding(scene[110:222, 100:212], pack.projection), atol=1e-5)
    # B: the crop is the inverse of the known similarity, warped here with cv2 directly.
    inv = np.hstack([ROT_B.T / SCALE_B, (-ROT_B.T @ SHIFT_B / SCALE_B)[:, None]])  # [2, 3] image -> template
    crop_b = cv2.warpAffine(scene, inv, (112, 112), borderValue=0.0)
    np.testing.assert_allclose(b.embedding, _expected_embedding(crop_b, pack.projection), atol=2e-3)
    for f in faces:
        assert f.pose == pytest.approx(estimate_head_pose(f.kps, f.landmarks, scene.shape))
    with pytest.raises(MultipleFacesError, match="identity 1"):
        pick_face(faces, "identity 1", one_face=True)


def test_insightface_aligned_mode(ins_analyzer, pack, scene):
    crop = np.ascontiguousarray(scene[110:222, 100:212])
    expected = _expected_embedding(crop, pack.projection)
    np.testing.assert_allclose(ins_analyzer.embed_aligned(crop), expected, atol=1e-5)
    face = ins_analyzer.analyze_aligned(crop)
    np.testing.assert_array_equal(face.bbox, [0, 0, 112, 112])
    np.testing.assert_allclose(face.kps, ARCFACE_112, atol=1e-4)
    np.testing.assert_allclose(face.landmarks, _expected_landmarks((0, 0, 112, 112), pack.landmarks), atol=1e-3)
    np.testing.assert_allclose(face.embedding, expected, atol=1e-5)
    # A 224 px crop is brought to the model's 112 (2x2 area average of a pixel-doubled crop = crop).
    big = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(ins_analyzer.embed_aligned(big), expected, atol=1e-5)
    np.testing.assert_allclose(ins_analyzer.analyze_aligned(big).kps, ARCFACE_112 * 2, atol=1e-4)
    with pytest.raises(FaceAnalysisError, match="square"):
        ins_analyzer.embed_aligned(crop[:100])


def test_insightface_flat_image_has_no_face(ins_analyzer):
    faces = ins_analyzer.detect(np.full((320, 320, 3), 90, np.uint8))
    with pytest.raises(NoFaceError, match="identity 3: no face found"):
        pick_face(faces, "identity 3")


def test_missing_or_incomplete_pack_never_downloads(tmp_path, pack):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(FaceAnalysisError, match=r"model pack 'buffalo_l' not found: .*never downloaded"):
        InsightFaceAnalyzer(_params(pack, root=str(empty), name="buffalo_l").insightface)
    assert list(empty.rglob("*")) == []  # nothing fetched, not even a zip
    partial = build_insightface_pack(tmp_path / "partial", pack.faces, det_size=DET, models=("detection",))
    with pytest.raises(FaceAnalysisError, match="has no landmark_2d_106, recognition model"):
        InsightFaceAnalyzer(_params(partial).insightface)
    with pytest.raises(FaceAnalysisError, match="CPUExecutionProvider"):
        InsightFaceAnalyzer(_params(pack, providers=["NoSuchExecutionProvider"]).insightface)


def test_auto_backend_follows_the_profile(pack):
    auto = _params(pack).model_copy(update={"backend": "auto"})
    assert isinstance(build_face_analyzer(auto, profile="sd15"), InsightFaceAnalyzer)
    assert auto.resolved_backend("tiny") == "dlib"


def test_load_image_keeps_16_bit_grey_and_composites_alpha_like_prepare(tmp_path):
    """Inference and prepare decode the same pixels: 16-bit grey is scaled, not clipped to white;
    transparent pixels become white whatever colour they store."""
    import io

    from PIL import Image

    from components.prepare.decode import decode_image
    from model.face_analysis.images import load_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    grey = load_image(buf.getvalue())
    np.testing.assert_array_equal(grey[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert grey.max() > 200 and grey.min() == 0  # a ramp, not a white picture

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = rgba[..., 2] = 255  # magenta under ...
    rgba[:, 16:, 3] = 255  # ... a transparent left half
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    out = load_image(buf.getvalue())
    assert (out[:, :16] == 255).all() and (out[:, 16:] == [255, 0, 255]).all()
    for data in (buf.getvalue(),):
        np.testing.assert_array_equal(decode_image(data, max_pixels=10_000), out)

"""The synthetic face test-bed: layout, schema, determinism, incremental reruns, geometry, and
how the real dlib detector / landmark predictor / recognizer see the rendered faces."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.cli import main as cli_main
from components.core.config.data import SynthParams
from components.synth.bad_samples import BAD_KINDS
from components.synth.captions import EXPRESSION_PHRASES, caption
from components.synth.dataset import synthesize
from components.synth.face_checks import dlib_model_dir
from components.synth.files import sha256_file
from components.synth.geometry import annotate, build_face, place
from components.synth.identities import EXPRESSIONS, sample_identity, sample_motion

SMALL = SynthParams(identities=4, images_per_identity=6, workers=1)
ANN_KEYS = {"image", "identity", "box", "kps", "landmarks", "landmark_format", "pose", "expression", "attributes"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    summary = synthesize(out, SMALL, progress=False)
    assert summary["written"] == len(_files(out))  # fresh directory: every file written once
    return out


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> tuple[Path, dict]:
    """A larger test-bed (6 people x 14 images: every pose twice) measured with the real dlib tools."""
    out = tmp_path_factory.mktemp("synth-check") / "raw"
    summary = synthesize(out, SynthParams(identities=6, images_per_identity=14, workers=1),
                         progress=False, check_faces=True)
    return out, summary


def test_layout_and_schema(bed: Path):
    ids = sorted(p.name for p in bed.iterdir() if p.is_dir() and p.name.startswith("id_"))
    assert ids == [f"id_{i:04d}" for i in range(4)]
    for name in ids:
        assert sorted(p.name for p in (bed / name).iterdir()) == [f"{j:04d}.png" for j in range(6)]
    anns = _jsonl(bed / "annotations.jsonl")
    caps = _jsonl(bed / "captions.jsonl")
    assert [a["image"] for a in anns] == [c["image"] for c in caps] == [f"{i}/{j:04d}.png" for i in ids for j in range(6)]
    for a, c in zip(anns, caps):
        assert set(a) == ANN_KEYS
        assert a["identity"] == a["image"].split("/")[0]
        assert a["landmark_format"] == "68"
        assert np.asarray(a["landmarks"]).shape == (68, 2) and np.asarray(a["kps"]).shape == (5, 2)
        x0, y0, x1, y1 = a["box"]
        assert 0 <= x0 < x1 < 128 and 0 <= y0 < y1 < 128
        assert set(a["pose"]) == {"yaw", "pitch", "roll"} and abs(a["pose"]["yaw"]) < 40
        assert a["expression"] in EXPRESSIONS
        assert c["caption"].startswith("a photo of a person") and c["caption"].endswith(" background")
        img = Image.open(bed / a["image"])
        assert img.size == (128, 128) and img.mode == "RGB"
    # Expression and pose grid: 6 images already vary both factors.
    assert {a["expression"] for a in anns[:6]} == set(EXPRESSIONS)
    assert len({round(a["pose"]["yaw"] / 10) for a in anns[:6]}) >= 4


def test_bad_samples_are_listed_not_annotated(bed: Path):
    manifest = json.loads((bed / "synth_manifest.json").read_text())
    bad = {b["kind"]: b for b in manifest["bad_samples"]}
    assert sorted(bad) == sorted(BAD_KINDS)
    annotated = {a["image"] for a in _jsonl(bed / "annotations.jsonl")}
    assert not annotated & {b["image"] for b in bad.values()}
    assert (bed / bad["zero_byte"]["image"]).stat().st_size == 0
    with pytest.raises(OSError):
        Image.open(bed / bad["truncated_png"]["image"]).load()
    assert (bed / bad["duplicate"]["image"]).read_bytes() == (bed / bad["duplicate"]["duplicate_of"]).read_bytes()
    for kind in ("no_face", "two_faces", "tiny_face"):
        assert Image.open(bed / bad[kind]["image"]).size == (128, 128)
    # The manifest hashes every file it lists.
    for rel, digest in manifest["files"].items():
        assert sha256_file(bed / rel) == digest


def test_deterministic_serial_and_pool(bed: Path, tmp_path: Path):
    """Same params -> byte-identical files, also when rendered by a process pool."""
    synthesize(tmp_path / "again", SMALL.model_copy(update={"workers": 2}), progress=False)
    assert _files(tmp_path / "again") == _files(bed)


def test_rerun_does_no_work_and_repairs_only_what_changed(tmp_path: Path):
    out = tmp_path / "raw"
    synthesize(out, SMALL, progress=False)
    before = _mtimes(out)
    summary = synthesize(out, SMALL, progress=False)
    assert summary["up_to_date"] and summary["written"] == 0
    assert _mtimes(out) == before
    # A damaged and a deleted image are re-rendered; nothing else is touched.
    (out / "id_0001/0002.png").write_bytes(b"garbage")
    (out / "id_0003/0005.png").unlink()
    summary = synthesize(out, SMALL, progress=False)
    assert summary["written"] == 2 and not summary["up_to_date"]
    after = _mtimes(out)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"id_0001/0002.png", "id_0003/0005.png"}
    fresh = tmp_path / "fresh"
    synthesize(fresh, SMALL, progress=False)
    assert _files(out) == _files(fresh)


def test_smaller_rerun_removes_files_it_wrote_before(tmp_path: Path):
    out = tmp_path / "raw"
    synthesize(out, SMALL, progress=False)
    summary = synthesize(out, SMALL.model_copy(update={"identities": 3, "bad_samples": 2}), progress=False)
    assert summary["removed"] == 6 + 4
    assert not (out / "id_0003").exists()
    assert sorted(p.name for p in (out / "bad_samples").iterdir()) == ["00_truncated_png.png", "01_zero_byte.png"]


def test_refuses_to_write_over_foreign_data(tmp_path: Path):
    from components.core.errors import UserError

    (tmp_path / "photos").mkdir()
    with pytest.raises(UserError, match="photos"):
        synthesize(tmp_path, SMALL, progress=False)


def test_landmarks_geometry_and_yaw_sign(bed: Path):
    for a in _jsonl(bed / "annotations.jsonl"):
        lm, kps = np.asarray(a["landmarks"]), np.asarray(a["kps"])
        x0, y0, x1, y1 = a["box"]
        pts = np.concatenate([lm, kps])
        assert (pts[:, 0] >= x0 - 1e-6).all() and (pts[:, 0] <= x1 + 1e-6).all()
        assert (pts[:, 1] >= y0 - 1e-6).all() and (pts[:, 1] <= y1 + 1e-6).all()
        # kps are the eye centres, nose tip and mouth corners of the 68 points.
        np.testing.assert_allclose(kps[0], lm[36:42].mean(0), atol=0.02)
        np.testing.assert_allclose(kps[1], lm[42:48].mean(0), atol=0.02)
        np.testing.assert_allclose(kps[2:], lm[[30, 48, 54]], atol=1e-9)
        assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]  # image-left before image-right
        assert max(kps[0, 1], kps[1, 1]) < kps[2, 1] < min(kps[3, 1], kps[4, 1])  # eyes, nose, mouth
        assert lm[8, 1] == pytest.approx(lm[0:17, 1].max(), abs=1.5)  # chin is the lowest jaw point
        # Yaw > 0 (turned to the person's left) moves the nose tip to the image right of the eyes.
        iod = np.linalg.norm(kps[1] - kps[0])
        offset = (kps[2, 0] - (kps[0, 0] + kps[1, 0]) / 2) / iod
        yaw = a["pose"]["yaw"]
        if abs(yaw) > 10:
            assert np.sign(offset) == np.sign(yaw), (a["image"], yaw, offset)
        elif abs(yaw) < 4:
            assert abs(offset) < 0.2


def test_geometry_moves_consistently_with_yaw():
    """Same person and expression, yaw swept: the nose tip offset grows monotonically (3-D projection)."""
    idn = sample_identity(0, 0)
    face = build_face(idn, "neutral")
    offsets = []
    for yaw in (-30, -15, 0, 15, 30):
        motion = replace(sample_motion(0, 0, 0), yaw=float(yaw), pitch=0.0, roll=0.0)
        kps = annotate(place(face, motion, 128))["kps"]
        offsets.append(kps[2, 0] - (kps[0, 0] + kps[1, 0]) / 2)
    assert np.all(np.diff(offsets) > 0) and offsets[2] == pytest.approx(0.0, abs=0.05)
    assert offsets[4] == pytest.approx(-offsets[0], rel=1e-6)  # mirror-symmetric face, no roll


def test_caption_names_identity_expression_pose_and_background():
    idn = replace(sample_identity(0, 0), hair_style="short", hair_name="red", glasses="black", beard=None,
                  hat=None)
    motion = replace(sample_motion(0, 0, 1), expression="happy", yaw=1.0, pitch=0.0,
                     background_name="blue")
    assert caption(idn, motion) == (
        "a photo of a person with short red hair and glasses, smiling, facing the camera, on a blue background")
    turned = replace(motion, expression="sad", yaw=30.0)
    bald = replace(idn, hair_style="bald", glasses=None, beard="goatee", hat="green")
    assert caption(bald, turned) == (
        "a photo of a person with a goatee, wearing a green hat, looking sad, head turned to their left, "
        "on a blue background")


def test_identity_factors_constant_within_identity(bed: Path):
    anns = _jsonl(bed / "annotations.jsonl")
    attrs: dict[str, list] = {}
    chroma: dict[str, list] = {}
    for a in anns:
        attrs.setdefault(a["identity"], []).append(json.dumps(a["attributes"], sort_keys=True))
        # Skin chroma on the nose ridge (landmark 29) read from the pixels: shading and exposure
        # scale all channels, so chroma is a per-identity constant.
        img = np.asarray(Image.open(bed / a["image"]).convert("RGB"), dtype=np.float64)
        x, y = np.rint(a["landmarks"][29]).astype(int)
        patch = img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
        chroma.setdefault(a["identity"], []).append(patch[:2] / patch.sum())
    assert all(len(set(v)) == 1 for v in attrs.values())
    assert len({v[0] for v in attrs.values()}) == len(attrs)
    for values in chroma.values():
        v = np.asarray(values)
        assert np.abs(v - np.median(v, axis=0)).max() < 0.03
    # Captions name the same identity factors in every image of a person.
    heads: dict[str, set] = {}
    for a, c in zip(anns, _jsonl(bed / "captions.jsonl")):
        phrase = ", " + EXPRESSION_PHRASES[a["expression"]] + ", "
        assert phrase in c["caption"]
        heads.setdefault(a["identity"], set()).add(c["caption"].split(phrase)[0])
    assert all(len(h) == 1 for h in heads.values()) and len({h.pop() for h in heads.values()}) >= 3


def test_real_dlib_detector_finds_the_faces(checked):
    _, summary = checked
    faces = summary["faces"]
    # Measured on this deterministic set: 0.94 overall, 0.94 for |yaw| < 10, 1.0 for 10-25.
    assert faces["detection_rate"] >= 0.9
    assert faces["by_abs_yaw"]["|yaw|<10"]["rate"] >= 0.9
    assert faces["by_abs_yaw"]["10<=|yaw|<25"]["rate"] >= 0.9
    bad = {b["kind"]: b["faces"] for b in faces["bad_samples"]}
    assert bad == {"truncated_png": None, "zero_byte": None, "no_face": 0, "two_faces": 2, "duplicate": 1,
                   "tiny_face": 0}


def test_real_dlib_recognizer_separates_identities(checked):
    rec = checked[1]["faces"]["recognition"]
    # Measured: same 0.40, different 0.52, 1-NN identification 0.94 over 6 people.
    assert rec["same_identity_mean"] < rec["different_identity_mean"] - 0.08
    assert rec["nn_identification_accuracy"] >= 0.8


def test_annotations_agree_with_dlib_68_point_predictor(checked):
    """Independent check that the exact annotations sit on the rendered pixels."""
    import dlib

    out, _ = checked
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_dir() / "shape_predictor_68_face_landmarks.dat"))
    errors, turned = [], []
    for a in _jsonl(out / "annotations.jsonl"):
        img = np.asarray(Image.open(out / a["image"]).convert("RGB"))
        dets = detector(img, 1)
        if not dets:
            continue
        pred = np.array([[p.x, p.y] for p in predictor(img, dets[0]).parts()], dtype=np.float64)
        gt = np.asarray(a["landmarks"])
        iod = np.linalg.norm(gt[36:42].mean(0) - gt[42:48].mean(0))
        if abs(a["pose"]["yaw"]) < 20:
            errors.append(np.linalg.norm(pred - gt, axis=1) / iod)
        elif abs(a["pose"]["yaw"]) > 25:  # dlib's own nose tip moves the documented way
            turned.append(np.sign(pred[30, 0] - pred[36:48, 0].mean()) == np.sign(a["pose"]["yaw"]))
    err = np.asarray(errors)  # [N, 68], normalised by the inter-ocular distance
    assert len(err) >= 40
    assert err[:, 36:48].mean() < 0.1  # eyes (measured 0.08)
    assert err[:, 17:68].mean() < 0.16  # brows, nose, eyes, mouth (measured 0.13)
    assert err[:, 0:17].mean() < 0.3  # jaw outline (measured 0.23)
    assert np.mean(turned) >= 0.8  # measured 0.95


def test_cli(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: embedded defaults + overrides
    monkeypatch.delenv("DYNAMICID_PARAMS", raising=False)
    argv = ["-S", "synth.identities=2", "-S", "synth.images_per_identity=3", "-S", "synth.bad_samples=1",
            "synth", "--out", "tb", "--no-progress"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 6 and summary["written"] == 6 + 1 + 3
    assert len(_jsonl(tmp_path / "tb" / "annotations.jsonl")) == 6
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    # Default output directory is data.raw.
    assert cli_main(["-S", "synth.identities=2", "-S", "synth.images_per_identity=2", "synth", "--no-progress"]) == 0
    assert (tmp_path / "data" / "raw" / "annotations.jsonl").is_file()
    capsys.readouterr()
    assert cli_main(["synth", "--out", "s3://bucket/raw", "--no-progress"]) == 2
    assert "local directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["synth", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "annotations.jsonl" in text and "--out" in text and "--check-faces" in text

"""``dynamicid prepare`` end to end on the synthetic test-bed plus real photos, with the real dlib
models (and the code-built insightface pack): every shard column against values recomputed here,
each reject reason, no-op reruns, resume after SIGKILL, S3 input from a local S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.cli import main as cli_main
from components.core.config import params_from_dict
from components.core.config.data import SynthParams
from components.core.errors import UserError
from components.core.shards import PreparedData
from components.prepare.assemble import assign_splits
from components.prepare.geometry import face_crop_box
from components.prepare.results import item_key
from components.prepare.stage import prepare, summary_line
from components.synth.dataset import synthesize

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("manifest.json", "index.parquet", "shards/part-00000.parquet", "rejects.jsonl", "data_report.json",
                "histograms.png")
BAD_REASONS = {  # synth's deliberately bad files -> prepare's reasons (tiny face: dlib finds nothing at 6 px)
    "bad_samples/00_truncated_png.png": "unreadable", "bad_samples/01_zero_byte.png": "empty_file",
    "bad_samples/02_no_face.png": "no_face", "bad_samples/03_two_faces.png": "multiple_faces",
    "bad_samples/04_duplicate.png": "duplicate", "bad_samples/05_tiny_face.png": "no_face",
    "people/t1.jpg": "multiple_faces",
}


def _params(cache: Path, **prepare):
    return params_from_dict({"storage": {"cache_dir": str(cache)},
                             "prepare": {"workers": 1, "shard_size": 512, **prepare}})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def raw(tmp_path_factory, group_photo, single_face_photo) -> Path:
    """6 synthetic people x 6 images + synth's 6 bad files + the group photo and Tom Hanks (no annotations)."""
    root = tmp_path_factory.mktemp("prep") / "raw"
    synthesize(root, SynthParams(identities=6, images_per_identity=6, workers=1), progress=False)
    (root / "people").mkdir()
    shutil.copy(group_photo, root / "people" / "t1.jpg")
    (root / "hanks").mkdir()
    shutil.copy(single_face_photo, root / "hanks" / single_face_photo.name)
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> tuple[Path, dict, object]:
    base = tmp_path_factory.mktemp("prepared")
    params = _params(base / "cache", detection_check=12)
    summary = prepare(raw, base / "out", params, progress=False)
    return base / "out", summary, params


@pytest.fixture(scope="module")
def dlib_analyzer():
    from model.face_analysis.backends import DlibFaceAnalyzer

    return DlibFaceAnalyzer()


def test_summary_counts_and_rejects(prepared, raw):
    out, summary, _ = prepared
    assert summary["images"] == 6 * 6 + 6 + 2
    assert summary["analysed"] == 44 and summary["cached"] == 0 and not summary["up_to_date"]
    rejects = {r["image"]: r for r in _jsonl(out / "rejects.jsonl")}
    assert {k: v["reason"] for k, v in rejects.items()} == BAD_REASONS
    assert rejects["people/t1.jpg"]["detail"].endswith("expected exactly one face, found 6")
    assert rejects["bad_samples/04_duplicate.png"]["detail"] == "same bytes as id_0000/0000.png"  # annotated copy kept
    assert "truncated" in rejects["bad_samples/00_truncated_png.png"]["detail"]
    assert summary["accepted"] == 37 and summary["rejected"] == 7
    line = summary_line(summary)
    assert line.startswith("prepare: 44 images -> 37 samples of 7 identities") and "multiple_faces 2" in line


def test_annotated_sample_columns_match_independent_computation(prepared, raw, dlib_analyzer):
    from model.face_analysis.geometry import align_face
    from model.face_analysis.images import load_image
    from model.landmarks import render_landmarks
    from model.motion import face_prompt
    from model.pipeline import face_crop_box as pipeline_crop_box

    out, _, _ = prepared
    data = PreparedData(out)
    anns = {a["image"]: a for a in _jsonl(raw / "annotations.jsonl")}
    caps = {c["image"]: c["caption"] for c in _jsonl(raw / "captions.jsonl")}
    pos = {r["image"]: i for i, r in enumerate(data.index)}
    for name in ("id_0002/0003.png", "id_0004/0001.png"):
        s, a = data.sample(pos[name]), anns[name]
        img = load_image(raw / name)  # [128, 128, 3]
        assert s.key == hashlib.sha256((raw / name).read_bytes()).hexdigest()
        assert (s.identity, s.caption) == (name.split("/")[0], caps[name])
        # Square 128 px photo: the training image is the whole photo, bicubic to 64.
        np.testing.assert_array_equal(s.pixels, np.asarray(Image.fromarray(img).resize((64, 64), Image.BICUBIC)))
        x0, y0, x1, y1 = a["box"]
        np.testing.assert_allclose(s.face_box, np.array([y0, x0, y1, x1]) / 128, atol=1e-6)
        # The CLIP crop and landmark frame are inference's (model.pipeline.face_crop_box).
        left, top, right, bottom = pipeline_crop_box(np.array(a["box"]), (128, 128))
        crop = np.asarray(Image.fromarray(img[top:bottom, left:right]).resize((64, 64), Image.BICUBIC))
        np.testing.assert_array_equal(s.face_crop, crop)
        pts = np.asarray(a["landmarks"], np.float32) - np.array([left, top], np.float32)
        np.testing.assert_allclose(s.landmarks, pts / (right - left), atol=1e-6)
        lmk = (render_landmarks(pts, (bottom - top, right - left), size=96)[0] * 255).astype(np.uint8)
        np.testing.assert_array_equal(s.landmark_image, lmk)
        # Identity: the recogniser on the ArcFace crop aligned from the annotated keypoints.
        emb = dlib_analyzer.embed_aligned(align_face(img, np.asarray(a["kps"]), 150))
        np.testing.assert_allclose(s.embedding, emb, atol=1e-6)
        assert (s.yaw, s.pitch, s.roll) == pytest.approx((a["pose"]["yaw"], a["pose"]["pitch"], a["pose"]["roll"]),
                                                         abs=1e-4)
        assert s.expression == a["expression"]
        assert s.face_prompt == face_prompt(a["expression"], s.yaw, s.pitch)


def test_detected_real_photo_goes_end_to_end(prepared, raw, dlib_analyzer):
    from model.face_analysis.face import pick_face
    from model.face_analysis.images import load_image
    from model.motion import estimate_expression, face_prompt

    out, _, _ = prepared
    data = PreparedData(out)
    (i,) = [k for k, r in enumerate(data.index) if r["identity"] == "hanks"]
    s = data.sample(i)
    img = load_image(raw / s.image)  # 112 x 112 aligned face photo
    face = pick_face(dlib_analyzer.detect(img), "hanks", one_face=True, min_size=24)
    np.testing.assert_allclose(s.embedding, face.embedding, atol=1e-6)
    assert s.caption == "a photo of a person"  # not in captions.jsonl
    assert (s.yaw, s.pitch, s.roll) == pytest.approx(face.pose, abs=1e-3)
    assert s.expression == estimate_expression(face.landmarks)
    assert s.face_prompt == face_prompt(s.expression, s.yaw, s.pitch)
    x0, y0, x1, y1 = face.bbox
    np.testing.assert_allclose(s.face_box, np.clip(np.array([y0, x0, y1, x1]) / 112, 0, 1), atol=1e-4)


def test_splits_are_by_identity_and_manifest(prepared):
    out, _, params = prepared
    data = PreparedData(out)
    split_of: dict[str, set[str]] = {}
    for r in data.index:
        split_of.setdefault(r["identity"], set()).add(r["split"])
    assert all(len(v) == 1 for v in split_of.values())
    test_ids = sorted(i for i, v in split_of.items() if v == {"test"})
    assert len(test_ids) == 1  # round(0.125 * 7 identities)
    assert test_ids == sorted(i for i, sp in assign_splits(sorted(split_of), 0.125, 0.0, 0).items() if sp == "test")
    m = data.manifest
    assert (m["embedding_dim"], m["landmark_count"], m["landmark_format"], m["face_backend"]) == (128, 68, "ibug68", "dlib")
    assert (m["image_size"], m["crop_size"], m["landmark_size"]) == (64, 64, 96)  # from the tiny profile


def test_assign_splits_fractions_and_stability():
    names = [f"p{i:03d}" for i in range(200)]
    sp = assign_splits(names, 0.1, 0.05, seed=3)
    c = Counter(sp.values())
    assert (c["test"], c["val"], c["train"]) == (20, 10, 170)
    assert assign_splits(list(reversed(names)), 0.1, 0.05, seed=3) == sp  # order-free
    assert assign_splits(names, 0.1, 0.05, seed=4) != sp
    assert set(assign_splits(["a", "b"], 0.5, 0.5, 0).values()) == {"test", "train"}  # train never emptied
    assert assign_splits(["a"], 0.5, 0.0, 0) == {"a": "train"}


def test_report_histograms_and_detection_rate(prepared, raw, dlib_analyzer):
    from model.face_analysis.images import load_image

    out, summary, _ = prepared
    report = json.loads((out / "data_report.json").read_text())
    rows = PreparedData(out).index
    assert report["counts"]["accepted"] == len(rows) == 37
    assert report["rejects"] == dict(Counter(BAD_REASONS.values()))
    for axis in ("yaw", "pitch", "roll"):
        h = report["pose"][axis]
        edges = np.asarray(h["edges_deg"], float)
        vals = np.clip([r[axis] for r in rows], edges[0], edges[-1])
        assert h["counts"] == np.histogram(vals, edges)[0].tolist()
    assert report["expression"] == dict(Counter(r["expression"] for r in rows))
    assert report["splits"]["test"]["identities"] == 1 and report["splits"]["train"]["identities"] == 6
    assert report["provenance"]["source"] == {"annotation": 36, "detection": 1}
    # dlib detection rate on the annotated test-bed: the 12 checked images (annotated, first by
    # sha256 of their path), recomputed here.
    check = report["detection_check"]
    anns = sorted(_jsonl(raw / "annotations.jsonl"), key=lambda a: hashlib.sha256(a["image"].encode()).hexdigest())
    hits = 0
    for a in anns[:12]:
        x0, y0, x1, y1 = a["box"]
        faces = dlib_analyzer.detect(load_image(raw / a["image"]))
        hits += any(x0 <= (f.bbox[0] + f.bbox[2]) / 2 <= x1 and y0 <= (f.bbox[1] + f.bbox[3]) / 2 <= y1 for f in faces)
    assert (check["backend"], check["images"], check["detected"]) == ("dlib", 12, hits)
    assert check["detection_rate"] == pytest.approx(hits / 12, abs=1e-4) and hits >= 8
    assert sum(v["images"] for v in check["by_abs_yaw"].values()) == 12
    with Image.open(out / "histograms.png") as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_rerun_does_no_work_and_changes_nothing(prepared, raw, monkeypatch):
    import model.face_analysis.backends
    from components.prepare.source import LocalSource

    out, _, params = prepared
    before = {f: ((out / f).stat().st_mtime_ns, (out / f).read_bytes()) for f in OUTPUT_FILES}

    def forbidden(*a, **k):
        raise AssertionError("a rerun must not load models or read images")

    monkeypatch.setattr(model.face_analysis.backends, "build_face_analyzer", forbidden)
    monkeypatch.setattr(LocalSource, "read", forbidden)
    again = prepare(raw, out, params, progress=False)
    assert (again["analysed"], again["cached"], again["up_to_date"]) == (0, 44, True)
    assert {f: ((out / f).stat().st_mtime_ns, (out / f).read_bytes()) for f in OUTPUT_FILES} == before


def test_content_addressing_reanalyses_only_changed_bytes(prepared, raw, tmp_path):
    out, _, params = prepared
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    target = copy / "id_0003" / "0002.png"
    with Image.open(target) as im:
        im.save(target, compress_level=9)  # same pixels, different bytes
    summary = prepare(copy, tmp_path / "out", params, progress=False)
    assert summary["analysed"] == 1 and summary["accepted"] == 37  # 43 files found cached by content
    a, b = PreparedData(out), PreparedData(tmp_path / "out")
    changed = [i for i, (ra, rb) in enumerate(zip(a.index, b.index)) if ra["key"] != rb["key"]]
    assert [a.index[i]["image"] for i in changed] == ["id_0003/0002.png"]
    np.testing.assert_array_equal(a.sample(changed[0]).pixels, b.sample(changed[0]).pixels)


def test_resume_after_sigkill_matches_uninterrupted_run(prepared, raw, tmp_path):
    _, _, params = prepared
    # Reference: same input, uninterrupted (its results are all in the fixture's cache already).
    ref = tmp_path / "ref"
    prepare(raw, ref, params.model_copy(update={"prepare": params.prepare.model_copy(
        update={"detection_check": 0})}), progress=False)
    work, out = tmp_path / "work", tmp_path / "out"
    sets = {"storage.cache_dir": str(tmp_path / "cache"), "prepare.work_dir": str(work), "prepare.detection_check": 0}
    cmd = [sys.executable, "-m", "components.cli", *[a for k, v in sets.items() for a in ("-S", f"{k}={v}")],
           "prepare", "--input", str(raw), "--output", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while len(list(work.glob("items/*/*.json"))) < 10:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "prepare made no progress"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: CLI process and its pool workers
        proc.wait()
    time.sleep(0.5)
    done = len(list(work.glob("items/*/*.json")))
    assert 10 <= done < 44 and not (out / "manifest.json").exists()  # killed midway
    resumed = prepare(raw, out, params.model_copy(update={"prepare": params.prepare.model_copy(
        update={"work_dir": str(work), "detection_check": 0})}), progress=False)
    assert resumed["analysed"] == 44 - done  # nothing finished before the kill is redone
    for f in OUTPUT_FILES:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def test_every_other_reject_reason(raw, tmp_path, single_face_photo, dlib_analyzer):
    odd = tmp_path / "odd"
    (odd / "anno").mkdir(parents=True)
    anns = {a["image"]: a for a in _jsonl(raw / "annotations.jsonl")}
    lines = []
    for j, (name, edit) in enumerate((
        ("small.png", {"box": [40, 40, 60, 58]}),  # a 20 x 18 px face
        ("bad.png", {"kps": anns["id_0001/0001.png"]["kps"][:4]}),
        ("flat.png", {"box": [10, 10, 120, 120], "landmarks": [[60.0, 60.0]] * 68}),  # degenerate landmarks
    )):
        src = f"id_0001/{j:04d}.png"
        shutil.copy(raw / src, odd / "anno" / name)
        rec = {**anns[src], "image": f"anno/{name}", **edit}
        if name == "flat.png":  # no pose / expression given: the rules must run on the landmarks, and fail
            del rec["pose"], rec["expression"]
        lines.append(json.dumps(rec))
    (odd / "annotations.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
    shutil.copy(single_face_photo, odd / "loose.png")  # no identity folder
    (odd / "link").mkdir()
    outside = tmp_path / "outside.png"
    shutil.copy(single_face_photo, outside)
    (odd / "link" / "out.png").symlink_to(outside)  # points out of the input root
    (odd / "link" / "gone.png").symlink_to(odd / "link" / "missing.png")  # dangling: read error
    (odd / "huge").mkdir()
    (odd / "huge" / "x.jpg").write_bytes(b"\xff\xd8" + b"0" * 300_000)
    (odd / "huge" / "notes.txt").write_text("ignored")
    params = _params(tmp_path / "cache", max_file_mb=0.2)
    with pytest.raises(UserError, match="no image .* was accepted"):
        prepare(odd, tmp_path / "out", params, progress=False)
    rejects = {r["image"]: (r["reason"], r["detail"]) for r in _jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert {k: v[0] for k, v in rejects.items()} == {
        "anno/bad.png": "invalid_annotation", "anno/flat.png": "analysis_failed", "anno/small.png": "face_too_small",
        "loose.png": "no_identity", "link/out.png": "unsafe_path", "link/gone.png": "read_error",
        "huge/x.jpg": "too_large",
    }
    assert rejects["anno/bad.png"][1].startswith("kps: ")
    assert "below face.min_face_size 24" in rejects["anno/small.png"][1]
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["side_files"]["annotations.jsonl"]["bad_lines"] == 1
    assert report["counts"]["ignored_files"] == 1  # notes.txt
    # Detection path below the minimum size: Tom Hanks' face with face.min_face_size above it.
    face = dlib_analyzer.detect(np.asarray(Image.open(single_face_photo).convert("RGB")))[0]
    big = params_from_dict({"storage": {"cache_dir": str(tmp_path / "cache")}, "prepare": {"workers": 1},
                            "face": {"min_face_size": int(min(face.width, face.height)) + 1}})
    only = tmp_path / "only"
    (only / "hanks").mkdir(parents=True)
    shutil.copy(single_face_photo, only / "hanks" / "a.png")
    with pytest.raises(UserError):
        prepare(only, tmp_path / "out2", big, progress=False)
    (rej,) = _jsonl(tmp_path / "out2" / "rejects.jsonl")
    assert rej["reason"] == "face_too_small" and "the largest found is" in rej["detail"]


def test_one_face_off_keeps_the_largest_face(tmp_path, group_photo, dlib_analyzer):
    from model.face_analysis.images import load_image

    root = tmp_path / "raw" / "crowd"
    root.mkdir(parents=True)
    with Image.open(group_photo) as im:  # the group photo at half size (640 x 443): 4x faster to scan
        im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(root / "t1.png")
    params = _params(tmp_path / "cache", one_face=False)
    summary = prepare(root.parent, tmp_path / "out", params, progress=False)
    assert summary["accepted"] == 1
    s = PreparedData(tmp_path / "out").sample(0)
    faces = dlib_analyzer.detect(load_image(root / "t1.png"))
    assert len(faces) == 6
    np.testing.assert_allclose(s.embedding, faces[0].embedding, atol=1e-6)  # the largest
    # A 640 x 443 photo: the training image is the 443 px square as centred on the face as fits.
    left = int(round(min(max((faces[0].bbox[0] + faces[0].bbox[2]) / 2 - 443 / 2, 0), 640 - 443)))
    x0, y0, x1, y1 = faces[0].bbox
    np.testing.assert_allclose(s.face_box, np.clip([y0 / 443, (x0 - left) / 443, y1 / 443, (x1 - left) / 443], 0, 1),
                               atol=1e-5)
    img = load_image(root / "t1.png")
    expected = np.asarray(Image.fromarray(img[:, left:left + 443]).resize((64, 64), Image.BICUBIC))
    np.testing.assert_array_equal(s.pixels, expected)


def test_s3_input_from_a_local_s3_server(prepared, raw, tmp_path, monkeypatch):
    from components.prepare.source import S3Source
    from tests.services import S3_ENV, moto_s3

    out_local, _, _ = prepared
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto_s3("faces") as s3:
        client = s3.client()
        files = ["annotations.jsonl", "captions.jsonl", "bad_samples/01_zero_byte.png",
                 *[f"id_0000/{j:04d}.png" for j in range(6)]]
        for f in files:
            client.put_object(Bucket="faces", Key=f"raw/{f}", Body=(raw / f).read_bytes())
        client.put_object(Bucket="faces", Key="raw/../escape.png", Body=(raw / "id_0001/0000.png").read_bytes())
        client.put_object(Bucket="faces", Key="raw/loose.png", Body=(raw / "id_0001/0001.png").read_bytes())
        params = params_from_dict({"storage": {"cache_dir": str(tmp_path / "cache"), "endpoint_url": s3.endpoint},
                                   "prepare": {"workers": 1}})
        summary = prepare("s3://faces/raw", tmp_path / "out", params, progress=False)
        assert (summary["accepted"], summary["analysed"]) == (6, 7)  # listed-only rejects are never read
        rejects = {r["image"]: r["reason"] for r in _jsonl(tmp_path / "out" / "rejects.jsonl")}
        assert rejects == {"../escape.png": "unsafe_path", "loose.png": "no_identity",
                           "bad_samples/01_zero_byte.png": "empty_file"}
        # Same bytes, same settings: the rows equal those prepared from the local directory.
        local = {r["image"]: i for i, r in enumerate(PreparedData(out_local).index)}
        remote = PreparedData(tmp_path / "out")
        for i, r in enumerate(remote.index):
            a, b = remote.sample(i), PreparedData(out_local).sample(local[r["image"]])
            assert (a.key, a.caption, a.expression) == (b.key, b.caption, b.expression)
            np.testing.assert_array_equal(a.embedding, b.embedding)
            np.testing.assert_array_equal(a.face_crop, b.face_crop)
        # Rerun, endpoint from AWS_ENDPOINT_URL only: listed again, but not one object downloaded.
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
        monkeypatch.setattr(S3Source, "read", lambda self, key: pytest.fail(f"downloaded {key}"))
        env_params = params_from_dict({"storage": {"cache_dir": str(tmp_path / "cache")}, "prepare": {"workers": 1}})
        again = prepare("s3://faces/raw", tmp_path / "out", env_params, progress=False)
        assert (again["analysed"], again["up_to_date"]) == (0, True)


def test_insightface_backend_runs_face_analysis_in_prepare(raw, tmp_path):
    import cv2

    from model.face_analysis.geometry import align_face, arcface_template
    from tests.fixtures.insightface_pack import PackFace, build_insightface_pack

    # One fixture face, in detector-input pixels = image pixels (128 px images, det_size 128).
    box = (32.0, 26.0, 96.0, 106.0)
    kps = arcface_template(112) * (64 / 112) + np.array([32.0, 30.0])
    pack = build_insightface_pack(tmp_path / "pack", (PackFace(bbox=box, kps=kps, score=0.9),), det_size=128)
    root = tmp_path / "raw"
    (root / "p1").mkdir(parents=True)
    (root / "p2").mkdir()
    for j in range(2):
        shutil.copy(raw / "id_0000" / f"{j:04d}.png", root / "p1" / f"{j}.png")
    shutil.copy(raw / "id_0001" / "0000.png", root / "p2" / "annotated.png")
    Image.new("RGB", (128, 128), (90, 90, 90)).save(root / "p2" / "flat.png")  # no contrast: no face
    ann = next(a for a in _jsonl(raw / "annotations.jsonl") if a["image"] == "id_0001/0000.png")
    (root / "annotations.jsonl").write_text(json.dumps({**ann, "image": "p2/annotated.png"}) + "\n")
    params = params_from_dict({
        "storage": {"cache_dir": str(tmp_path / "cache")}, "prepare": {"workers": 1},
        "face": {"backend": "insightface", "insightface": {"root": str(pack.root), "name": pack.name,
                                                           "det_size": 128, "providers": ["CPUExecutionProvider"]}},
    })
    summary = prepare(root, tmp_path / "out", params, progress=False)
    assert summary["accepted"] == 3 and summary["rejects"] == {"no_face": 1}
    data = PreparedData(tmp_path / "out")
    assert (data.manifest["embedding_dim"], data.manifest["landmark_format"]) == (512, "2d106")

    def expected_embedding(crop: np.ndarray) -> np.ndarray:
        """The fixture recogniser by hand: (x - 127.5) / 127.5, 8x8 mean pool, C-H-W flatten, projection."""
        x = (crop.astype(np.float64) - 127.5) / 127.5
        e = x.transpose(2, 0, 1).reshape(3, 14, 8, 14, 8).mean(axis=(2, 4)).reshape(-1) @ pack.projection
        return e / np.linalg.norm(e)

    for i, r in enumerate(data.index):
        s = data.sample(i)
        img = np.asarray(Image.open(root / s.image).convert("RGB"))
        left, top, right, bottom = face_crop_box(np.array(box if "annotated" not in s.image else ann["box"]), (128, 128))
        pts = s.landmarks * (right - left) + np.array([left, top])  # back to photo pixels
        if "annotated" in s.image:  # 68 annotated points != 106: the pack's 2d106 on the aligned crop
            emb = expected_embedding(align_face(img, np.asarray(ann["kps"]), 112))
            tm = cv2.estimateAffinePartial2D(np.asarray(ann["kps"]), arcface_template(112), method=cv2.LMEDS)[0]
            crop_pts = 56 + 0.75 * 112 * pack.landmarks  # 2d106 of the whole 112 px crop
            inv = cv2.invertAffineTransform(tm)
            expected_pts = crop_pts @ inv[:, :2].T + inv[:, 2]
            np.testing.assert_allclose(s.embedding, emb, atol=1e-5)
            np.testing.assert_allclose(pts, expected_pts, atol=0.05)
        else:
            emb = expected_embedding(align_face(img, kps, 112))
            np.testing.assert_allclose(s.embedding, emb, atol=5e-3)
            expected_pts = np.array([64.0, 66.0]) + 0.75 * 80 * pack.landmarks
            np.testing.assert_allclose(pts, expected_pts, atol=1e-2)
            np.testing.assert_allclose(s.face_box, np.array([26, 32, 106, 96]) / 128, atol=1e-5)
        assert s.landmarks.shape == (106, 2)


def test_face_crop_box_is_inferences(tmp_path):
    from model.pipeline import face_crop_box as pipeline_crop_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(40, 900, 2)
        x0, y0 = rng.uniform(-20, w), rng.uniform(-20, h)
        box = np.array([x0, y0, x0 + rng.uniform(5, 400), y0 + rng.uniform(5, 400)])
        assert face_crop_box(box, (h, w)) == pipeline_crop_box(box, (h, w))


def test_cli_help_errors_and_item_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["prepare", "--help"])
    assert exc.value.code == 0 and "--input ROOT" in capsys.readouterr().out
    assert cli_main(["-S", f"storage.cache_dir={tmp_path}", "prepare", "--input", str(tmp_path / "nope"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "in" / "a").mkdir(parents=True)
    assert cli_main(["-S", f"storage.cache_dir={tmp_path}", "prepare", "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "in" / "out")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert cli_main(["-S", f"storage.cache_dir={tmp_path}", "prepare", "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "o")]) == 2
    assert "no images under" in capsys.readouterr().err
    assert cli_main(["prepare", "--input", str(tmp_path / "in"), "--output", "s3://bucket/prepared"]) == 2
    assert "writes a local directory" in capsys.readouterr().err
    # The result key changes with any of its three parts.
    keys = {item_key(s, p, a) for s in ("s1", "s2") for p in ("p1", "p2") for a in ("", "a1")}
    assert len(keys) == 8

"""Landmark editing a user can call (issue 15, item 3): a driving photo or landmark coordinates as a
person's target motion, on real face photos with the real dlib analyzer and the tiny model.

The rendered target must be exactly the picture ``dynamicid prepare`` stores for a training sample
of that face (components.prepare.geometry.sample_outputs): the keypoint encoder never sees a
landmark image drawn any other way. Over HTTP both inputs reach the IMR and change the image,
and bad ones are 400s that name the field.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.core.config import params_from_dict
from model.face_analysis.backends import DlibFaceAnalyzer
from model.loading import load_pipeline
from model.pipeline import GenerationError, IdentityInput, face_crop_box
from serving.errors import ServingError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def analyzer() -> DlibFaceAnalyzer:
    return DlibFaceAnalyzer()


@pytest.fixture(scope="module")
def ckpt(init_ckpt):
    return init_ckpt


@pytest.fixture(scope="module")
def pipe(tiny_params, ckpt):
    p = load_pipeline(tiny_params.model, tiny_params.face, ckpt, tiny_params.storage.cache_dir)
    p.set_progress(False)
    return p


@pytest.fixture(scope="module")
def people(group_photo, analyzer) -> list[np.ndarray]:
    """Crops of three people of the group photo, each a real face with its own head pose."""
    img = np.asarray(Image.open(group_photo).convert("RGB"))
    crops = []
    for f in analyzer.detect(img)[:3]:
        left, top, right, bottom = face_crop_box(f.bbox, img.shape[:2], margin=0.6)
        crops.append(np.ascontiguousarray(img[top:bottom, left:right]))
    return crops


@pytest.fixture(scope="module")
def hanks(single_face_photo) -> np.ndarray:
    return np.asarray(Image.open(single_face_photo).convert("RGB"))


def training_landmark_image(photo: np.ndarray, analyzer: DlibFaceAnalyzer, size: int) -> np.ndarray:
    """[size, size] float: the landmark image ``dynamicid prepare`` would store for this photo's face."""
    from components.core.shards import decode_png
    from components.prepare.geometry import sample_outputs

    face = analyzer.detect(photo)[0]
    blobs, _ = sample_outputs(photo, face.bbox, face.landmarks, image_size=64, crop_size=64, landmark_size=size)
    return decode_png(blobs["landmark_image"]).astype(np.float32) / 255.0


def encode(pipe, *identities: IdentityInput):
    return pipe.encode_identities(list(identities))


# ------------------------------------------------------------------------------------ rendering
def test_driving_photo_renders_its_detected_landmarks_as_training_did(pipe, analyzer, people, hanks):
    size = pipe.dims.imr["landmark_size"]
    ref, driver = people[0], people[1]
    enc = encode(pipe, IdentityInput(image=ref, driving_image=driver),
                 IdentityInput(image=hanks, driving_image=Image.fromarray(people[2])))  # PIL works too
    for target, photo in zip(enc.target_landmarks, (driver, people[2])):
        assert target is not None and target.shape == (1, size, size)
        want = training_landmark_image(photo, analyzer, size)
        assert want.sum() > 30  # a real face: many dots
        np.testing.assert_array_equal(target[0].numpy(), want)
    assert [r.edited for r in enc.results] == [True, True]
    # the reference's own source image is drawn the same way
    np.testing.assert_array_equal(enc.source_landmarks[0][0].numpy(), training_landmark_image(ref, analyzer, size))


def test_coordinates_render_like_the_driving_photo_they_came_from(pipe, analyzer, people):
    ref = people[0]
    points = analyzer.detect(ref)[0].landmarks                        # [68, 2] pixels of ref
    enc = encode(pipe, IdentityInput(image=ref, driving_image=ref), IdentityInput(image=ref, landmarks=points),
                 IdentityInput(image=ref, landmarks=points.tolist()))  # plain JSON-like lists work too
    by_photo, by_array, by_list = enc.target_landmarks
    assert torch.equal(by_photo, by_array) and torch.equal(by_photo, by_list)
    assert torch.equal(by_array, enc.source_landmarks[1])             # unedited landmarks = no motion change


def test_moved_coordinates_move_only_those_dots(pipe, analyzer, people):
    ref = people[0]
    points = analyzer.detect(ref)[0].landmarks.copy()
    opened = points.copy()
    opened[57:60, 1] += 12.0                                          # lower lip (iBUG 57-59) down: mouth opens
    enc = encode(pipe, IdentityInput(image=ref, landmarks=opened))
    target, source = enc.target_landmarks[0][0].numpy(), enc.source_landmarks[0][0].numpy()
    changed = np.argwhere(target != source)                           # [K, 2] (row, col)
    assert len(changed) > 0
    size = target.shape[-1]
    _, top, _, bottom = face_crop_box(analyzer.detect(ref)[0].bbox, ref.shape[:2])
    lip_rows = (points[57:60, 1] - top) * size / (bottom - top)
    assert changed[:, 0].min() >= lip_rows.min() - 3                   # nothing above the lower lip moved


def test_driving_photo_of_another_pose_gives_another_target(pipe, analyzer, people):
    ref, driver = people[0], people[2]
    ref_pose, drv_pose = analyzer.detect(ref)[0].pose, analyzer.detect(driver)[0].pose
    assert abs(ref_pose[0] - drv_pose[0]) > 20 or abs(ref_pose[2] - drv_pose[2]) > 20  # really another pose
    own = analyzer.detect(ref)[0].landmarks
    enc = encode(pipe, IdentityInput(image=ref, driving_image=driver), IdentityInput(image=ref, landmarks=own))
    driven, kept = enc.target_landmarks
    assert not torch.equal(driven, kept)
    assert (driven != kept).float().mean() > 0.01                     # not a stray pixel


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("make, match", [
    (lambda p, pts: [IdentityInput(image=p, driving_image=np.full((96, 96, 3), 200, np.uint8))],
     r"^identity 0: driving_image: no face found$"),
    (lambda p, pts: [IdentityInput(image=p), IdentityInput(image=p, driving_image=np.zeros((200, 200, 3), np.uint8))],
     r"^identity 1: driving_image: no face found$"),
    (lambda p, pts: [IdentityInput(image=p, landmarks=pts[:5])],
     r"^identity 0: landmarks: expected 68 points in the iBUG 300-W 68-point order \(dlib\), got 5$"),
    (lambda p, pts: [IdentityInput(image=p, landmarks=np.zeros((68, 3)))], r"identity 0: landmarks: expected 68 \[x, y\]"),
    (lambda p, pts: [IdentityInput(image=p, landmarks=np.where(np.arange(68)[:, None] == 3, np.nan, pts))],
     "identity 0: landmarks: coordinates must be finite"),
    (lambda p, pts: [IdentityInput(image=p, landmarks=pts / p.shape[0])], "look normalised to \\[0, 1\\]; give pixels"),
    (lambda p, pts: [IdentityInput(image=p, landmarks=pts, driving_image=p)],
     "identity 0: give at most one landmark target, got driving_image and landmarks"),
    (lambda p, pts: [IdentityInput(embedding=np.ones(128, np.float32) / 128 ** 0.5, clip_features=torch.zeros(2, 8),
                                   landmarks=pts)], "identity 0: landmarks: they are pixels of the reference image"),
])
def test_bad_targets_are_value_errors_naming_the_identity(pipe, analyzer, people, make, match):
    ref = people[0]
    with pytest.raises(ValueError, match=match) as err:
        pipe("a photo of a person", make(ref, analyzer.detect(ref)[0].landmarks), num_inference_steps=1, seed=0)
    assert isinstance(err.value, GenerationError)


# ------------------------------------------------------------------------------------ endpoint
@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def server(tiny_params, ckpt, loop):
    """The KServe predictor in-process, loaded like ``dynamicid serve`` does (tiny profile)."""
    from prometheus_client import CollectorRegistry

    from serving.metrics import ServingMetrics
    from serving.predictor import DynamicIDModel

    params = params_from_dict({"storage": {"cache_dir": str(tiny_params.storage.cache_dir)},
                               "serve": {"default_steps": 2, "cpu_threads": 1, "batch_window_ms": 10}})
    m = DynamicIDModel(params, model_uri=str(ckpt), metrics=ServingMetrics("dynamicid", 4, registry=CollectorRegistry()))
    loop.run_until_complete(m.start_engine())
    yield m
    loop.run_until_complete(m.batcher.close())
    m.stop_engine()


def b64_png(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def v1(server, loop, ref: str, **target) -> dict:
    inst = {"prompt": "a photo of a person", "identities": [{"image": ref, **target}], "seed": 4,
            "num_inference_steps": 2}
    return loop.run_until_complete(server.predict({"instances": [inst]}))["predictions"][0]


def v2(server, loop, ref: str, **target) -> dict:
    from kserve import InferInput, InferRequest

    from serving.client import v2_request

    inst = {"prompt": "a photo of a person", "identities": [{"image": ref, **target}], "seed": 4,
            "num_inference_steps": 2}
    inputs = [InferInput(name=t["name"], datatype=t["datatype"], shape=t["shape"], data=t["data"])
              for t in v2_request(inst)["inputs"]]
    out = loop.run_until_complete(server.predict(InferRequest(model_name="dynamicid", infer_inputs=inputs)))
    by_name = {o.name: o.data[0] for o in out.outputs}
    return {"image": by_name["image"], **json.loads(by_name["metadata"])}


def test_endpoint_edits_with_a_driving_photo_or_coordinates(server, loop, analyzer, people):
    ref, driver = people[0], people[2]
    ref_b64, drv_b64 = b64_png(ref), b64_png(driver)
    own = analyzer.detect(ref)[0].landmarks.tolist()
    plain = v1(server, loop, ref_b64)
    driven = v1(server, loop, ref_b64, driving_image=drv_b64)
    by_points = v1(server, loop, ref_b64, landmarks=analyzer.detect(driver)[0].landmarks.tolist())
    self_driven = v1(server, loop, ref_b64, driving_image=ref_b64)
    own_points = v1(server, loop, ref_b64, landmarks=own)
    assert plain["identities"][0]["edited"] is False
    assert all(p["identities"][0]["edited"] for p in (driven, by_points, self_driven, own_points))
    assert not np.array_equal(pixels(driven["image"]), pixels(plain["image"]))      # the edit reaches the image
    assert not np.array_equal(pixels(driven["image"]), pixels(self_driven["image"]))  # and depends on the target
    # coordinates of the reference face = the reference photo as driver, pixel for pixel
    assert np.array_equal(pixels(own_points["image"]), pixels(self_driven["image"]))
    # the driver's points are pixels of *its* photo, not of the reference: another (valid) target
    assert not np.array_equal(pixels(by_points["image"]), pixels(driven["image"]))
    # v2 carries the same inputs (driving_images BYTES [N], landmarks FP32 [N, L, 2]) to the same images
    for kw, want in (({"driving_image": drv_b64}, driven), ({"landmarks": own}, own_points)):
        got = v2(server, loop, ref_b64, **kw)
        assert got["identities"] == want["identities"] and np.array_equal(pixels(got["image"]), pixels(want["image"]))


def test_endpoint_bad_targets_are_400s_naming_the_field(server, loop, analyzer, people):
    ref = people[0]
    ref_b64, blank = b64_png(ref), b64_png(np.full((96, 96, 3), 200, np.uint8))
    own = analyzer.detect(ref)[0].landmarks.tolist()
    cases = [
        (v1, {"driving_image": blank}, "no_face", "instances[0].identities[0].driving_image", "no face found"),
        (v2, {"driving_image": blank}, "no_face", "driving_images[0]", "no face found"),
        (v1, {"landmarks": own[:5]}, "bad_landmarks", "instances[0].identities[0].landmarks",
         "expected 68 points in the iBUG 300-W 68-point order (dlib) as [x, y] pairs, got 5"),
        (v2, {"landmarks": own[:5]}, "bad_landmarks", "landmarks[0]", "expected 68 points"),
        (v1, {"landmarks": [[x / 300, y / 300] for x, y in own]}, "bad_landmarks",
         "instances[0].identities[0].landmarks", "look normalised"),
        (v1, {"landmarks": own[:67] + [[1.0]]}, "bad_landmarks", "instances[0].identities[0].landmarks[67]",
         "each point is [x, y]"),
        (v1, {"landmarks": own, "driving_image": ref_b64}, "invalid_field", "instances[0].identities[0].landmarks",
         "not both"),
        (v1, {"landmarks_image": blank}, "unknown_field", "instances[0].identities[0].landmarks_image",
         "allowed fields: image, bbox, expression, driving_image, landmarks"),
    ]
    for call, target, reason, field, text in cases:
        with pytest.raises(ServingError) as err:
            call(server, loop, ref_b64, **target)
        e = err.value
        assert (e.status, e.reason, e.field) == (400, reason, field), (target.keys(), str(e))
        assert str(e).startswith(field + ": ") and text in str(e), str(e)


def test_generate_cli_takes_a_driving_image_and_a_landmarks_file(tiny_params, ckpt, analyzer, people, tmp_path,
                                                               capsys):
    from components.cli import main

    ref, driver = tmp_path / "ref.png", tmp_path / "driver.png"
    Image.fromarray(people[0]).save(ref)
    Image.fromarray(people[2]).save(driver)
    points = tmp_path / "ref.json"
    moved = analyzer.detect(people[0])[0].landmarks.copy()
    moved[57:60, 1] += 12.0
    points.write_text(json.dumps(moved.tolist()))
    cache = f"storage.cache_dir={tiny_params.storage.cache_dir}"
    common = ["-S", cache, "generate", "--checkpoint", str(ckpt), "--prompt", "two people", "--steps", "1"]
    out = tmp_path / "g.png"
    rc = main([*common, "--id-image", str(ref), "--id-image", str(ref), "--driving-image", str(driver),
               "--landmarks", "-", "--landmarks", str(points), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [i["edited"] for i in json.loads(out.with_suffix(".json").read_text())["identities"]] == [True, True]
    points.write_text(json.dumps(moved[:10].tolist()))
    rc = main([*common, "--id-image", str(ref), "--landmarks", str(points), "--out", str(out)])
    assert rc == 2 and "identity 0: landmarks: expected 68 points" in capsys.readouterr().err
    points.write_text(json.dumps({"x": 1}))
    rc = main([*common, "--id-image", str(ref), "--landmarks", str(points), "--out", str(out)])
    assert rc == 2 and "expected a JSON list of [x, y] number pairs" in capsys.readouterr().err

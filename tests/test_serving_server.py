"""The real model server: `dynamicid serve` in a subprocess on 127.0.0.1 (tiny profile), called with
plain HTTP, with kserve's InferenceRESTClient and with `dynamicid infer`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from components.cli import main
from tests.services import serve_process

pytestmark = pytest.mark.slow
SERVE = {  # small limits so each one is cheap to hit
    "serve.max_queue": 4, "serve.max_batch_size": 4, "serve.batch_window_ms": 300, "serve.retry_after_s": 3,
    "serve.max_steps": 8, "serve.default_steps": 2, "serve.max_side": 128, "serve.max_image_bytes": 200_000,
    "serve.max_image_pixels": 1_000_000, "serve.max_body_bytes": 1_000_000, "serve.request_timeout_s": 90,
    "serve.cpu_threads": 1,  # 2 cores shared by several test runs: more threads only make OpenMP spin
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(img: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt)
    return buf.getvalue()


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, before_ready: dict[str, int]) -> None:
        self.proc, self.url, self.log, self.before_ready = proc, url, log, before_ready

    def predict(self, *instances: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models/dynamicid:predict", json={"instances": list(instances)},
                          timeout=timeout)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text


@pytest.fixture(scope="module")
def ckpt(tiny_params, tmp_path_factory) -> Path:
    from model.loading import init_checkpoint

    out = tmp_path_factory.mktemp("serve-ckpt") / "init"
    return init_checkpoint(tiny_params.model, tiny_params.face, out, tiny_params.storage.cache_dir, seed=1)


@pytest.fixture(scope="module")
def server(ckpt, tiny_params, tmp_path_factory) -> Server:
    before: dict[str, int] = {}

    def while_loading(url: str) -> None:  # live first: the server listens while the model loads
        for path in ("/v2/health/ready", "/v2/models/dynamicid/ready", "/v1/models/dynamicid"):
            before[path] = httpx.get(url + path, timeout=5).status_code
        early = httpx.post(f"{url}/v1/models/dynamicid:predict", json={"instances": [{}]}, timeout=5)
        before["predict"] = early.status_code
        before["retry-after"] = int(early.headers.get("retry-after", 0))
        before["live"] = httpx.get(f"{url}/v2/health/live", timeout=5).status_code

    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    sets = {"storage.cache_dir": tiny_params.storage.cache_dir, **SERVE}
    with serve_process(ckpt, sets, log, on_live=while_loading) as (proc, url):
        yield Server(proc, url, log, before)


@pytest.fixture(scope="module")
def hanks_b64(single_face_photo) -> str:
    return b64(Path(single_face_photo).read_bytes())


@pytest.fixture(scope="module")
def two_people(tiny_params, group_photo) -> list[str]:
    """JPEG crops of two different people of the group photo (found with the real detector)."""
    from model.face_analysis.backends import build_face_analyzer
    from model.pipeline import face_crop_box

    img = np.asarray(Image.open(group_photo).convert("RGB"))
    faces = build_face_analyzer(tiny_params.face).detect(img)
    crops = []
    for f in faces[:2]:
        left, top, right, bottom = face_crop_box(f.bbox, img.shape[:2], margin=0.6)
        crops.append(b64(encode(np.ascontiguousarray(img[top:bottom, left:right]), "JPEG")))
    return crops


@pytest.fixture(scope="module")
def reference(server, hanks_b64) -> np.ndarray:
    """The image of person(hanks, seed=11) over plain v1: what every other route must reproduce."""
    r = server.predict(person(hanks_b64, seed=11))
    assert r.status_code == 200, r.text
    return decode(r.json()["predictions"][0]["image"])


def person(image: str, steps: int = 2, seed: int = 7, **ident) -> dict:
    return {"prompt": "a photo of a person", "identities": [{"image": image, **ident}], "seed": seed,
            "num_inference_steps": steps}


# ------------------------------------------------------------------------------------ readiness
def test_ready_only_after_load_and_warm_up(server):
    assert server.before_ready == {"/v2/health/ready": 503, "/v2/models/dynamicid/ready": 503,
                                   "/v1/models/dynamicid": 503, "predict": 503, "retry-after": 3, "live": 200}
    for path in ("/v2/health/ready", "/v2/models/dynamicid/ready", "/v1/models/dynamicid", "/v2/health/live"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert httpx.get(f"{server.url}/v1/models/dynamicid").json() == {"name": "dynamicid", "ready": True}
    assert "warm-up" in server.log.read_text()


def test_model_metadata_lists_the_v2_tensors(server):
    meta = httpx.get(f"{server.url}/v2/models/dynamicid").json()
    assert meta["name"] == "dynamicid"
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
        ("prompt", "BYTES"), ("id_images", "BYTES"), ("driving_images", "BYTES"), ("landmarks", "FP32"),
        ("parameters", "BYTES")]
    assert [t["name"] for t in meta["outputs"]] == ["image", "metadata"]
    assert httpx.get(f"{server.url}/v2").json()["name"]  # server metadata (KServe's)


# ------------------------------------------------------------------------------------ v1 / v2
def test_v1_single_id_plain_http_is_deterministic(server, hanks_b64, reference):
    a = server.predict(person(hanks_b64, seed=11))
    assert a.status_code == 200, a.text
    pred = a.json()["predictions"][0]
    assert pred["seed"] == 11 and pred["identities"] == [{"region": [0.0, 0.0, 1.0, 1.0], "edited": False}]
    img = decode(pred["image"])
    assert img.shape == (64, 64, 3) and img.std() > 0
    assert np.array_equal(img, reference)
    other = server.predict({**person(hanks_b64), "seed": None}).json()["predictions"][0]  # server picks a seed
    assert 0 <= other["seed"] < 2**31 and not np.array_equal(decode(other["image"]), reference)


def test_v1_with_kserve_rest_client(server, hanks_b64, reference):
    from kserve import InferenceRESTClient, RESTConfig

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=120))
        try:
            ready = await client.is_model_ready(server.url, "dynamicid")
            out = await client.infer(server.url, {"instances": [person(hanks_b64, seed=11)]}, model_name="dynamicid")
        finally:
            await client.close()
        return ready, out

    ready, out = asyncio.run(call())
    assert ready is True and out["predictions"][0]["seed"] == 11
    assert np.array_equal(decode(out["predictions"][0]["image"]), reference)


@pytest.mark.parametrize("binary", [False, True], ids=["json-tensors", "binary-tensors"])
def test_v2_with_kserve_rest_client_matches_v1(server, hanks_b64, reference, binary):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    def tensor(name: str, values: list[str]) -> InferInput:
        t = InferInput(name=name, shape=[len(values)], datatype="BYTES")
        t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object), binary_data=binary)
        return t

    params = {"seed": 11, "num_inference_steps": 2}
    request = InferRequest(model_name="dynamicid", infer_inputs=[
        tensor("prompt", ["a photo of a person"]), tensor("id_images", [hanks_b64]),
        tensor("parameters", [json.dumps(params)])])

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            assert await client.is_server_ready(server.url)
            return await client.infer(server.url, request, model_name="dynamicid")
        finally:
            await client.close()

    response = asyncio.run(call())
    outputs = {o.name: o for o in response.outputs}
    image_b64 = outputs["image"].as_numpy().reshape(-1)[0]
    meta = json.loads(outputs["metadata"].as_numpy().reshape(-1)[0])
    image_b64 = image_b64.decode() if isinstance(image_b64, bytes) else image_b64
    assert meta == {"seed": 11, "identities": [{"region": [0.0, 0.0, 1.0, 1.0], "edited": False}], "layout": "strips"}
    assert np.array_equal(decode(image_b64), reference)


def test_v2_plain_http_json(server, hanks_b64, reference):
    from serving.client import v2_request

    body = v2_request(person(hanks_b64, seed=11))
    r = httpx.post(f"{server.url}/v2/models/dynamicid/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["image"]["datatype"] == "BYTES" and out["image"]["shape"] == [1]
    assert np.array_equal(decode(out["image"]["data"][0]), reference)
    assert json.loads(out["metadata"]["data"][0])["seed"] == 11


def test_two_ids_with_bboxes_and_default_strips(server, two_people):
    a, b = two_people
    boxes = server.predict({"prompt": "two people", "seed": 3, "num_inference_steps": 2, "identities": [
        {"image": a, "bbox": [0.1, 0.0, 0.9, 0.5]}, {"image": b, "bbox": [0.1, 0.5, 0.9, 1.0]}]})
    assert boxes.status_code == 200, boxes.text
    pb = boxes.json()["predictions"][0]
    assert [i["region"] for i in pb["identities"]] == [[0.1, 0.0, 0.9, 0.5], [0.1, 0.5, 0.9, 1.0]]
    strips = server.predict({"prompt": "two people", "seed": 3, "num_inference_steps": 2, "layout": "strips",
                             "identities": [{"image": a}, {"image": b}]}).json()["predictions"][0]
    assert [i["region"] for i in strips["identities"]] == [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]
    assert not np.array_equal(decode(pb["image"]), decode(strips["image"]))


def test_expression_edit_is_applied_per_identity(server, two_people):
    a, b = two_people
    plain = server.predict({"prompt": "two people", "seed": 5, "num_inference_steps": 2,
                            "identities": [{"image": a}, {"image": b}]}).json()["predictions"][0]
    edit = server.predict({"prompt": "two people", "seed": 5, "num_inference_steps": 2,
                           "identities": [{"image": a}, {"image": b, "expression": "smiling"}]})
    assert edit.status_code == 200, edit.text
    pe = edit.json()["predictions"][0]
    assert [i["edited"] for i in pe["identities"]] == [False, True]
    assert not np.array_equal(decode(pe["image"]), decode(plain["image"]))


def test_driving_photo_and_landmarks_over_plain_http(server, two_people, tiny_params):
    """Both target inputs through the real server, v1 JSON and v2 tensors (JSON and the FP32
    landmarks tensor), end to end: an edit that depends on the target, the same over both protocols."""
    from model.face_analysis.backends import build_face_analyzer
    from serving.client import v2_request

    a, b = two_people
    own = build_face_analyzer(tiny_params.face).detect(decode(a))[0].landmarks.tolist()   # [68, 2] pixels of a
    plain = server.predict(person(a, seed=9)).json()["predictions"][0]
    driven = server.predict(person(a, seed=9, driving_image=b))
    kept = server.predict(person(a, seed=9, landmarks=own))
    assert driven.status_code == 200 and kept.status_code == 200, (driven.text, kept.text)
    pd, pk = driven.json()["predictions"][0], kept.json()["predictions"][0]
    assert pd["identities"][0]["edited"] and pk["identities"][0]["edited"]
    images = [decode(p["image"]) for p in (plain, pd, pk)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    for inst, want in ((person(a, seed=9, driving_image=b), images[1]), (person(a, seed=9, landmarks=own), images[2])):
        r = httpx.post(f"{server.url}/v2/models/dynamicid/infer", json=v2_request(inst), timeout=120)
        assert r.status_code == 200, r.text
        assert np.array_equal(decode(r.json()["outputs"][0]["data"][0]), want)
    gray = b64(encode(np.full((96, 96, 3), 200, np.uint8)))
    body = v2_request(person(a, driving_image=gray))
    r = httpx.post(f"{server.url}/v2/models/dynamicid/infer", json=body, timeout=60)
    assert (r.status_code, r.json()["reason"], r.json()["field"]) == (400, "no_face", "driving_images[0]")
    r = server.predict(person(a, landmarks=own[:60]))
    assert (r.status_code, r.json()["reason"], r.json()["field"]) == (
        400, "bad_landmarks", "instances[0].identities[0].landmarks")
    assert "expected 68 points" in r.json()["error"]


# ------------------------------------------------------------------------------------ bad input
def _bad_requests(hanks_b64: str, group_photo: Path) -> list[tuple[str, dict, int, str, str, str]]:
    gray = b64(encode(np.full((96, 96, 3), 200, np.uint8)))
    noise = b64(encode(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)))  # > 200 kB
    two = [{"image": hanks_b64}] * 2
    return [
        ("invalid base64", person("%%%"), 400, "invalid_base64", "instances[0].identities[0].image", "not valid base64"),
        ("not an image", person(b64(b"GIF? no, just text")), 400, "not_an_image", "instances[0].identities[0].image",
         "not a recognised image"),
        ("path", person("file:///etc/passwd"), 400, "uri_not_allowed", "instances[0].identities[0].image", "never opens"),
        ("bytes over limit", person(noise), 413, "image_too_large", "instances[0].identities[0].image",
         "the limit is 200000"),
        ("pixels over limit", person(b64(Path(group_photo).read_bytes())), 413, "too_many_pixels",
         "instances[0].identities[0].image", "1280x886 = 1134080 pixels, the limit is 1000000"),
        ("no face in identity 1", {**person(hanks_b64), "identities": [{"image": hanks_b64}, {"image": gray}]}, 400,
         "no_face", "instances[0].identities[1]", "no face"),
        ("too many identities", {**person(hanks_b64), "identities": two * 3}, 400, "too_many_identities",
         "instances[0].identities", "6 identities given, at most 4 (model.max_ids)"),
        ("bbox out of range", person(hanks_b64, bbox=[0, 0, 1.2, 1]), 400, "bbox_out_of_range",
         "instances[0].identities[0].bbox[2]", "less than or equal to 1"),
        ("steps", person(hanks_b64, steps=9), 400, "out_of_range", "instances[0].num_inference_steps",
         "less than or equal to 8"),
        ("size", {**person(hanks_b64), "height": 256}, 400, "out_of_range", "instances[0].height",
         "less than or equal to 128"),
        ("guidance", {**person(hanks_b64), "guidance_scale": 25.0}, 400, "out_of_range", "instances[0].guidance_scale",
         "less than or equal to 20"),
        ("unknown field", {**person(hanks_b64), "sampler": "euler"}, 400, "unknown_field", "instances[0].sampler",
         "allowed fields"),
    ]


def test_each_bad_input_gets_its_4xx_naming_the_field(server, hanks_b64, group_photo):
    for name, inst, status, reason, field, text in _bad_requests(hanks_b64, group_photo):
        r = server.predict(inst)
        body = r.json()
        assert (r.status_code, body.get("reason"), body.get("field")) == (status, reason, field), (name, body)
        assert body["error"].startswith(field) and text in body["error"], (name, body)
    metrics = server.metrics()
    for reason in ("invalid_base64", "no_face", "too_many_pixels", "unknown_field"):
        assert re.search(rf'dynamicid_request_errors_total{{model_name="dynamicid",reason="{reason}",status="4\d\d"}} '
                         r'[1-9]', metrics), reason


def test_v2_bad_input_names_the_tensor(server, hanks_b64):
    from serving.client import v2_request

    gray = b64(encode(np.full((96, 96, 3), 200, np.uint8)))
    body = v2_request({"prompt": "x", "identities": [{"image": hanks_b64}, {"image": gray}], "num_inference_steps": 2})
    r = httpx.post(f"{server.url}/v2/models/dynamicid/infer", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "id_images[1]" and r.json()["reason"] == "no_face"
    body["inputs"][2]["data"] = [json.dumps({"num_inference_steps": 99, "identities": [{}, {}]})]
    r = httpx.post(f"{server.url}/v2/models/dynamicid/infer", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "parameters.num_inference_steps"


def test_body_over_the_limit_is_refused_before_parsing(server):
    big = b"x" * 1_100_000
    r = httpx.post(f"{server.url}/v1/models/dynamicid:predict", content=big,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced on the stream
        for _ in range(11):
            yield b"x" * 100_000

    for path in ("/v1/models/dynamicid:predict", "/v2/models/dynamicid/infer"):
        r = httpx.post(server.url + path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["error"], (path, r.text)
    assert httpx.post(f"{server.url}/v1/models/dynamicid:predict", content=b"{not json",
                      headers={"content-type": "application/json"}).status_code == 400


def test_a_bad_request_does_not_affect_a_concurrent_good_one(server, hanks_b64, reference):
    gray = b64(encode(np.full((96, 96, 3), 200, np.uint8)))

    async def both():
        async with httpx.AsyncClient(timeout=120) as c:
            url = f"{server.url}/v1/models/dynamicid:predict"
            return await asyncio.gather(c.post(url, json={"instances": [person(hanks_b64, seed=11)]}),
                                        c.post(url, json={"instances": [person(gray, seed=11)]}))

    good, bad = asyncio.run(both())
    assert good.status_code == 200 and bad.status_code == 400 and bad.json()["field"] == "instances[0].identities[0]"
    assert np.array_equal(decode(good.json()["predictions"][0]["image"]), reference)


# ------------------------------------------------------------------------------------ load
def test_overload_answers_503_with_retry_after_and_keeps_serving(server, hanks_b64):
    async def burst():
        async with httpx.AsyncClient(timeout=180) as c:
            url = f"{server.url}/v1/models/dynamicid:predict"
            return await asyncio.gather(*[c.post(url, json={"instances": [person(hanks_b64, steps=4, seed=i)]})
                                          for i in range(10)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    assert set(codes) <= {200, 503} and codes.count(200) >= 4 and rejected, codes
    for r in rejected:
        assert r.headers["retry-after"] == "3" and r.json()["reason"] == "overloaded"
        assert "serve.max_queue" in r.json()["error"]
    seeds = sorted(r.json()["predictions"][0]["seed"] for r in responses if r.status_code == 200)
    assert len(set(seeds)) == len(seeds)
    after = server.predict(person(hanks_b64))
    assert after.status_code == 200
    m = server.metrics()
    count = float(re.search(r'dynamicid_batch_size_count{model_name="dynamicid"} (\S+)', m).group(1))
    singles = float(re.search(r'dynamicid_batch_size_bucket{le="1.0",model_name="dynamicid"} (\S+)', m).group(1))
    assert count > singles, "the admitted burst should have been denoised in batches larger than one"
    overloaded = re.search(
        r'dynamicid_request_errors_total{model_name="dynamicid",reason="overloaded",status="503"} (\S+)', m)
    assert float(overloaded.group(1)) >= len(rejected)
    assert re.search(r'dynamicid_queue_depth{model_name="dynamicid"} 0.0', m)


def test_stage_latency_histograms_are_exported(server):
    m = server.metrics()
    for stage in ("validation", "face_analysis", "encoding", "queue", "denoising", "decode", "total"):
        found = re.search(rf'dynamicid_stage_seconds_count{{model_name="dynamicid",stage="{stage}"}} (\S+)', m)
        assert found and float(found.group(1)) > 0, stage
    assert "request_predict_seconds" in m  # KServe's own histograms sit next to ours


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_infer_cli_takes_a_driving_image_and_a_landmarks_file(server, two_people, tiny_params, tmp_path, capsys,
                                                            protocol):
    from model.face_analysis.backends import build_face_analyzer

    a, b = (tmp_path / "a.png", tmp_path / "b.png")
    for path, img in zip((a, b), two_people):
        path.write_bytes(encode(decode(img)))
    points = tmp_path / "b.json"
    points.write_text(json.dumps(build_face_analyzer(tiny_params.face).detect(decode(two_people[1]))[0].landmarks.tolist()))
    out = tmp_path / f"{protocol}.png"
    rc = main(["infer", "--url", server.url, "--protocol", protocol, "--prompt", "two people", "--id-image", str(a),
               "--id-image", str(b), "--driving-image", str(b), "--landmarks", "-", "--landmarks", str(points),
               "--steps", "2", "--seed", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [i["edited"] for i in meta["identities"]] == [True, True]
    points.write_text(json.dumps([[1, 2]] * 5))
    rc = main(["infer", "--url", server.url, "--protocol", protocol, "--prompt", "x", "--id-image", str(b),
               "--landmarks", str(points), "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "expected 68 points" in err and ("identities[0].landmarks" in err or "landmarks[0]" in err)
    points.write_text("{not json")
    rc = main(["infer", "--url", server.url, "--prompt", "x", "--id-image", str(b), "--landmarks", str(points)])
    assert rc == 2 and "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_infer_cli_writes_the_image(server, single_face_photo, tmp_path, capsys, protocol):
    out = tmp_path / f"{protocol}.png"
    rc = main(["infer", "--url", server.url, "--protocol", protocol, "--prompt", "a photo of a person",
               "--id-image", str(single_face_photo), "--expression", "smiling", "--steps", "2", "--seed", "11",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta == {"seed": 11, "identities": [{"region": [0.0, 0.0, 1.0, 1.0], "edited": True}], "layout": "strips"}


def test_infer_cli_reports_server_errors(server, single_face_photo, tmp_path, capsys):
    rc = main(["infer", "--url", server.url, "--prompt", "x", "--id-image", str(single_face_photo), "--steps", "50",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "instances[0].num_inference_steps" in capsys.readouterr().err
    rc = main(["infer", "--url", server.url, "--prompt", "x", "--id-image", str(tmp_path / "missing.png")])
    assert rc == 2 and "missing.png: no such file" in capsys.readouterr().err


def test_sigterm_stops_the_server_cleanly(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert "Traceback" not in server.log.read_text().split("Shutting down")[-1]

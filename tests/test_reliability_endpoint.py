"""Hostile input and overload against the real model server (`dynamicid serve`, tiny profile, 127.0.0.1).

- Property-based fuzzing (hypothesis, derandomized) of ``POST /v1/models/dynamicid:predict`` and
  ``POST /v2/models/dynamicid/infer`` from the documented request schema (tests/fuzz_requests.py):
  more than 10,000 requests; valid ones (tiny settings) must generate (200, an image of the
  requested size), every other one must get a 4xx with a JSON error naming the problem (the
  documented reason where the defect determines it); no 5xx; live and ready between batches;
  server RSS bounded.
- Load: 64 concurrent clients against a queue bound of 4: never more than 4 admitted (server's
  high-water mark), 503 + Retry-After past it, an answer for every request, 200s are real images.
- Limits before decoding: over-limit requests never reach face analysis or a batch (server metrics),
  a real decompression bomb is refused from its header without growing RSS, a body announced
  larger than the limit is refused before it is sent, and the checks run before any image decode.
- Path/URI safety: image fields naming a real face file (absolute, relative, file://, http:// to a
  live local server, s3://) are refused and nothing is read or fetched; model names with ``..`` or
  absolute paths in the URL get 404; KServe's model-repository routes (which could unload the
  model) are not offered.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from PIL import Image

from tests.fuzz_requests import URIS, Context, Request, request_batch, valid_requests
from tests.services import serve_process
from serving.schema import Limits

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
V1, V2 = "/v1/models/dynamicid:predict", "/v2/models/dynamicid/infer"
MAX_QUEUE = 4
SERVE = {  # small limits so each one is cheap to hit; tiny generations (1-2 steps, 64-72 px)
    "serve.max_queue": MAX_QUEUE, "serve.max_batch_size": 4, "serve.batch_window_ms": 20, "serve.retry_after_s": 3,
    "serve.max_steps": 8, "serve.default_steps": 2, "serve.max_side": 128, "serve.max_image_bytes": 200_000,
    "serve.max_image_pixels": 1_000_000, "serve.max_body_bytes": 1_000_000, "serve.request_timeout_s": 60,
    "serve.cpu_threads": 1,
}
FUZZ_EXAMPLES = 600        # x 17 requests per example (tests/fuzz_requests.request_batch) + valid ones
VALID_EVERY = 30           # one valid request (alternately v1 / v2) every 30 examples
CHECK_EVERY = 30           # liveness, readiness and RSS between batches
# RSS of the tiny server, sampled every CHECK_EVERY examples: the median of the last third of the
# samples (and the final RSS) may exceed the median of the first third (warm-up: ~3,400 requests) by at
# most RSS_GROWTH_BOUND, and RSS never exceeds RSS_CEILING. Measured on a fresh server: +40 to +125 MiB
# (glibc arenas of the decoding threads filling up: a second 10,000-request run on the same server
# adds 0 to +20 MiB), peak 1,010 MiB (transient). Keeping 2/3 of the ~730 MB of request bodies sent
# after warm-up would add ~490 MB.
RSS_GROWTH_BOUND = 192 * 2**20
RSS_CEILING = 1536 * 2**20
CLIENTS, PER_CLIENT = 64, 3
SENDERS = MAX_QUEUE - 1    # fuzzing requests in flight at once


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.port = int(url.rsplit(":", 1)[1])

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent), labels matched exactly (model_name implied)."""
        want = {"model_name": "dynamicid", **labels}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == want:
                return float(m.group(3))
        return 0.0

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/dynamicid/ready"):
            r = httpx.get(self.url + path, timeout=10)
            assert r.status_code == 200, (path, r.status_code, r.text)


@pytest.fixture(scope="module")
def server(tiny_params, tmp_path_factory) -> Server:
    from model.loading import init_checkpoint

    ckpt = init_checkpoint(tiny_params.model, tiny_params.face, tmp_path_factory.mktemp("rel-ckpt") / "init",
                           tiny_params.storage.cache_dir, seed=1)
    log = tmp_path_factory.mktemp("rel-log") / "server.log"
    with serve_process(ckpt, {"storage.cache_dir": tiny_params.storage.cache_dir, **SERVE}, log) as (proc, url):
        yield Server(proc, url, log)


@pytest.fixture(scope="module")
def face_b64(single_face_photo) -> str:
    return base64.b64encode(Path(single_face_photo).read_bytes()).decode()


@pytest.fixture(scope="module")
def ctx(face_b64, tiny_params) -> Context:
    from model.face_analysis.backends import landmark_count

    limits = Limits(max_ids=tiny_params.model.max_ids, resolution=tiny_params.model.active.resolution,
                    max_steps=SERVE["serve.max_steps"], default_steps=SERVE["serve.default_steps"],
                    max_side=SERVE["serve.max_side"], max_image_bytes=SERVE["serve.max_image_bytes"],
                    max_image_pixels=SERVE["serve.max_image_pixels"],
                    landmark_count=landmark_count(tiny_params.face, tiny_params.model.profile))
    return Context(limits=limits, face_b64=face_b64, max_queue=MAX_QUEUE,
                   max_body_bytes=SERVE["serve.max_body_bytes"], max_ids=tiny_params.model.max_ids)


def instance(image: str, seed: int = 1, **extra) -> dict:
    return {"prompt": "a photo of a person", "identities": [{"image": image}], "seed": seed,
            "num_inference_steps": 1, **extra}


def png_size(b64_png: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def check_answer(req: Request, r: httpx.Response, inst: dict | None = None) -> None:
    """What a correct server answers to ``req`` (see tests/fuzz_requests.py)."""
    where = f"{req!r} -> {r.status_code} {r.text[:300]}"
    assert r.status_code < 500, where  # sequential fuzzing never overloads: no 503 either
    assert r.headers["content-type"].startswith("application/json"), where
    body = r.json()
    if req.valid:
        assert r.status_code == 200, where
        want = (inst.get("width", 64), inst.get("height", 64))
        n_ids = len(inst["identities"])
        if req.protocol == "v1":
            pred = body["predictions"][0]
            image, meta = pred["image"], pred
        else:
            out = {o["name"]: o for o in body["outputs"]}
            image, meta = out["image"]["data"][0], json.loads(out["metadata"]["data"][0])
        assert png_size(image) == want, where
        assert len(meta["identities"]) == n_ids and 0 <= meta["seed"] < 2**32, where
        if "seed" in inst:
            assert meta["seed"] == inst["seed"], where
        return
    assert 400 <= r.status_code < 500, where
    assert isinstance(body, dict) and set(body) == {"error", "reason", "field"}, where
    assert isinstance(body["error"], str) and body["error"].strip() and isinstance(body["reason"], str), where
    if body["field"]:
        assert body["error"].startswith(f"{body['field']}: "), where
    if req.status is not None:
        assert r.status_code == req.status, where
    if req.reasons is not None:
        assert body["reason"] in req.reasons, where


# ------------------------------------------------------------------------------------ fuzzing
def test_fuzzed_v1_and_v2_requests_get_documented_answers(server, ctx):
    sent: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    rss: dict[str, int] = {"start": server.rss()}
    samples: list[int] = []
    examples = [0]
    # keep-alive connections, SENDERS requests in flight: the client draws and checks while the
    # server answers (fewer than serve.max_queue, so a correct server never answers 503 here)
    client = httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=SENDERS))
    pool = ThreadPoolExecutor(SENDERS)
    t0 = time.monotonic()

    def send(req: Request, inst: dict) -> str:
        r = client.post(V1 if req.protocol == "v1" else V2, content=req.body, headers=req.headers)
        check_answer(req, r, inst)
        return r.json().get("reason", "?") if r.status_code != 200 else "ok"

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batch=request_batch(ctx))
    def fuzz(batch):
        inst, requests = batch
        k = examples[0]
        examples[0] += 1
        if k % VALID_EVERY == 0:
            requests = [valid_requests(inst)[(k // VALID_EVERY) % 2], *requests]
        for req, answer in zip(requests, [f.result() for f in [pool.submit(send, q, inst) for q in requests]]):
            sent[req.protocol] += 1
            sent["valid" if req.valid else "invalid"] += 1
            sent["bytes"] += len(req.body)
            reasons[answer] += 1
        if k % CHECK_EVERY == CHECK_EVERY - 1:
            server.assert_healthy()
            samples.append(server.rss())

    try:
        fuzz()
    finally:
        pool.shutdown()
        client.close()
    elapsed = time.monotonic() - t0
    server.assert_healthy()
    rss["end"] = server.rss()
    third = len(samples) // 3  # medians: a transient spike (one big decode) is not growth
    rss["warm"], rss["late"] = statistics.median(samples[:third]), statistics.median(samples[-third:])
    rss["peak"] = max(samples)
    total = sent["v1"] + sent["v2"]
    mib = {k: round(v / 2**20, 1) for k, v in rss.items()}
    print(f"\nfuzz: {total} requests ({dict(sent)}) in {elapsed:.1f} s; RSS MiB {mib}, every {CHECK_EVERY} examples "
          f"{[round(x / 2**20) for x in samples]}; answers {dict(reasons)}")
    assert total >= 10_000 and sent["v1"] > 3000 and sent["v2"] > 3000
    assert sent["valid"] >= FUZZ_EXAMPLES // VALID_EVERY
    assert len(reasons) >= 15, reasons  # the defects reach many different checks
    assert rss["late"] - rss["warm"] < RSS_GROWTH_BOUND, mib
    assert rss["end"] - rss["warm"] < RSS_GROWTH_BOUND, mib
    assert rss["peak"] < RSS_CEILING, mib
    # nothing but hostile input happened: the server counted no internal error
    assert server.metric("dynamicid_request_errors_total", reason="internal", status="500") == 0


# ------------------------------------------------------------------------------------ load
def test_64_concurrent_clients_get_bounded_queue_and_503_with_retry_after(server, face_b64):
    before = {"overloaded": server.metric("dynamicid_request_errors_total", reason="overloaded", status="503"),
              "images": server.metric("dynamicid_images_generated_total")}
    rss_before = server.rss()
    depth_seen: list[float] = []
    stop = threading.Event()

    def watch_depth() -> None:  # what a Prometheus scrape would see, as often as /metrics answers
        while not stop.is_set():
            depth_seen.append(server.metric("dynamicid_queue_depth"))
            time.sleep(0.01)

    start = threading.Barrier(CLIENTS)

    def client(c: int) -> list[tuple[int, dict, dict[str, str]] | str]:
        out: list = []
        with httpx.Client(base_url=server.url, timeout=120) as http:
            start.wait()
            for i in range(PER_CLIENT):
                try:
                    r = http.post(V1, json={"instances": [instance(face_b64, seed=c * 100 + i)]})
                    out.append((r.status_code, r.json(), dict(r.headers)))
                except httpx.HTTPError as err:  # a lost request: no answer at all
                    out.append(f"{type(err).__name__}: {err}")
        return out

    watcher = threading.Thread(target=watch_depth, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [a for answers in pool.map(client, range(CLIENTS)) for a in answers]
    elapsed = time.monotonic() - t0
    stop.set()
    watcher.join()

    lost = [a for a in results if isinstance(a, str)]
    answered = [a for a in results if not isinstance(a, str)]
    codes = Counter(status for status, _, _ in answered)
    peak = server.metric("dynamicid_queue_depth_peak")
    print(f"\nload: {CLIENTS} clients x {PER_CLIENT} = {len(results)} requests in {elapsed:.1f} s: {dict(codes)}, "
          f"lost {len(lost)}, queue depth peak {peak:g} (scraped max {max(depth_seen):g}), "
          f"RSS {rss_before / 2**20:.0f} -> {server.rss() / 2**20:.0f} MiB")
    assert not lost and len(answered) == CLIENTS * PER_CLIENT
    assert set(codes) <= {200, 503} and codes[503] > 0 and codes[200] >= MAX_QUEUE, codes
    for status, body, headers in answered:
        if status == 503:
            assert headers.get("retry-after") == "3" and body["reason"] == "overloaded", (body, headers)
            assert "serve.max_queue" in body["error"]
        else:
            assert png_size(body["predictions"][0]["image"]) == (64, 64)
    assert 2 <= peak <= MAX_QUEUE and max(depth_seen) <= MAX_QUEUE
    # the server's own count agrees with the clients': every 503 was a deliberate overload answer
    assert server.metric("dynamicid_request_errors_total", reason="overloaded", status="503") - \
        before["overloaded"] == codes[503]
    assert server.metric("dynamicid_images_generated_total") - before["images"] == codes[200]
    assert server.metric("dynamicid_queue_depth") == 0
    assert server.rss() - rss_before < RSS_GROWTH_BOUND
    server.assert_healthy()


# ------------------------------------------------------------------------------------ limits first
def test_over_limit_requests_never_reach_face_analysis_or_a_batch(server, face_b64):
    """Each request carries a real face, so only the limit stops it: if a check ran after face
    analysis or generation, the server's stage counters would move."""
    def counters() -> tuple[float, ...]:
        return (server.metric("dynamicid_stage_seconds_count", stage="validation"),
                server.metric("dynamicid_stage_seconds_count", stage="face_analysis"),
                server.metric("dynamicid_batch_size_count"),
                server.metric("dynamicid_images_generated_total"))

    face = {"image": face_b64}
    cases = [
        ("too many identities", instance(face_b64, identities=[face] * 5), 400, "too_many_identities"),
        ("steps", instance(face_b64, num_inference_steps=9), 400, "out_of_range"),
        ("height", instance(face_b64, height=136), 400, "out_of_range"),
        ("width not a multiple of 8", instance(face_b64, width=100), 400, "out_of_range"),
        ("prompt", instance(face_b64, prompt="x" * 2001), 400, "out_of_range"),
        ("bbox", instance(face_b64, identities=[{**face, "bbox": [0.5, 0, 0.4, 1]}]), 400, "bbox_out_of_range"),
        ("too many instances", None, 400, "too_many_instances"),
    ]
    before = counters()
    for name, inst, status, reason in cases:
        body = {"instances": [instance(face_b64)] * (MAX_QUEUE + 1)} if inst is None else {"instances": [inst]}
        for path, payload in ((V1, body), (V2, None if inst is None else _v2(inst))):
            if payload is None:
                continue
            r = httpx.post(server.url + path, json=payload, timeout=30)
            assert (r.status_code, r.json().get("reason")) == (status, reason), (name, path, r.text[:300])
    big = json.dumps({"instances": [instance(face_b64, negative_prompt="n" * 1_000_000)]})
    r = httpx.post(server.url + V1, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    assert counters() == before


def _v2(inst: dict) -> dict:
    from serving.client import v2_request

    return v2_request(inst)


def real_bomb(width: int, height: int) -> bytes:
    """A real grayscale PNG of width x height zero pixels: ~1000x smaller than its decoded size."""
    raw = zlib.compress((b"\0" + bytes(width)) * height, 9)  # per row: filter byte + pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header_without_growing_memory(server):
    bomb = real_bomb(10_000, 10_000)  # 100 Mpx: 100 MB as L, 300 MB as RGB; under PIL's own hard limit
    assert len(bomb) < SERVE["serve.max_image_bytes"]
    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(bomb)) as im:  # a real image
        assert im.size == (10_000, 10_000)
    b64_bomb = base64.b64encode(bomb).decode()
    rss = server.rss()
    t = time.monotonic()
    for path, body in ((V1, {"instances": [instance(b64_bomb)]}), (V2, _v2(instance(b64_bomb)))):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 413 and r.json()["reason"] == "too_many_pixels", r.text[:300]
        assert "10000x10000 = 100000000 pixels, the limit is 1000000" in r.json()["error"]
    assert time.monotonic() - t < 5.0
    assert server.rss() - rss < 30 * 2**20, "the bomb was decoded"


def test_body_announced_over_the_limit_is_refused_before_it_is_sent(server):
    """Content-Length of 1 GB and only 10 bytes sent: the answer comes without the server waiting
    for (or buffering) the rest."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {V1} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {10**9}\r\n\r\n".encode() + b'{"instances')
        t = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
        assert time.monotonic() - t < 5.0
    head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), answer[:300]
    assert json.loads(body)["reason"] == "body_too_large"


def _length(answer: bytes) -> int:
    m = re.search(rb"(?im)^content-length: *(\d+)", answer)
    return int(m.group(1)) if m else 0


def test_schema_checks_run_before_any_image_is_decoded(monkeypatch, face_b64):
    """In-process, instrumented: the image decoder (and PIL's pixel decoding) is never called for a
    request that fails a non-image limit, or whose header claims too many pixels."""
    import PIL.ImageFile

    import serving.schema as schema_mod
    from serving.errors import ServingError
    from serving.schema import RequestSchema

    calls = Counter()
    real_decode, real_load = schema_mod.decode_image, PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(schema_mod, "decode_image", lambda *a, **k: (calls.update(["decode"]), real_decode(*a, **k))[1])
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: (calls.update(["pixels"]), real_load(self))[1])
    schema = RequestSchema(Limits(max_ids=2, resolution=64, max_steps=8, max_side=128, max_image_pixels=20_000))
    face = {"image": face_b64}
    for bad in [{"identities": [face] * 3}, {"num_inference_steps": 9}, {"height": 60}, {"width": 4096},
                {"identities": [{**face, "bbox": [0, 0, 2, 1]}]}, {"guidance_scale": 1e9}, {"seed": -1}]:
        with pytest.raises(ServingError):
            schema.parse({"prompt": "x", "identities": [face], **bad})
    assert calls == Counter()
    with pytest.raises(ServingError) as err:
        schema.parse({"prompt": "x", "identities": [{"image": base64.b64encode(real_bomb(2000, 2000)).decode()}]})
    assert err.value.reason == "too_many_pixels" and calls == Counter({"decode": 1})  # header only, no pixels
    schema.parse({"prompt": "x", "identities": [face]})
    assert calls["pixels"] >= 1  # the instrumentation does see a real decode


# ------------------------------------------------------------------------------------ paths and URIs
class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    payload = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.end_headers()
        self.wfile.write(type(self).payload)

    def log_message(self, *args) -> None:
        pass


def test_image_fields_never_read_local_files_or_fetch_uris(server, single_face_photo, tmp_path):
    face = tmp_path / "face.png"
    shutil.copy(single_face_photo, face)  # a real face: if the server opened it, generation would succeed
    _Recorder.hits, _Recorder.payload = [], face.read_bytes()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        rel = os.path.relpath(face, ROOT)  # relative to the server's working directory
        targets = [str(face), f"file://{face}", f"file:{face}", rel, f"./{rel}", str(face).replace("/", "\\"),
                   f"http://127.0.0.1:{web.server_address[1]}/face.png", f"s3://bucket/{face.name}",
                   f"{face.parent}/../{face.parent.name}/face.png", *URIS]
        for target in targets:
            for field in ("image", "driving_image"):
                ident = {"image": base64.b64encode(face.read_bytes()).decode(), field: target}
                r = httpx.post(server.url + V1, json={"instances": [instance("", identities=[ident])]}, timeout=30)
                body = r.json()
                assert r.status_code == 400 and body["reason"] == "uri_not_allowed", (target, field, r.text[:300])
                assert body["field"] == f"instances[0].identities[0].{field}"
            r = httpx.post(server.url + V2, json=_v2(instance(target)), timeout=30)
            assert r.status_code == 400 and r.json()["reason"] == "uri_not_allowed", (target, r.text[:300])
            assert r.json()["field"] == "id_images[0]"
        assert _Recorder.hits == []
    finally:
        web.shutdown()
    # the documented inline forms do work: plain base64 and a data URL
    data_url = "data:image/png;base64," + base64.b64encode(face.read_bytes()).decode()
    r = httpx.post(server.url + V1, json={"instances": [instance(data_url)]}, timeout=60)
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("target", [
    "/v1/models/../../etc/passwd:predict", "/v1/models/..%2F..%2Fetc%2Fpasswd:predict",
    "/v1/models/%2Fetc%2Fpasswd:predict", "/v1/models/dynamicid%2F..%2Fother:predict",
    "/v2/models/..%2F..%2Fetc/infer", "/v2/models/%2e%2e/infer", "/v2/models/dynamicid/versions/..%2F..%2Fx/infer",
    "/v2/repository/models/..%2F..%2Ftmp/load", "/v2/repository/models/dynamicid/load",
    "/v2/repository/models/dynamicid/unload", "/v2/repository/index", "/v1/models/dynamicid:explain",
    "/v2/models/dynamicid/versions/1/infer",
])
def test_model_names_and_routes_outside_the_documented_ones_get_404(server, target):
    """The request target goes on the wire exactly as written (http.client does not normalise ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", target, body=b'{"instances": [{}], "inputs": []}',
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status in (404, 405), (target, status, body)
    assert set(body) == {"error", "reason", "field"} and body["reason"] in ("not_found", "model_not_found",
                                                                           "method_not_allowed"), body
    server.assert_healthy()  # in particular: .../unload did not unload the model

"""Per-request phase timing (serving/timing.py): one served request through the timing middleware,
FastAPI routing and the real predictor (tiny checkpoint, in process) reports every phase, each
non-negative, their sum within the server's total and the total within the client's wall time;
the phases reach /metrics' histogram, and error answers are neither timed nor given the header."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from components.core.config import params_from_dict
from serving.errors import ServingError
from serving.metrics import ServingMetrics
from serving.timing import PHASES, PhaseTimingMiddleware, parse_server_timing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()  # the batcher lives on one loop
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def served(tiny_params, init_ckpt, loop):
    """The predictor behind a minimal FastAPI route, wrapped as the server wraps it."""
    from serving.predictor import DynamicIDModel

    params = params_from_dict({"storage": {"cache_dir": str(tiny_params.storage.cache_dir)},
                               "serve": {"cpu_threads": 1, "default_steps": 2, "batch_window_ms": 0}})
    registry = CollectorRegistry()
    model = DynamicIDModel(params, model_uri=str(init_ckpt), metrics=ServingMetrics("dynamicid", 4, registry=registry))
    loop.run_until_complete(model.start_engine())
    app = FastAPI()

    @app.post("/v1/models/dynamicid:predict")
    async def predict(request: Request):
        try:
            return JSONResponse(await model.predict(await request.json()))
        except ServingError as err:
            return JSONResponse(err.body(), status_code=err.status)

    app.add_middleware(PhaseTimingMiddleware, observe=model.metrics.phases, header=True)
    yield app, registry, model
    loop.run_until_complete(model.batcher.close())
    model.stop_engine()


def count(registry: CollectorRegistry, phase: str) -> float:
    return registry.get_sample_value("dynamicid_phase_seconds_count", {"model_name": "dynamicid", "phase": phase}) or 0


def test_one_request_reports_every_phase_within_its_wall_time(served, loop, single_face_photo):
    app, registry, _ = served
    image = base64.b64encode(Path(single_face_photo).read_bytes()).decode()
    body = {"instances": [{"prompt": "a photo of a person", "identities": [{"image": image}], "seed": 3,
                           "num_inference_steps": 2, "height": 64, "width": 64}]}

    async def call(payload: dict) -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            t = time.perf_counter()
            r = await client.post("/v1/models/dynamicid:predict", json=payload, timeout=120)
            return r, time.perf_counter() - t

    r, wall = loop.run_until_complete(call(body))
    assert r.status_code == 200, r.text
    phases, batch = parse_server_timing(r.headers["server-timing"])
    assert set(PHASES) <= set(phases), set(PHASES) - set(phases)
    assert all(v >= 0 for v in phases.values()), phases
    assert sum(phases[p] for p in PHASES) <= phases["total"] + 1e-4, phases   # ms rounded to 3 decimals
    assert abs(sum(phases[p] for p in PHASES) + phases["other"] - phases["total"]) < 1e-4
    assert phases["total"] <= wall
    for p in ("image_decode", "face_analysis", "id_encoding", "denoising", "vae_decode", "png_encode"):
        assert phases[p] > 0, (p, phases)  # work that really ran on this request
    assert batch == 1
    assert count(registry, "denoising") == count(registry, "total") == 1

    bad = {"instances": [{**body["instances"][0], "num_inference_steps": 0}]}
    r, _ = loop.run_until_complete(call(bad))
    assert r.status_code == 400 and "server-timing" not in r.headers
    assert count(registry, "total") == 1  # errors are not timed


def test_batch_sizes_can_be_warmed_before_traffic(served):
    """On CUDA the server runs this at load (graphs are per batch size); here it must at least run
    the batched pipeline call for every size the batcher can form."""
    from serving.predictor import DynamicIDModel

    model: DynamicIDModel = served[2]
    assert model._engine.warm_batches(64, 64, 5.0, 3) == [2, 3]


def test_warmed_batch_sizes_step_with_and_without_the_boost(served):
    """Graphs are captured per shape and per boost state; a warm-up that only ran the boosted first step left
    every batch size's boost-off graph to be captured mid-traffic (on an H100 such a capture made another
    request's encode fail with a 500). Each warmed size must step the UNet in both states."""
    model = served[2]
    unet = model._engine.pipe.unet
    seen: set[tuple[int, bool]] = set()

    def note(_module, args, kwargs):
        ctx = (kwargs.get("cross_attention_kwargs") or {}).get("id_context")
        seen.add((int(args[0].shape[0]), bool(ctx is not None and ctx.boost_active)))

    hook = unet.register_forward_pre_hook(note, with_kwargs=True)
    try:
        model._engine.warm_batches(64, 64, 5.0, 3)
    finally:
        hook.remove()
    assert {(4, True), (4, False), (6, True), (6, False)} <= seen, seen  # batch 2 and 3, with guidance


def test_encoding_waits_while_a_graph_is_captured(served, loop, single_face_photo):
    """A CUDA graph capture on the model thread fails if the encode thread touches the GPU meanwhile, so
    encoding takes the fast path's capture lock. Held here for 1 s (as a capture would hold it), the request's
    identity encoding lasts at least that long; the first test of this module shows it takes milliseconds."""
    import threading

    app, _, model = served
    runner = model._engine.pipe.step_runner
    assert runner is not None, "the served tiny model runs the fast path (eager on a CPU)"
    image = base64.b64encode(Path(single_face_photo).read_bytes()).decode()
    body = {"instances": [{"prompt": "a photo of a person", "identities": [{"image": image}], "seed": 3,
                           "num_inference_steps": 1, "height": 64, "width": 64}]}

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/models/dynamicid:predict", json=body, timeout=120)

    runner.capture_lock.acquire()
    threading.Timer(1.0, runner.capture_lock.release).start()
    r = loop.run_until_complete(call())
    assert r.status_code == 200, r.text
    phases, _ = parse_server_timing(r.headers["server-timing"])
    assert phases["face_analysis"] + phases["id_encoding"] >= 1.0, phases  # seconds

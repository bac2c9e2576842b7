"""Served latency / throughput against a running model server (the serving issue's endpoint).

The benchmark machine has no server of its own: give ``--server-url`` (and the JSON request
body with ``--server-payload``) to measure one; otherwise the section is reported as skipped.
Requests are sent with ``concurrency`` threads; latency percentiles are per request.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_serving(url: str | None, payload_file: str | None, requests: int, concurrency: int) -> dict:
    if not url:
        return {"section": "serve", "status": "skipped",
                "reason": "no server URL given (--server-url); the benchmark does not start a server itself"}
    body = Path(payload_file).read_bytes() if payload_file else json.dumps({"prompt": "a photo of a person"}).encode()

    def one(_: int) -> float:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
            if resp.status >= 400:
                raise RuntimeError(f"server answered {resp.status}")
        return time.perf_counter() - t0

    one(0)  # warm-up (first request may capture graphs)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"section": "serve", "status": "measured", "url": url, "requests": requests, "concurrency": concurrency,
            "p50_s": round(statistics.median(lat), 4), "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 4),
            "throughput_rps": round(requests / wall, 4)}


# --------------------------------------------------------------------------- in process


def run_inprocess(size: str, device, levels: list[int], requests_per_client: int, steps: int, res: int,
                  log, max_batch: int = 8, window_ms: float = 20.0) -> dict:
    """The server's own request path without HTTP: ``serving.engine.Engine`` (per-request identity
    encoding on an encode thread, batched generation on a model thread) behind
    ``serving.batching.Batcher``, with the response's PNG encoding, as ``serving.predictor``
    wires them; the pipeline is the SD1.5-size random-weight model on the fast path. Closed-loop
    clients: each sends its next request when the previous answer arrives. Not included: HTTP,
    JSON parsing and base64 (docs/serving.md measures those on a CPU), and face analysis, which
    the stand-in analyzer of the image benchmark answers instantly."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from benchmarks.image_bench import build_pipeline
    from model.fast.enable import enable_fast_path
    from serving.batching import Batcher
    from serving.engine import Engine, Job
    from serving.images import encode_png
    from serving.schema import GenerationRequest, IdentityRequest

    if device.type == "cuda":  # the serving peak, not whatever ran before in this process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    pipe = build_pipeline(size, device)
    fast = enable_fast_path(pipe, mode="auto", buckets=[(res, res, 1)])
    engine = Engine(pipe, None)
    photo = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)

    def request(seed: int, n_steps: int = steps) -> GenerationRequest:
        return GenerationRequest(prompt="a photo of a person, studio light", negative_prompt="",
                                 identities=[IdentityRequest(photo, None, None, None)], seed=seed,
                                 num_inference_steps=n_steps, guidance_scale=5.0, id_scale=1.0, height=res, width=res)

    t0 = time.perf_counter()  # warm-up: one 1-step batch of every size the batcher can form (graph capture)
    for b in range(1, max_batch + 1):
        reqs = [request(i, 1) for i in range(b)]
        jobs = [Job(r, *engine.encode(r), deadline=time.monotonic() + 600) for r in reqs]
        engine.generate(reqs[0].batch_key, jobs)
    warm_s = time.perf_counter() - t0

    encode_pool, model_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    async def level(clients: int) -> dict:
        loop = asyncio.get_running_loop()
        sizes: list[int] = []
        batcher = Batcher(lambda key, jobs: loop.run_in_executor(model_pool, engine.generate, key, jobs),
                          max_batch, window_ms / 1000.0, on_batch=sizes.append)
        lat: list[float] = []

        async def client(k: int) -> None:
            for j in range(requests_per_client):
                t = time.perf_counter()
                req = request(k * 1000 + j)
                ids, encoded = await loop.run_in_executor(encode_pool, engine.encode, req)
                result = await batcher.submit(req.batch_key, Job(req, ids, encoded, deadline=time.monotonic() + 600))
                await asyncio.to_thread(encode_png, result.image)
                lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
        await batcher.close()
        lat.sort()
        return {"concurrency": clients, "requests": len(lat), "p50_s": round(statistics.median(lat), 4),
                "p95_s": round(lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], 4),
                "images_per_s": round(len(lat) / wall, 3),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None}

    results = []
    for c in levels:
        r = asyncio.run(level(c))
        results.append(r)
        log(f"serve in-process c={c}: p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, {r['images_per_s']:.2f} img/s, "
            f"mean batch {r['mean_batch']}")
    encode_pool.shutdown()
    model_pool.shutdown()
    peak = round(torch.cuda.max_memory_allocated(device) / (1 << 30), 3) if device.type == "cuda" else None
    fast.disable()
    return {"section": "serve", "status": "measured in process", "mode": "in-process engine + batcher",
            "fast_path": fast.mode, "res": res, "steps": steps, "ids": 1, "max_batch": max_batch,
            "batch_window_ms": window_ms, "warmup_s": round(warm_s, 2), "peak_gib": peak, "levels": results,
            "excluded": "HTTP, JSON/base64 and face analysis (stand-in analyzer)"}

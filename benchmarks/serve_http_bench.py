"""Served latency and throughput the way a client calls the endpoint (issue 19, part 1).

One run, side by side: the pipeline in process (one image at a time: what the endpoint must not
add much to), then the same model behind the real server (``serving.server.serve``, a subprocess
on 127.0.0.1) called with KServe's own ``InferenceRESTClient``, over v1 JSON and v2, with the
reference photo sent as base64 PNG and as base64 JPEG, at closed-loop concurrencies (default 1, 2,
4, 8, 16). Per cell: client-side p50/p95 latency, images/s, the mean batch and the server's phase
breakdown (its ``Server-Timing`` header, serving/timing.py), and the GPU's busy share (NVML
utilisation sampled during the cell; n/a without a GPU).

Models: ``sd15`` / ``smoke`` build the benchmarks' random-weight pipeline in code (benchmarks/
image_bench.py: SD1.5 sizes, stand-in face analyzer, as the other GPU rows) in both the benchmark
and the server process (``child`` below); ``tiny`` is the embedded profile: a freshly initialised
checkpoint served by ``dynamicid serve`` itself, with real dlib face analysis (the CPU smoke run).

Targets (issue 19): served p50 at c=1 <= 1.10x the in-process image; the best concurrency whose
p95 is under 4x the c=1 p50 gives >= 1.75x the single-request pipeline throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.serve_http_report import TARGETS, evaluate, markdown
from serving.timing import REPORTED, parse_server_timing
PROMPT = "a photo of a person, studio light"


# --------------------------------------------------------------------------- models and inputs
def serve_settings(size: str, max_batch: int, levels: list[int], steps: int) -> dict[str, Any]:
    """serve.* overrides for the benchmark's server: timing header on, queue big enough for the top level."""
    return {"server_timing": True, "max_batch_size": max_batch, "max_queue": max(16, max(levels)),
            "playground": False, "max_steps": max(steps, 30), "request_timeout_s": 600,
            **({"cpu_threads": 1} if size == "tiny" else {})}


def bench_params(size: str, serve: dict[str, Any], cache_dir: str | None = None):
    from components.core.config import params_from_dict

    raw: dict[str, Any] = {"serve": serve}
    if size != "tiny":
        raw["model"] = {"profile": "sd15"}
    if cache_dir:
        raw["storage"] = {"cache_dir": cache_dir}
    return params_from_dict(raw)


def pipeline_factory(size: str, device: str) -> Callable[[], Any] | None:
    """sd15 / smoke: the benchmarks' random-weight pipeline; tiny: None (the checkpoint is loaded)."""
    if size == "tiny":
        return None

    def build():
        import torch

        from benchmarks.image_bench import build_pipeline

        return build_pipeline(size, torch.device(device))
    return build


def reference_photo(size: str) -> np.ndarray:
    """A real face (insightface's bundled photo; dlib must find it for tiny), 512 px for the SD1.5 sizes;
    a smooth synthetic picture where insightface is not installed (the stand-in analyzer accepts anything)."""
    from PIL import Image

    try:
        import insightface

        img = Image.open(Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png").convert("RGB")
    except ImportError:
        if size == "tiny":
            raise
        y, x = np.mgrid[0:512, 0:512] / 512.0
        img = Image.fromarray((np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1) * 255).astype(np.uint8))
    if size != "tiny":
        img = img.resize((512, 512), Image.LANCZOS)
    return np.asarray(img)


def encoded(photo: np.ndarray, fmt: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- in process
def measure_inprocess(params, ckpt: str | None, factory, photo: np.ndarray, steps: int, res: int, ids: int,
                      reps: int, log: Callable) -> dict:
    """The server's own model set-up (DynamicIDModel.load: fast path, warm-up) without the server:
    p50 of one pipeline call from decoded photos, and of the response's PNG encoding."""
    import torch

    from model.pipeline import IdentityInput
    from serving.images import encode_png
    from serving.predictor import DynamicIDModel

    if params.serve.cpu_threads is not None:  # the server's torch threads (its model thread sets the same)
        torch.set_num_threads(params.serve.cpu_threads)
    model = DynamicIDModel(params, model_uri=ckpt, pipeline_factory=factory)
    model.load()
    pipe = model._engine.pipe
    cuda = pipe.device.type == "cuda"

    def once(seed: int):
        if cuda:
            torch.cuda.synchronize(pipe.device)
        t = time.perf_counter()
        out = pipe(PROMPT, [IdentityInput(image=photo) for _ in range(ids)], num_inference_steps=steps,
                   guidance_scale=params.serve.default_guidance, height=res, width=res, seed=seed)
        if cuda:
            torch.cuda.synchronize(pipe.device)
        return time.perf_counter() - t, out.images[0]

    once(0)
    lat, png = [], []
    for i in range(reps):
        s, img = once(i + 1)
        lat.append(s)
        t = time.perf_counter()
        encode_png(img)
        png.append(time.perf_counter() - t)
    model.stop_engine()
    del model
    pipe = None
    gc.collect()  # the engine's hooks make a cycle: free the GPU memory before the server loads its copy
    if cuda:
        torch.cuda.empty_cache()
    p50 = statistics.median(lat)
    log(f"serve_http in process: pipeline p50 {p50:.3f} s ({1 / p50:.2f} img/s), PNG encode p50 "
        f"{statistics.median(png) * 1e3:.1f} ms, {reps} images")
    return {"p50_s": round(p50, 4), "p95_s": round(_pct(lat, 0.95), 4), "images_per_s": round(1 / p50, 3),
            "png_encode_ms": round(statistics.median(png) * 1e3, 2), "reps": reps}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# --------------------------------------------------------------------------- the server
def start_server(size: str, device: str, serve: dict[str, Any], ckpt: str | None, cache_dir: str | None,
                 log_path: Path, timeout_s: float = 900) -> tuple[subprocess.Popen, str]:
    """``dynamicid serve`` (tiny) or this module's ``child`` (the benchmark model) on a free port; waits for ready."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if size == "tiny":
        sets = {f"serve.{k}": v for k, v in serve.items()}
        if cache_dir:
            sets["storage.cache_dir"] = cache_dir
        cmd = [sys.executable, "-m", "components.cli", *[a for k, v in sets.items() for a in ("-S", f"{k}={v}")],
               "serve", "--model-uri", str(ckpt), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "benchmarks.serve_http_bench", "child", "--size", size, "--device", device,
               "--port", str(port), "--serve", json.dumps(serve)]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"server not ready within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


class GpuSampler:
    """Mean GPU utilisation (NVML's 'a kernel was running' share) over a window: pynvml, else nvidia-smi."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._read = self._reader()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _reader() -> Callable[[], float] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)  # noqa: E731
            read()  # some sandboxes have NVML without this counter
            return read
        except Exception:  # noqa: BLE001 - no NVML binding, no driver or no counter: try the CLI
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        cmd = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        read = lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.split()[0])  # noqa: E731
        try:
            read()
        except Exception:  # noqa: BLE001 - [N/A] or no device: no sampling
            return None
        return read

    def __enter__(self) -> "GpuSampler":
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def busy_share(self) -> float | None:
        return round(sum(self.samples) / len(self.samples) / 100.0, 3) if self.samples else None


# --------------------------------------------------------------------------- the clients
def request_for(protocol: str, image_b64: str, ids: int, steps: int, res: int, seed: int):
    """One image's request in kserve's client types: a v1 dict or a v2 InferRequest (docs/serving.md)."""
    fields = {"seed": seed, "num_inference_steps": steps, "height": res, "width": res}
    if protocol == "v1":
        return {"instances": [{"prompt": PROMPT, "identities": [{"image": image_b64}] * ids, **fields}]}
    from kserve import InferInput, InferRequest

    def tensor(name: str, values: list[str]) -> InferInput:
        t = InferInput(name=name, shape=[len(values)], datatype="BYTES")
        t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object), binary_data=False)
        return t

    return InferRequest(model_name="dynamicid", infer_inputs=[
        tensor("prompt", [PROMPT]), tensor("id_images", [image_b64] * ids), tensor("parameters", [json.dumps(fields)])])


def image_of(protocol: str, response) -> bytes:
    if protocol == "v1":
        return base64.b64decode(response["predictions"][0]["image"])
    data = {o.name: o for o in response.outputs}["image"].as_numpy().reshape(-1)[0]
    return base64.b64decode(data.decode() if isinstance(data, bytes) else data)


async def run_cell(url: str, protocol: str, image_b64: str, clients: int, per_client: int, ids: int, steps: int,
                   res: int) -> dict:
    """Warm-up round (c concurrent requests: first batches of each size), then c closed-loop clients."""
    from kserve import InferenceRESTClient, RESTConfig
    from PIL import Image

    client = InferenceRESTClient(RESTConfig(protocol=protocol, timeout=900, retries=0))
    lat: list[float] = []
    phases: list[dict[str, float]] = []
    batches: list[int] = []

    async def call(seed: int, keep: bool) -> bytes:
        headers: dict[str, str] = {}
        t = time.perf_counter()
        res_ = await client.infer(url, request_for(protocol, image_b64, ids, steps, res, seed), model_name="dynamicid",
                                  response_headers=headers)
        if keep:
            lat.append(time.perf_counter() - t)
            got, batch = parse_server_timing(headers.get("server-timing", ""))
            phases.append(got)
            if batch:
                batches.append(batch)
        return image_of(protocol, res_)

    first = await asyncio.gather(*(call(10_000 + k, False) for k in range(clients)))
    with Image.open(io.BytesIO(first[0])) as im:
        if im.size != (res, res):
            raise RuntimeError(f"{protocol}: the server answered a {im.size} image, asked {res}x{res}")

    async def closed_loop(k: int) -> None:
        for j in range(per_client):
            await call(k * 1000 + j, True)

    with GpuSampler() as gpu:
        start = time.perf_counter()
        await asyncio.gather(*(closed_loop(k) for k in range(clients)))
        wall = time.perf_counter() - start
    await client.close()
    mean = {p: round(1e3 * statistics.fmean(x.get(p, 0.0) for x in phases), 2) for p in REPORTED}
    return {"concurrency": clients, "requests": len(lat), "p50_s": round(statistics.median(lat), 4),
            "p95_s": round(_pct(lat, 0.95), 4), "images_per_s": round(len(lat) / wall, 3),
            "mean_batch": round(statistics.fmean(batches), 2) if batches else None,
            "gpu_busy": gpu.busy_share, "phases_ms": mean}


def run_serve_http(size: str, device: str, levels: list[int], requests: int, steps: int, res: int, ids: int,
                   protocols: list[str], formats: list[str], max_batch: int, reps: int, out: Path, log: Callable,
                   command: str = "", min_per_client: int = 3) -> dict:
    """The whole comparison; writes ``out/serve_http.json`` and ``out/serve_http.md``; returns the result."""
    import datetime as dt

    import torch

    out.mkdir(parents=True, exist_ok=True)
    serve = serve_settings(size, max_batch, levels, steps)
    env = {"size": size, "device": device, "res": res, "steps": steps, "ids": ids, "max_batch": max_batch,
           "levels": levels, "requests_per_cell": requests, "min_per_client": min_per_client,
           "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": command, "serve": serve}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    photo = reference_photo(size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = cache = None
        params = bench_params(size, serve)
        if size == "tiny":  # a fresh checkpoint; the tiny base is built in code into the usual cache
            from model.loading import init_checkpoint

            cache = str(params.storage.cache_dir)
            ckpt = str(init_checkpoint(params.model, params.face, Path(tmp) / "ckpt", cache, seed=1))
        inproc = measure_inprocess(params, ckpt, pipeline_factory(size, device), photo, steps, res, ids, reps, log)
        images = {fmt: encoded(photo, fmt.upper()) for fmt in formats}
        t = time.perf_counter()
        proc, url = start_server(size, device, serve, ckpt, cache, out / "serve_http_server.log")
        log(f"serve_http: server ready in {time.perf_counter() - t:.1f} s at {url}")
        cells = []
        try:
            for protocol in protocols:
                for fmt in formats:
                    for c in levels:
                        per_client = max(min_per_client, math.ceil(requests / c))
                        cell = asyncio.run(run_cell(url, protocol, images[fmt], c, per_client, ids, steps, res))
                        cells.append({"protocol": protocol, "format": fmt, **cell})
                        partial = {"env": env, "in_process": inproc, "cells": cells, "partial": True}
                        (out / "serve_http.json").write_text(json.dumps(partial, indent=2))  # a cut-off run keeps it
                        busy = "n/a" if cell["gpu_busy"] is None else f"{cell['gpu_busy']:.0%}"
                        log(f"serve_http {protocol} {fmt} c={c}: p50 {cell['p50_s']:.3f} s, p95 {cell['p95_s']:.3f} s,"
                            f" {cell['images_per_s']:.2f} img/s, mean batch {cell['mean_batch']}, GPU busy {busy}")
        finally:
            stop_server(proc)
    result = {"section": "serve_http", "env": env, "in_process": inproc, "cells": cells,
              "image_bytes": {fmt: len(base64.b64decode(images[fmt])) for fmt in formats}, "targets_spec": TARGETS}
    result["targets"] = evaluate(inproc, cells)
    (out / "serve_http.json").write_text(json.dumps(result, indent=2))
    (out / "serve_http.md").write_text(markdown(result))
    for t in result["targets"]:
        log(f"serve_http target {t['target']}: {t['measured']} ({t['limit']}) {'PASS' if t['met'] else 'FAIL'}")
    return result


# --------------------------------------------------------------------------- the server process
def child(argv: list[str]) -> None:
    """The benchmark model behind the real server: ``serving.server.serve`` with the pipeline built in code."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_http_bench child")
    p.add_argument("--size", choices=("sd15", "smoke"), required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--serve", default="{}", help="serve.* overrides as JSON")
    a = p.parse_args(argv)
    import logging

    from model.loading import quiet_hf_progress
    from serving.server import serve

    logging.basicConfig(level=logging.INFO)
    quiet_hf_progress()  # as `dynamicid serve` is: its weights are built here, not loaded, so nothing else calls it
    params = bench_params(a.size, {**json.loads(a.serve), "http_port": a.port})
    serve(params, pipeline_factory=pipeline_factory(a.size, a.device))


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        sys.exit("usage: python -m benchmarks.serve_http_bench child ... (the benchmark itself: "
                 "python -m benchmarks.run --sections serve_http)")
    child(sys.argv[2:])

"""The KServe predictor: a ``kserve.Model`` that serves DynamicID over the v1 and v2 protocols.

Life cycle: the server starts listening at once (liveness answers), ``start_engine`` loads the
pipeline and runs one warm-up generation on the model thread, and only then ``ready`` turns true
(model and server readiness both read it). ``load()`` does the same synchronously for callers
that want KServe's load-before-serve pattern.

A request goes: admission (503 past serve.max_queue) -> validation and image decoding (a worker
thread, 4xx naming the field) -> face analysis + encoding (the encode thread; a bad photo fails
here, alone) -> the batcher (same size/steps/identity count/guidance mode share a UNet batch) ->
denoising on the model thread -> PNG encoding. The whole request runs under serve.request_timeout_s
(504), and a batch whose requests all timed out is stopped at the next denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from kserve import InferRequest, Model

from serving.batching import AdmissionGate, Batcher
from serving.errors import FieldNamer, ServingError, bad_request, overloaded, timed_out
from serving.images import encode_png
from serving.metrics import ServingMetrics
from serving.protocol import V2_INPUTS, V2_OUTPUTS, v1_instances, v1_response, v2_instance, v2_response
from serving.schema import Limits, RequestSchema
from serving.timing import RequestTiming, timed
from serving.timing import current as current_timing

log = logging.getLogger(__name__)


class DynamicIDModel(Model):
    def __init__(self, params, model_uri: str | None = None, metrics: ServingMetrics | None = None,
                 pipeline_factory: Callable[[], Any] | None = None) -> None:
        super().__init__(params.serve.model_name)
        self.pipeline_factory = pipeline_factory  # None: load model_uri (a benchmark builds its model in code)
        self.params = params
        self.serve = params.serve
        self.model_uri = model_uri or params.serve.model_uri
        self.limits = Limits.from_params(params)
        self.schema = RequestSchema(self.limits)
        self.metrics = metrics or ServingMetrics(self.name, self.serve.max_batch_size)
        self.gate = AdmissionGate(self.serve.max_queue)
        self._preparing = 0  # admitted instances still in validation / encoding (event loop only)
        self.batcher = Batcher(self._run_batch, self.serve.max_batch_size, self.serve.batch_window_ms / 1000.0,
                               on_batch=self.metrics.batch, expected=lambda: self._preparing)
        # Model work off the event loop (health checks stay responsive), on two threads: loading
        # and denoising batches on one (one model, one device, one batch at a time), face analysis
        # + identity encoding of the next requests on the other, so that work overlaps a running
        # batch and the next batch is full when it starts. torch's per-thread CPU thread count is
        # set in each.
        threads = (self.serve.cpu_threads,)
        self._model_thread = ThreadPoolExecutor(1, "dynamicid-model", initializer=_set_threads, initargs=threads)
        self._encode_thread = ThreadPoolExecutor(1, "dynamicid-encode", initializer=_set_threads, initargs=threads)
        self._load_lock = threading.Lock()
        self._engine = None
        self.checkpoint: Path | None = None
        self.engine = True  # kserve: start_engine() is part of the server's start, stop_engine() of its stop

    # ------------------------------------------------------------------ life cycle
    def load(self) -> bool:
        if self.ready:
            return True
        if not self._load_lock.acquire(blocking=False):  # a load is already under way
            return False
        try:
            from components.core.runtime import pipeline_from_params
            from serving.engine import Engine
            from serving.model_store import resolve_model_dir

            t = time.perf_counter()
            if self.pipeline_factory is not None:
                pipe = self.pipeline_factory()
            else:
                self.checkpoint = resolve_model_dir(self.params, self.model_uri)
                pipe = pipeline_from_params(self.params, self.checkpoint)
            pipe.set_progress(False)
            if self.serve.fast_path != "off":
                from model.fast.enable import enable_fast_path

                res = self.limits.resolution
                enable_fast_path(pipe, mode=self.serve.fast_path,
                                 buckets=[(res, res, n) for n in range(min(2, self.params.model.max_ids) + 1)])
            engine = Engine(pipe, self.metrics)
            loaded = time.perf_counter() - t
            warm = 0.0
            if self.serve.warmup:
                lim = self.limits
                warm = engine.warm_up(lim.resolution, lim.resolution, lim.default_guidance)
                if pipe.device.type == "cuda" and self.serve.fast_path != "off":
                    try:  # graphs for every batch size the batcher can form, before traffic
                        engine.warm_batches(lim.resolution, lim.resolution, lim.default_guidance,
                                            self.serve.max_batch_size)
                    except Exception as err:  # noqa: BLE001 - such a batch then captures on first use
                        log.warning("warm-up of batch sizes 2..%d failed (%s: %s)", self.serve.max_batch_size,
                                    type(err).__name__, err)
                    warm = time.perf_counter() - t - loaded
            self._engine = engine
            self.ready = True
            log.info("model %s ready: checkpoint %s on %s, loaded in %.1f s, warm-up %.1f s", self.name,
                     self.checkpoint, pipe.device, loaded, warm)
        finally:
            self._load_lock.release()
        return self.ready

    async def start_engine(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._model_thread, self.load)

    def stop_engine(self) -> None:
        self.ready = False
        self._encode_thread.shutdown(wait=False, cancel_futures=True)
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def healthy(self) -> bool:
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [dict(v) for v in V2_INPUTS.values()]

    def get_output_types(self) -> list[dict]:
        return [dict(v) for v in V2_OUTPUTS.values()]

    # ------------------------------------------------------------------ serving
    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | Any:
        protocol = "v2" if isinstance(payload, InferRequest) else "v1"
        timing = current_timing()  # opened by serving.timing's middleware for HTTP calls
        try:
            if not self.ready:  # the HTTP endpoints check readiness first; this guards direct callers
                raise ServingError(503, "not_ready", "the model is still loading",
                                   headers={"Retry-After": str(self.serve.retry_after_s)})
            if protocol == "v2":
                instances: list[tuple[Any, FieldNamer]] = [v2_instance(payload)]
            else:
                instances = v1_instances(payload)
            if timing is not None:  # body read, JSON, KServe's decoding and our protocol mapping
                timing.set("parse", time.perf_counter() - timing.arrival)
            self.metrics.request(protocol, len(instances))
            predictions = await self._admitted(instances, timing)
        except ServingError as err:
            self.metrics.error(err.reason, err.status)
            raise
        except Exception:
            self.metrics.error("internal", 500)
            raise
        self.metrics.images.labels(self.name).inc(len(predictions))
        if timing is not None:  # from here to the response's start: serialise
            timing.marks["predicted"] = time.perf_counter()
        if protocol == "v2":
            return v2_response(payload, predictions[0], self.name)
        return v1_response(predictions)

    async def _admitted(self, instances: list[tuple[Any, FieldNamer]],
                        timing: RequestTiming | None = None) -> list[dict[str, Any]]:
        n = len(instances)
        if n > self.gate.capacity:
            raise bad_request("too_many_instances", f"{n} instances in one request, at most {self.gate.capacity} "
                              "(serve.max_queue)", "instances")
        if not self.gate.try_acquire(n):
            raise overloaded(self.gate.capacity, self.serve.retry_after_s)
        self._depth()
        t = time.perf_counter()
        deadline = time.monotonic() + self.serve.request_timeout_s
        try:
            async with asyncio.timeout(self.serve.request_timeout_s):
                return await self._all(instances, deadline, timing)
        except TimeoutError:
            raise timed_out(self.serve.request_timeout_s) from None
        finally:
            self.gate.release(n)
            self._depth()
            self.metrics.observe("total", time.perf_counter() - t)

    async def _all(self, instances: list[tuple[Any, FieldNamer]], deadline: float,
                   timing: RequestTiming | None) -> list[dict[str, Any]]:
        """Instances run concurrently; only the first one's phases go into ``timing`` (disjoint intervals)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._one(raw, namer, deadline, timing if k == 0 else None))
                         for k, (raw, namer) in enumerate(instances)]
        except BaseExceptionGroup as group:  # one bad instance fails the request; name the first problem
            first = next((e for e in group.exceptions if isinstance(e, ServingError)), group.exceptions[0])
            raise first from None
        return [t.result() for t in tasks]

    async def _one(self, raw: Any, namer: FieldNamer, deadline: float,
                   timing: RequestTiming | None = None) -> dict[str, Any]:
        from serving.engine import BatchExpired, Job

        loop = asyncio.get_running_loop()
        self._preparing += 1  # the batcher holds its window for this one only while it is on its way
        try:
            t = time.perf_counter()
            req = await asyncio.to_thread(self.schema.parse, raw, namer, timing)
            now = time.perf_counter()
            self.metrics.observe("validation", now - t)
            if timing is not None:  # the thread hop counts as validation; image decoding is its own phase
                timing.set("validation", now - t - timing.phases.get("image_decode", 0.0))
                timing.marks["encode_submitted"] = now
            engine = self._engine
            ids, encoded = await loop.run_in_executor(self._encode_thread, engine.encode, req, timing)
            job = Job(request=req, identities=ids, encoded=encoded, deadline=deadline, timing=timing)
        finally:
            self._preparing -= 1
            self.batcher.nudge()  # a group held for this request may go now (it failed, or it is here)
        queued = time.monotonic()
        if timing is not None:
            timing.marks["batch_submitted"] = time.perf_counter()
        self._depth()
        try:
            result = await self.batcher.submit(req.batch_key, job)
        except BatchExpired:  # the engine stopped the batch a moment before our own timer fired
            raise timed_out(self.serve.request_timeout_s) from None
        if job.started is not None:
            self.metrics.observe("queue", job.started - queued)
        if timing is not None:
            timing.since("postprocess", "batch_done")
        with timed(timing, "png_encode"):  # off the event loop: other requests' work goes on meanwhile
            png = await asyncio.to_thread(encode_png, result.image)
            out = {"image": png, "seed": result.seed, "identities": result.identities, "layout": result.layout}
            if result.layout_maps is not None:
                out["layout_maps"] = await asyncio.to_thread(encode_png, result.layout_maps)
        return out

    async def on_encode_thread(self, fn: Any, *args: Any) -> Any:
        """``fn(pipe, *args)`` on the encode thread, which owns the face analyzer (the playground's face
        check queues behind request encodes instead of racing them for it)."""
        engine = self._engine

        def run() -> Any:
            with engine.gpu_exclusive():
                return fn(engine.pipe, *args)
        return await asyncio.get_running_loop().run_in_executor(self._encode_thread, run)

    async def _run_batch(self, key: tuple, jobs: list) -> list:
        self._depth()
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self._engine.generate, key, jobs)

    def _depth(self) -> None:
        self.metrics.depth(self.gate.in_use, self.batcher.pending)


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


__all__ = ["DynamicIDModel"]

"""Everything that touches the model, run off the event loop on two threads.

- ``encode`` (the encode thread): one request's identities -> ID tokens (face analysis +
  encoders). Runs per request, before batching, so a request whose reference photo has no face
  fails alone with a 400 that names the identity and never enters a batch; and it overlaps the
  batch running on the model thread.
- ``generate`` (the model thread): one batch of encoded requests with the same key -> images,
  through the pipeline's own batched ``__call__`` (per-sample prompt, negative prompt, seed,
  guidance and id_scale: a float per request, or one per person where a person gives their own).
  The two threads share only modules whose forward is pure (the text encoder); torch's grad mode
  is per thread; the face analyzer and its clock belong to the encode thread, the UNet/VAE hooks
  and their clock to the model thread.
- Stage latencies (face analysis, encoding, denoising, decode) come from a timing wrapper around
  the face analyzer and forward hooks on the UNet and the VAE decoder, so the pipeline code stays
  untouched; on CUDA the hooks synchronise at stage boundaries so GPU time lands in the right stage.
- A batch whose requests have all passed their deadline stops at the next UNet step instead of
  keeping the GPU busy for nobody.
- A job carrying its request's ``RequestTiming`` (serving/timing.py) gets the same stage times as
  per-request phases: every request of a batch waited for the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from model.pipeline import EncodedIdentities, GenerationError, IdentityInput
from serving.errors import ServingError, bad_request
from serving.metrics import ServingMetrics
from serving.schema import GenerationRequest, identity_index
from serving.timing import RequestTiming

log = logging.getLogger(__name__)


class BatchExpired(RuntimeError):
    """Every request of the running batch is past its deadline."""


@dataclass
class Job:
    """An encoded request waiting for (or in) a denoising batch."""

    request: GenerationRequest
    identities: list[IdentityInput]
    encoded: EncodedIdentities
    deadline: float                       # time.monotonic() after which nobody waits for it
    started: float | None = None          # when its batch started (queue-time metric)
    timing: RequestTiming | None = None   # its request's phases (serving.timing), when timed


@dataclass
class GenerationResult:
    image: Any                            # PIL.Image
    seed: int
    identities: list[dict[str, Any]]      # [{"region": [y0, x0, y1, x1], "edited": bool}]
    layout: str = "boxes"                 # the layout used: boxes | strips | auto
    layout_maps: Any = None               # PIL.Image of the auto layout's maps and regions, when asked


@dataclass
class _BatchClock:
    deadlines: list[float]
    denoise_start: float | None = None
    decode_start: float | None = None
    decode_end: float | None = None


@dataclass
class _FaceClock:
    seconds: float = 0.0


class TimedAnalyzer:
    """The pipeline's face analyzer, timed: what the pipeline spends in detection, landmarks and
    the identity embedding is the face-analysis stage."""

    def __init__(self, inner: Any, clock: _FaceClock) -> None:
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name: str) -> Any:  # embedding_dim, landmark_count, ...
        return getattr(self._inner, name)

    def _timed(self, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._clock.seconds += time.perf_counter() - t

    def detect(self, image: np.ndarray):
        return self._timed(self._inner.detect, image)

    def embed_aligned(self, crop: np.ndarray):
        return self._timed(self._inner.embed_aligned, crop)

    def analyze_aligned(self, crop: np.ndarray):
        return self._timed(self._inner.analyze_aligned, crop)


class Engine:
    """A loaded DynamicIDPipeline plus timing/cancellation hooks. ``encode`` is called from one
    thread and ``generate`` from one other thread (see the module docstring)."""

    def __init__(self, pipe, metrics: ServingMetrics | None = None) -> None:
        self.pipe = pipe
        self.metrics = metrics
        self._face = _FaceClock()
        self._batch: _BatchClock | None = None
        pipe.face_analyzer = TimedAnalyzer(pipe.analyzer(), self._face)
        self._cuda = pipe.device.type == "cuda"
        hooks = getattr(pipe.step_runner, "step_hooks", None)
        if hooks is not None:  # the fast path: its captured steps replay without calling the UNet's module hooks
            hooks.append(self._on_unet_step)
        else:
            pipe.unet.register_forward_pre_hook(self._on_unet_step)
        pipe.vae.decoder.register_forward_pre_hook(self._on_decode_start)
        pipe.vae.decoder.register_forward_hook(self._on_decode_end)

    # ------------------------------------------------------------------ hooks
    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize(self.pipe.device)
        return time.perf_counter()

    def _on_unet_step(self, *_: Any) -> None:
        """Before every UNet step: the fast path's step hook (called before any graph capture or replay), or,
        without the fast path, a forward pre-hook on the UNet."""
        clock = self._batch
        if clock is None:
            return
        if clock.denoise_start is None:
            clock.denoise_start = self._now()
        if clock.deadlines and time.monotonic() > max(clock.deadlines):
            raise BatchExpired(f"all {len(clock.deadlines)} requests of the batch passed their deadline")

    def _on_decode_start(self, module, args) -> None:
        if self._batch is not None:
            self._batch.decode_start = self._now()

    def _on_decode_end(self, module, args, output) -> None:
        if self._batch is not None:
            self._batch.decode_end = self._now()

    def _observe(self, stage: str, seconds: float | None) -> None:
        if self.metrics is not None and seconds is not None:
            self.metrics.observe(stage, seconds)

    def gpu_exclusive(self) -> contextlib.AbstractContextManager:
        """Held around GPU work off the model thread: the fast path's ``capture_lock`` (a CUDA graph capture
        on the model thread fails if another thread touches the GPU meanwhile), or nothing without one."""
        lock = getattr(self.pipe.step_runner, "capture_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ per request
    def encode(self, req: GenerationRequest, timing: RequestTiming | None = None
               ) -> tuple[list[IdentityInput], EncodedIdentities]:
        """Face analysis + encoders for one request; a bad identity raises a 400 naming it. With a
        ``timing``: its encode_wait (since its ``encode_submitted`` mark), face_analysis and id_encoding."""
        if timing is not None:
            timing.since("encode_wait", "encode_submitted")
        ids = [IdentityInput(image=i.image, bbox=i.bbox, expression=i.expression, driving_image=i.driving_image,
                             landmarks=i.landmarks) for i in req.identities]
        self._face.seconds = 0.0
        t = time.perf_counter()
        try:
            with self.gpu_exclusive():  # never while the model thread captures a CUDA graph
                self.pipe.validate(ids, req.height, req.width)
                _check_layout(ids, req)
                encoded = self.pipe.encode_identities(ids)
                total = self._now() - t  # a device synchronise on CUDA: inside the lock as well
        except GenerationError as err:
            raise _identity_error(str(err), req) from None
        self._observe("face_analysis", self._face.seconds)
        self._observe("encoding", total - self._face.seconds)
        if timing is not None:
            timing.set("face_analysis", self._face.seconds)
            timing.set("id_encoding", total - self._face.seconds)
        return ids, encoded

    # ------------------------------------------------------------------ per batch
    def generate(self, key: tuple, jobs: Sequence[Job]) -> list[GenerationResult]:
        """One pipeline call for jobs sharing ``key`` = (height, width, steps, n_ids, cfg)."""
        height, width, steps = key[0], key[1], key[2]
        reqs = [j.request for j in jobs]
        clock = _BatchClock(deadlines=[j.deadline for j in jobs])
        now = time.monotonic()
        for j in jobs:
            j.started = now
        self._batch = clock
        t = time.perf_counter()
        for j in jobs:
            if j.timing is not None:
                j.timing.set("batch_wait", t - j.timing.marks.get("batch_submitted", t))
        try:
            out = self.pipe(
                [r.prompt for r in reqs], [j.identities for j in jobs],
                negative_prompt=[r.negative_prompt for r in reqs], num_inference_steps=steps,
                guidance_scale=[r.guidance_scale for r in reqs], id_scale=[r.id_scales for r in reqs],
                height=height, width=width, seed=[r.seed for r in reqs],
                encoded=[j.encoded for j in jobs] if jobs[0].identities else None,
                layout=reqs[0].layout,  # one layout per batch: it is part of the batch key
            )
        finally:
            self._batch = None
        if clock.denoise_start is not None and clock.decode_start is not None:
            self._observe("denoising", clock.decode_start - clock.denoise_start)
        if clock.decode_start is not None and clock.decode_end is not None:
            self._observe("decode", clock.decode_end - clock.decode_start)
        _time_jobs(jobs, t, clock)
        log.debug("batch of %d (%dx%d, %d steps) in %.3f s", len(jobs), width, height, steps, time.perf_counter() - t)
        return [
            GenerationResult(image=img, seed=seed,
                             identities=[{"region": r.region, "edited": r.edited} for r in results],
                             layout=out.layout,
                             layout_maps=_maps_image(out, j, img.size) if jobs[j].request.layout_maps else None)
            for j, (img, seed, results) in enumerate(zip(out.images, out.seeds, out.identities))
        ]

    # ------------------------------------------------------------------ warm-up
    def warm_up(self, height: int, width: int, guidance_scale: float) -> float:
        """One small generation through every part the requests use (face detector, CLIP image
        encoder, face encoder, IMR, text encoder, UNet with SAA, VAE decoder); returns seconds."""
        from model.dynamicid import clip_image_features

        t = time.perf_counter()
        pipe = self.pipe
        pipe.analyzer().detect(np.zeros((64, 64, 3), dtype=np.uint8))      # loads the detector's models
        s = pipe.backbone.image_size
        with torch.no_grad():
            feats = clip_image_features(pipe.backbone, torch.zeros(1, 3, s, s, device=pipe.device))[0]  # [L, C]
        emb = np.full(pipe.dims.id_dim, pipe.dims.id_dim ** -0.5, dtype=np.float32)                  # unit norm
        ident = IdentityInput(embedding=emb, clip_features=feats, expression="smiling")
        pipe("warm-up", [ident], num_inference_steps=1, guidance_scale=guidance_scale, height=height, width=width,
             seed=0)
        self._warm_ident = ident
        return time.perf_counter() - t

    def warm_batches(self, height: int, width: int, guidance_scale: float, max_batch: int) -> list[int]:
        """One short generation per batch size 2..max_batch (1 identity, after ``warm_up``): CUDA graphs
        are captured per shape, and without this the first request to land in a batch of a new size
        pays its capture in the middle of traffic. Each runs one step past SAA's early-step boost, so
        both of a shape's graphs (boost on, boost off) are captured: with one step only the boost-on
        graph was, and the first real request of each size captured the other mid-traffic (seen on
        an H100, 2026-12-05). Returns the sizes warmed."""
        ident = self._warm_ident
        sizes = list(range(2, max_batch + 1))
        steps = self.pipe.model_params.saa.boost_steps + 1
        for b in sizes:
            self.pipe(["warm-up"] * b, [[ident]] * b, negative_prompt=[""] * b, num_inference_steps=steps,
                      guidance_scale=[guidance_scale] * b, height=height, width=width, seed=list(range(b)))
        return sizes


def _time_jobs(jobs: Sequence[Job], start: float, clock: _BatchClock) -> None:
    """The batch's phases into each timed job: every request of a batch waited for all of it."""
    setup = denoise = decode = None
    if clock.denoise_start is not None:
        setup = clock.denoise_start - start
        if clock.decode_start is not None:
            denoise = clock.decode_start - clock.denoise_start
            if clock.decode_end is not None:
                decode = clock.decode_end - clock.decode_start
    for j in jobs:
        if j.timing is not None:
            j.timing.set("batch_setup", setup)
            j.timing.set("denoising", denoise)
            j.timing.set("vae_decode", decode)
            j.timing.batch_size = len(jobs)
            j.timing.marks["batch_done"] = clock.decode_end or time.perf_counter()


_TARGET_FIELD = re.compile(r"identity \d+: (driving_image|landmarks): ")


def _check_layout(ids: list[IdentityInput], req: GenerationRequest) -> None:
    """A layout the request cannot use (with bboxes, too many people for auto) fails alone, with a 400."""
    from model.saa.auto_run import resolve_layout

    try:
        resolve_layout([ids], req.layout)
    except ValueError as err:
        raise bad_request("invalid_field", str(err), req.field("layout")) from None


def _maps_image(out, j: int, size: tuple[int, int]):
    """Image j's auto-layout maps and regions as a picture (None unless the layout was auto)."""
    from model.saa.auto_run import render_layout

    if out.layout_maps is None:
        return None
    return render_layout(out.layout_maps[j], [r.region for r in out.identities[j]], size)


def _identity_error(message: str, req: GenerationRequest) -> ServingError:
    """A pipeline error ("identity 1: driving_image: no face found") -> a 400 naming the field it is about."""
    i = identity_index(message)
    target = _TARGET_FIELD.match(message)
    if target and i is not None:
        name = target.group(1)
        face = "no_face" if "face" in message.lower() else "bad_identity"
        reason = "bad_landmarks" if name == "landmarks" else face
        return bad_request(reason, message[target.end():], req.field(f"identities[{i}].{name}"))
    reason = "no_face" if "face" in message.lower() else "bad_identity"
    field = req.field(f"identities[{i}]") if i is not None else req.field("identities")
    text = message.split(": ", 1)[1] if message.startswith("identity ") and ": " in message else message
    return bad_request(reason, text, field)


__all__ = ["Engine", "Job", "GenerationResult", "BatchExpired", "TimedAnalyzer"]

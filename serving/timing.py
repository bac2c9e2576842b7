"""Per-request phase timing: where a served request's time goes between its arrival and its response.

Why: the in-process benchmarks time the engine, but a client also waits for HTTP, JSON, base64,
the encode thread, the batch window and PNG encoding. Each predict request carries one
``RequestTiming``; every stage adds its own duration (``time.perf_counter``, monotonic) on
whichever thread runs it, and the outermost ASGI middleware (``PhaseTimingMiddleware``) opens it
when the request reaches the app and closes it when the response starts, so ``parse`` (body
read, JSON and KServe's decoding, before the predictor) and ``serialise`` (the response object and
its JSON, after it) are counted too. The phases are disjoint intervals of one request, so their
sum never exceeds ``total``; ``other`` is the rest (thread hand-offs, event-loop waits).

The middleware hands the object to the predictor through a context variable: it runs in the
same task as the route (or in a child task, which copies the context), and the predictor's
threads get it as an argument. Cost per request: a dict of ~13 floats and as many histogram
observations; the optional ``Server-Timing`` header (``serve.server_timing``) lets a client
(the HTTP benchmark, a browser's network panel) read one request's phases.
"""

from __future__ import annotations

import contextvars
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# In request order. Per request; the batch phases (batch_setup, denoising, vae_decode) are those
# of the batch the request was in, so requests of one batch report the same values.
PHASES = (
    "parse",          # arrival -> predictor: body read, JSON parsing, KServe's v1/v2 decoding
    "validation",     # schema checks of the instance (worker thread hop included), images excluded
    "image_decode",   # base64 + header checks + pixel decoding of the request's images
    "encode_wait",    # waiting for the encode thread (it serves one request at a time)
    "face_analysis",  # detection, landmarks, identity embedding
    "id_encoding",    # the rest of identity encoding: crops, CLIP image encoder, face encoder, IMR
    "batch_wait",     # encoded -> its batch starts on the model thread (window + the running batch)
    "batch_setup",    # batch start -> first UNet step: prompts, latents, masks, keys/values
    "denoising",      # first UNet step -> VAE decoder
    "vae_decode",     # the VAE decoder
    "postprocess",    # after the decoder: image to host / PIL, results, back to the event loop
    "png_encode",     # the response image(s) as base64 PNG
    "serialise",      # predictor done -> response starts: response object and its JSON
)
REPORTED = PHASES + ("other", "total")

_CURRENT: contextvars.ContextVar["RequestTiming | None"] = contextvars.ContextVar("dynamicid_timing", default=None)


@dataclass
class RequestTiming:
    """Phase durations (seconds) and a few absolute stamps of one request."""

    arrival: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None
    end: float | None = None

    def add(self, phase: str, seconds: float) -> None:
        """Accumulate (a request may decode several images)."""
        self.phases[phase] = self.phases.get(phase, 0.0) + max(0.0, seconds)

    def set(self, phase: str, seconds: float | None) -> None:
        """Overwrite (a batch retried one by one reports the run that answered)."""
        if seconds is not None:
            self.phases[phase] = max(0.0, seconds)

    def since(self, phase: str, mark: str, now: float | None = None) -> float:
        """Add the time since ``marks[mark]`` to ``phase`` (nothing if the mark is missing); returns now."""
        now = time.perf_counter() if now is None else now
        if mark in self.marks:
            self.add(phase, now - self.marks[mark])
        return now

    def finish(self) -> dict[str, float]:
        """Closes the request (once) and returns every reported phase, ``other`` and ``total`` included."""
        if self.end is None:
            self.end = time.perf_counter()
            if "predicted" in self.marks:
                self.set("serialise", self.end - self.marks["predicted"])
        total = self.end - self.arrival
        out = {p: self.phases[p] for p in PHASES if p in self.phases}
        out["other"] = max(0.0, total - sum(out.values()))
        out["total"] = total
        return out

    def header(self) -> str:
        """The ``Server-Timing`` value: ``phase;dur=<ms>`` per phase, and the batch size."""
        parts = [f"{p};dur={s * 1e3:.3f}" for p, s in self.finish().items()]
        if self.batch_size is not None:
            parts.append(f'batch;desc="{self.batch_size}"')
        return ", ".join(parts)


def current() -> RequestTiming | None:
    return _CURRENT.get()


@contextmanager
def timed(timing: RequestTiming | None, phase: str) -> Iterator[None]:
    """Accumulate the block's duration into ``phase`` (a no-op without a timing)."""
    if timing is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        timing.add(phase, time.perf_counter() - t)


_TIMED_PATHS = re.compile(r"(:predict|/infer)$")


class PhaseTimingMiddleware:
    """Outermost middleware: opens a RequestTiming for predict/infer calls and, when a 200 response
    starts, reports it to ``observe`` and (when ``header``) as a ``Server-Timing`` header."""

    def __init__(self, app: ASGIApp, observe: Callable[[RequestTiming], None], header: bool = False) -> None:
        self.app = app
        self.observe = observe
        self.header = header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _TIMED_PATHS.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        timing = RequestTiming()
        token = _CURRENT.set(timing)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                timing.finish()
                self.observe(timing)
                if self.header:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"server-timing", timing.header().encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            _CURRENT.reset(token)


def parse_server_timing(value: str) -> tuple[dict[str, float], int | None]:
    """A ``Server-Timing`` value as this server writes it -> ({phase: seconds}, batch size)."""
    phases: dict[str, float] = {}
    batch = None
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        m = re.search(r"dur=([0-9.]+)", rest)
        if m:
            phases[name] = float(m.group(1)) / 1e3
        d = re.search(r'desc="?(\d+)', rest)
        if name == "batch" and d:
            batch = int(d.group(1))
    return phases, batch


__all__ = ["PHASES", "REPORTED", "RequestTiming", "current", "timed", "PhaseTimingMiddleware",
           "parse_server_timing"]

"""Prometheus metrics of the model server, next to the ones KServe already exports on /metrics
(request_preprocess/predict/postprocess_seconds per model).

One object owns them, bound to a registry passed in: the server uses prometheus_client's default
registry (the one KServe's /metrics handler exposes); tests can use a fresh CollectorRegistry.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("validation", "queue", "face_analysis", "encoding", "denoising", "decode", "total")
# Diffusion latencies span milliseconds (tiny CPU model, validation) to minutes (SD1.5, many steps).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
# Phases go down to sub-millisecond host work (parsing, PNG encoding of a small image).
PHASE_BUCKETS = (0.0005, 0.001, 0.0025) + LATENCY_BUCKETS


class ServingMetrics:
    def __init__(self, model_name: str, max_batch_size: int, registry: CollectorRegistry = REGISTRY) -> None:
        self.model_name = model_name
        labels = ["model_name"]
        self.requests = Counter("dynamicid_requests", "inference requests received (v1 instances count one each)",
                                labels + ["protocol"], registry=registry)
        self.errors = Counter("dynamicid_request_errors", "requests answered with an error, by reason",
                              labels + ["reason", "status"], registry=registry)
        self.images = Counter("dynamicid_images_generated", "images returned", labels, registry=registry)
        self.in_flight = Gauge("dynamicid_queue_depth", "admitted requests in flight or queued (bounded by "
                               "serve.max_queue)", labels, registry=registry)
        self.in_flight_peak = Gauge("dynamicid_queue_depth_peak", "highest dynamicid_queue_depth since the server "
                                    "started (a scrape can miss a short burst; this cannot)", labels,
                                    registry=registry)
        self._peak = 0
        self.waiting = Gauge("dynamicid_batch_queue_depth", "encoded requests waiting for a denoising batch",
                             labels, registry=registry)
        self.batch_size = Histogram("dynamicid_batch_size", "requests per denoising batch", labels,
                                    buckets=tuple(range(1, max_batch_size + 1)), registry=registry)
        self.stage = Histogram("dynamicid_stage_seconds", "latency per stage (per request; per batch for "
                               "denoising and decode)", labels + ["stage"], buckets=LATENCY_BUCKETS,
                               registry=registry)
        self.phase = Histogram("dynamicid_phase_seconds", "per request, arrival to response, by phase "
                               "(serving.timing: disjoint intervals; other = the rest, total = all)",
                               labels + ["phase"], buckets=PHASE_BUCKETS, registry=registry)

    def request(self, protocol: str, n: int = 1) -> None:
        self.requests.labels(self.model_name, protocol).inc(n)

    def error(self, reason: str, status: int) -> None:
        self.errors.labels(self.model_name, reason, str(status)).inc()

    def observe(self, stage: str, seconds: float) -> None:
        self.stage.labels(self.model_name, stage).observe(seconds)

    def phases(self, timing) -> None:
        """Every phase of one answered request (a serving.timing.RequestTiming)."""
        for phase, seconds in timing.finish().items():
            self.phase.labels(self.model_name, phase).observe(seconds)

    def batch(self, size: int) -> None:
        self.batch_size.labels(self.model_name).observe(size)

    def depth(self, in_flight: int, waiting: int) -> None:
        self.in_flight.labels(self.model_name).set(in_flight)
        if in_flight > self._peak:
            self._peak = in_flight
            self.in_flight_peak.labels(self.model_name).set(in_flight)
        self.waiting.labels(self.model_name).set(waiting)


__all__ = ["ServingMetrics", "STAGES", "LATENCY_BUCKETS", "PHASE_BUCKETS"]

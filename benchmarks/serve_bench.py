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

"""A small HTTP client for the model server (``dynamicid infer``): plain httpx, both protocols.

Only files named on the client's command line are read, and their bytes are sent base64-encoded:
the server never opens paths or URLs on a caller's behalf.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

V2_PASSTHROUGH = ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "id_scale", "height", "width")


class ClientError(RuntimeError):
    """The call failed; the message carries the server's answer (status, reason, field)."""


def b64_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise ClientError(f"{p}: no such file")
    return base64.b64encode(p.read_bytes()).decode("ascii")


def build_instance(prompt: str, id_images: list[str], bboxes: list[tuple[float, ...] | None] | None = None,
                   expressions: list[str | None] | None = None, driving_images: list[str | None] | None = None,
                   landmarks: list[list[list[float]] | None] | None = None,
                   id_scales: list[float | None] | None = None, **options: Any) -> dict[str, Any]:
    """A v1 instance from files (``landmarks``: already loaded [x, y] lists; ``id_scales``: each
    person's own identity scale, None for the instance's); ``options`` with value None are left to
    the server's defaults."""
    identities = []
    for i, path in enumerate(id_images):
        ident: dict[str, Any] = {"image": b64_file(path)}
        if bboxes and i < len(bboxes) and bboxes[i] is not None:
            ident["bbox"] = list(bboxes[i])
        if expressions and i < len(expressions) and expressions[i]:
            ident["expression"] = expressions[i]
        if driving_images and i < len(driving_images) and driving_images[i]:
            ident["driving_image"] = b64_file(driving_images[i])
        if landmarks and i < len(landmarks) and landmarks[i]:
            ident["landmarks"] = landmarks[i]
        if id_scales and i < len(id_scales) and id_scales[i] is not None:
            ident["id_scale"] = id_scales[i]  # per-identity fields other than images travel in v2's parameters
        identities.append(ident)
    return {"prompt": prompt, "identities": identities, **{k: v for k, v in options.items() if v is not None}}


def v2_request(instance: dict[str, Any]) -> dict[str, Any]:
    """The same instance as an open-inference-protocol request (docs/serving.md, tensor mapping)."""
    ids = instance["identities"]
    params = {k: instance[k] for k in V2_PASSTHROUGH if k in instance}
    params["identities"] = [{k: v for k, v in i.items() if k not in ("image", "driving_image", "landmarks")}
                            for i in ids]
    inputs = [
        {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [instance["prompt"]]},
        {"name": "id_images", "datatype": "BYTES", "shape": [len(ids)], "data": [i["image"] for i in ids]},
        {"name": "parameters", "datatype": "BYTES", "shape": [1], "data": [json.dumps(params)]},
    ]
    if any("driving_image" in i for i in ids):
        inputs.append({"name": "driving_images", "datatype": "BYTES", "shape": [len(ids)],
                       "data": [i.get("driving_image", "") for i in ids]})
    sets = [i.get("landmarks") for i in ids]
    if any(sets):
        counts = {len(s) for s in sets if s}
        if len(counts) != 1:
            raise ClientError(f"every person's landmarks must have the same number of points, got {sorted(counts)}")
        n_points = counts.pop()
        flat = [float(v) for s in sets for pt in (s or [[0.0, 0.0]] * n_points) for v in pt]  # zeros: none
        inputs.append({"name": "landmarks", "datatype": "FP32", "shape": [len(ids), n_points, 2], "data": flat})
    return {"inputs": inputs}


def _error(resp) -> ClientError:
    try:
        body = resp.json()
        detail = body.get("error") or body.get("detail") or body
    except ValueError:
        detail = resp.text[:500]
    extra = f" (retry after {resp.headers['retry-after']} s)" if "retry-after" in resp.headers else ""
    return ClientError(f"HTTP {resp.status_code}: {detail}{extra}")


def wait_ready(url: str, model: str, timeout_s: float) -> None:
    """Poll the model's readiness endpoint until it answers 200 (the server may still be loading)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            r = httpx.get(f"{url}/v2/models/{model}/ready", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.TransportError as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise ClientError(f"{url}: model {model!r} not ready after {timeout_s:g} s ({last}); "
                              "is `dynamicid serve` running?")
        time.sleep(0.25)


def predict(url: str, model: str, instance: dict[str, Any], protocol: str = "v1",
            timeout_s: float = 300.0) -> dict[str, Any]:
    """One instance -> {"image": base64 PNG, "seed", "identities"} over v1 or v2."""
    import httpx

    path = f"/v1/models/{model}:predict" if protocol == "v1" else f"/v2/models/{model}/infer"
    body = {"instances": [instance]} if protocol == "v1" else v2_request(instance)
    try:
        resp = httpx.post(url.rstrip("/") + path, json=body, timeout=timeout_s)
    except httpx.TransportError as err:
        raise ClientError(f"{url}: {type(err).__name__}: {err}") from None
    if resp.status_code != 200:
        raise _error(resp)
    data = resp.json()
    if protocol == "v1":
        return data["predictions"][0]
    out = {o["name"]: o["data"][0] for o in data["outputs"]}
    return {"image": out["image"], **json.loads(out["metadata"])}


def write_prediction(prediction: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """PNG to ``out``, seed and identity metadata to ``out`` with a .json suffix."""
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(base64.b64decode(prediction["image"]))
    meta = dest.with_suffix(".json")
    meta.write_text(json.dumps({k: v for k, v in prediction.items() if k != "image"}, indent=2))
    return dest, meta


__all__ = ["ClientError", "build_instance", "v2_request", "wait_ready", "predict", "write_prediction"]

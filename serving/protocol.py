"""The two wire formats, mapped onto one instance dict (serving.schema) and back.

v1 ``POST /v1/models/<name>:predict``: ``{"instances": [instance, ...]}`` ->
``{"predictions": [{"image", "seed", "identities"}, ...]}``.

v2 (open inference protocol) ``POST /v2/models/<name>/infer``, one image per request:

| tensor | datatype | shape | content |
|---|---|---|---|
| ``prompt`` (required) | BYTES | [1] | UTF-8 prompt |
| ``id_images`` (required) | BYTES | [N] | base64 image per identity |
| ``driving_images`` | BYTES | [N] | base64 driving photo (target pose / expression) per identity, "" for none |
| ``landmarks`` | FP32 | [N, L, 2] | target landmarks per identity (x, y pixels of its image), all zeros for none |
| ``parameters`` | BYTES | [1] | JSON object: every other instance field, per-identity ones under "identities" |

outputs: ``image`` BYTES [1] (base64 PNG) and ``metadata`` BYTES [1] (JSON ``{"seed", "identities", "layout"}``,
plus ``"layout_maps"`` when asked).
Images travel as base64 text because KServe's REST decoder turns BYTES elements into UTF-8 strings,
which raw PNG/JPEG bytes are not; base64 works in both the JSON and the binary tensor encodings.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from serving.errors import FieldNamer, bad_request

V2_INPUTS = {
    "prompt": {"name": "prompt", "datatype": "BYTES", "shape": [1]},
    "id_images": {"name": "id_images", "datatype": "BYTES", "shape": [-1]},
    "driving_images": {"name": "driving_images", "datatype": "BYTES", "shape": [-1]},
    "landmarks": {"name": "landmarks", "datatype": "FP32", "shape": [-1, -1, 2]},
    "parameters": {"name": "parameters", "datatype": "BYTES", "shape": [1]},
}
V2_OUTPUTS = {
    "image": {"name": "image", "datatype": "BYTES", "shape": [1]},
    "metadata": {"name": "metadata", "datatype": "BYTES", "shape": [1]},
}
_WIRE_FIELDS = {"prompt": "prompt", "image": "id_images", "driving_image": "driving_images", "landmarks": "landmarks"}
_PER_ID_TENSORS = ("image", "driving_image", "landmarks")  # per-identity fields that travel as tensors


# ---------------------------------------------------------------------------------------- v1
def v1_instances(payload: Any) -> list[tuple[Any, FieldNamer]]:
    """``{"instances": [...]}`` -> [(instance, namer)], namer prefixing ``instances[k].``."""
    if not isinstance(payload, dict):
        raise bad_request("invalid_field", f"expected a JSON object with 'instances', got {type(payload).__name__}",
                          "body")
    extra = sorted(set(payload) - {"instances"})
    if extra:
        raise bad_request("unknown_field", "unknown field; the v1 body has only 'instances'", extra[0])
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise bad_request("invalid_field", "expected a non-empty list of instances", "instances")
    return [(inst, _v1_namer(k)) for k, inst in enumerate(instances)]


def _v1_namer(k: int) -> FieldNamer:
    return lambda path: f"instances[{k}].{path}" if path else f"instances[{k}]"


def v1_response(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"predictions": predictions}


# ---------------------------------------------------------------------------------------- v2
def v2_namer(path: str) -> str:
    """Canonical instance path -> the v2 tensor (or parameters key) it came from."""
    if path in ("prompt", ""):
        return path or "inputs"
    if path == "identities":
        return "id_images"
    if path.startswith("identities["):
        index, _, rest = path[len("identities["):].partition("]")
        rest = rest.lstrip(".")
        if not rest:
            return f"id_images[{index}]"
        head, bracket, tail = rest.partition("[")  # identities[0].landmarks[3][1] -> landmarks[0][3][1]
        if head in _WIRE_FIELDS:
            return f"{_WIRE_FIELDS[head]}[{index}]" + (bracket + tail)
        return f"parameters.identities[{index}].{rest}"
    return f"parameters.{path}"


def _strings(tensor, name: str) -> list[str]:
    if tensor.datatype != "BYTES":
        raise bad_request("invalid_field", f"datatype must be BYTES, got {tensor.datatype}", name)
    shape = list(tensor.shape or [])
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        # numpy would read any negative dimension as "infer it": a request states its real shape
        raise bad_request("invalid_field", f"shape must be non-negative integers, got {str(shape)[:100]}", name)
    try:
        values = np.asarray(tensor.as_numpy(), dtype=object).reshape(-1)
    except (ValueError, TypeError) as err:
        raise bad_request("invalid_field", f"data does not match shape {tensor.shape} ({err})", name) from None
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request("invalid_field", "elements must be UTF-8 text (images: base64)", f"{name}[{i}]") from None
        if not isinstance(v, str):
            raise bad_request("invalid_field", f"elements must be strings, got {type(v).__name__}", f"{name}[{i}]")
        out.append(v)
    return out


def _landmark_sets(tensor, n: int) -> list[list[list[float]] | None]:
    """The ``landmarks`` tensor [N, L, 2] -> one list of [x, y] per identity (None where all zeros)."""
    name = "landmarks"
    if tensor.datatype not in ("FP32", "FP64"):
        raise bad_request("invalid_field", f"datatype must be FP32, got {tensor.datatype}", name)
    shape = list(tensor.shape or [])
    if (len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or shape[0] != n or shape[2] != 2):
        raise bad_request("invalid_field", f"shape must be [{n}, L, 2]: one set of L [x, y] points per id_images "
                          f"element (all zeros for none), got {str(shape)[:100]}", name)
    try:
        values = np.asarray(tensor.as_numpy(), dtype=np.float64).reshape(shape)  # [N, L, 2]
    except (ValueError, TypeError) as err:
        raise bad_request("invalid_field", f"data does not match shape {shape} ({str(err)[:200]})", name) from None
    return [v.tolist() if v.any() else None for v in values]


def v2_instance(request) -> tuple[dict[str, Any], FieldNamer]:
    """An InferRequest -> (instance dict, v2 namer); errors name the tensor."""
    tensors: dict[str, Any] = {}
    for t in request.inputs:
        if t.name not in V2_INPUTS:
            raise bad_request("unknown_field", f"unknown input tensor {t.name!r}; expected {', '.join(V2_INPUTS)}",
                              "inputs")
        if t.name in tensors:
            raise bad_request("invalid_field", f"input tensor {t.name!r} given twice", "inputs")
        tensors[t.name] = t if t.name == "landmarks" else _strings(t, t.name)
    for required in ("prompt", "id_images"):
        if required not in tensors:
            raise bad_request("missing_field", "required input tensor is missing", required)
    if len(tensors["prompt"]) != 1:
        raise bad_request("invalid_field", f"expected one prompt (shape [1]), got {len(tensors['prompt'])}", "prompt")
    images = tensors["id_images"]
    params: dict[str, Any] = {}
    if "parameters" in tensors:
        if len(tensors["parameters"]) != 1:
            raise bad_request("invalid_field", "expected one JSON object (shape [1])", "parameters")
        try:
            params = json.loads(tensors["parameters"][0])
        except (ValueError, RecursionError) as err:  # JSONDecodeError, an int over 4300 digits, deep nesting
            raise bad_request("invalid_field", f"not valid JSON ({type(err).__name__}: {str(err)[:200]})",
                              "parameters") from None
        if not isinstance(params, dict):
            raise bad_request("invalid_field", "must be a JSON object", "parameters")
    for key in ("prompt", "instances"):
        if key in params:
            raise bad_request("unknown_field", "not a parameter (the prompt is the 'prompt' tensor)", f"parameters.{key}")
    per_id = params.pop("identities", None)
    if per_id is None:
        per_id = [{} for _ in images]
    if not isinstance(per_id, list) or len(per_id) != len(images) or not all(isinstance(p, dict) for p in per_id):
        raise bad_request("invalid_field", f"expected a list of {len(images)} objects, one per id_images element",
                          "parameters.identities")
    driving = tensors.get("driving_images")
    if driving is not None and len(driving) != len(images):
        raise bad_request("invalid_field", f"expected {len(images)} elements (one per id_images, '' for none), "
                          f"got {len(driving)}", "driving_images")
    landmarks = _landmark_sets(tensors["landmarks"], len(images)) if "landmarks" in tensors else None
    identities = []
    for i, (image, extra) in enumerate(zip(images, per_id)):
        for key in _PER_ID_TENSORS:
            if key in extra:
                raise bad_request("unknown_field", f"this goes in the {_WIRE_FIELDS[key]} tensor",
                                  f"parameters.identities[{i}].{key}")
        ident = {"image": image, **extra}
        if driving is not None and driving[i]:
            ident["driving_image"] = driving[i]
        if landmarks is not None and landmarks[i] is not None:
            ident["landmarks"] = landmarks[i]
        identities.append(ident)
    return {"prompt": tensors["prompt"][0], **params, "identities": identities}, v2_namer


def v2_response(request, prediction: dict[str, Any], model_name: str):
    from kserve import InferOutput, InferResponse

    meta = json.dumps({k: prediction[k] for k in ("seed", "identities", "layout", "layout_maps") if k in prediction})
    outputs = [
        InferOutput(name="image", shape=[1], datatype="BYTES", data=[prediction["image"]]),
        InferOutput(name="metadata", shape=[1], datatype="BYTES", data=[meta]),
    ]
    return InferResponse(response_id=request.id or str(uuid.uuid4()), model_name=model_name, infer_outputs=outputs,
                         use_binary_outputs=request.use_binary_outputs, requested_outputs=request.request_outputs)


__all__ = ["v1_instances", "v1_response", "v2_instance", "v2_response", "v2_namer", "V2_INPUTS", "V2_OUTPUTS"]

"""Hypothesis strategies for hostile and valid requests to the model server (tests/test_reliability_endpoint.py).

Built from the documented request schema (docs/serving.md, serving/schema.py) and the limits the
server runs with (``serving.schema.Limits``): a valid v1 instance, then one mutation per request
that makes it invalid in exactly one documented way (wrong type, missing or unknown field, out of
range, huge string, bad base64, non-image bytes, a header-only decompression bomb, a URL or path,
nested garbage...), or a mutation of the transport (non-JSON body, wrong content type, oversized
body). The same instances are also sent over v2 (open inference protocol), with v2-only mutations
of the tensors. Each request carries what a correct server must answer: ``valid`` ones 200, the
others a 4xx, with the documented reason where the mutation determines it.

Strategies only pick sizes; big payloads are built with ``str * n`` so that generating 10,000
requests stays cheap (hypothesis would draw a huge string character by character).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import strategies as st

from serving.images import encoded_limit
from serving.schema import SEED_LIMIT, Limits

INSTANCE_FIELDS = ("prompt", "negative_prompt", "identities", "seed", "num_inference_steps", "guidance_scale",
                   "id_scale", "height", "width")
IDENTITY_FIELDS = ("image", "bbox", "expression", "driving_image", "landmarks")
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Context:
    """What the strategies need to know about the server under test."""

    limits: Limits
    face_b64: str                 # a real reference photo (one face), base64
    max_queue: int
    max_body_bytes: int
    max_ids: int


class Request:
    """One request and what a correct server must answer (a plain class, not a dataclass, so that
    hypothesis prints it through ``__repr__``: bodies reach max_body_bytes)."""

    __slots__ = ("protocol", "kind", "body", "headers", "reasons", "status")

    def __init__(self, protocol: str, kind: str, body: bytes, headers: dict[str, str] | None = None,
                 reasons: frozenset[str] | None = None, status: int | None = None) -> None:
        self.protocol = protocol                  # "v1" or "v2"
        self.kind = kind                          # "valid" or the mutation's name
        self.body = body
        self.headers = dict(JSON) if headers is None else headers
        self.reasons = reasons                    # documented reasons a correct answer may carry (None: any 4xx)
        self.status = status                      # exact status, when the mutation determines it

    def __repr__(self) -> str:
        head = self.body[:300].decode("utf-8", "replace")
        return (f"Request({self.protocol}, {self.kind}, {len(self.body)} bytes: {head!r}, headers={self.headers}, "
                f"expect={self.status} {sorted(self.reasons) if self.reasons else 'any 4xx'})")

    @property
    def valid(self) -> bool:
        return self.kind == "valid"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_bomb(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height but holds one empty row: a parser that
    trusted the header would allocate width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    """A GIF header (a format the server does not accept) with a one-pixel image."""
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00\x00\x00\x00\xff\xff\xff"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


@functools.lru_cache(maxsize=16)
def plain_png(width: int, height: int) -> str:
    """A real, decodable, gray PNG (no face), base64; extreme aspect ratios stay within the pixel limit."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buf, format="PNG")
    return b64(buf.getvalue())


def dumps(obj: Any) -> bytes:
    # allow_nan: NaN / Infinity literals are not JSON; the server must refuse them as a bad body
    return json.dumps(obj, allow_nan=True).encode()


# ------------------------------------------------------------------------------------ valid
finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def valid_bbox(draw) -> list[float]:
    y0 = draw(st.floats(0.0, 0.7, **finite))
    x0 = draw(st.floats(0.0, 0.7, **finite))
    return [y0, x0, draw(st.floats(y0 + 0.2, 1.0, **finite)), draw(st.floats(x0 + 0.2, 1.0, **finite))]


@st.composite
def valid_instance(draw, ctx: Context) -> dict[str, Any]:
    """A documented-valid instance with tiny settings (1-2 steps, 64-72 px): fast to generate."""
    lim = ctx.limits
    n_ids = draw(st.integers(1, min(2, ctx.max_ids)))
    identities = []
    for _ in range(n_ids):
        ident: dict[str, Any] = {"image": ctx.face_b64}
        if draw(st.booleans()):
            ident["bbox"] = draw(valid_bbox())
        if draw(st.booleans()):
            ident["expression"] = draw(st.text(min_size=1, max_size=min(20, lim.max_expression_chars)))
        if draw(st.integers(0, 3)) == 0:
            ident["driving_image"] = ctx.face_b64  # a real face: a valid pose / expression target
        identities.append(ident)
    inst: dict[str, Any] = {"prompt": draw(st.text(min_size=1, max_size=min(40, lim.max_prompt_chars))),
                            "identities": identities}
    optional = {
        "negative_prompt": st.text(max_size=20),
        "seed": st.integers(0, SEED_LIMIT - 1),
        "num_inference_steps": st.integers(1, min(2, lim.max_steps)),
        "guidance_scale": st.floats(lim.min_guidance, min(lim.max_guidance, 3.0), **finite),
        "id_scale": st.floats(0.0, lim.max_id_scale, **finite),
        "height": st.sampled_from([lim.min_side, lim.min_side + 8]),
        "width": st.sampled_from([lim.min_side, lim.min_side + 8]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            inst[key] = draw(strategy)
    inst.setdefault("num_inference_steps", 1)  # the default may be more
    return inst


# ------------------------------------------------------------------------------------ garbage
@functools.lru_cache(maxsize=None)
def garbage() -> st.SearchStrategy[Any]:
    """Any JSON value, nested: what a confused or hostile client may put anywhere."""
    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
              | st.text(max_size=20))
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                           max_size=3), max_leaves=6)


@functools.lru_cache(maxsize=None)
def nested() -> st.SearchStrategy[Any]:
    """A list or an object of garbage: no instance field accepts one (identities need objects with a
    real image, which garbage never holds)."""
    return garbage().filter(lambda v: isinstance(v, (list, dict)) and v != [] and v != {})


@functools.lru_cache(maxsize=None)
def wrong_type(kind: type | tuple[type, ...]) -> st.SearchStrategy[Any]:
    """A JSON value that is not of ``kind`` (bools are not ints to a strict schema)."""
    def ok(v: Any) -> bool:
        if kind in (int, (int,)) and isinstance(v, bool):
            return True
        if float in (kind if isinstance(kind, tuple) else (kind,)) and isinstance(v, int) and not isinstance(v, bool):
            return False  # an int is a valid number
        return not isinstance(v, kind)
    return garbage().filter(ok)


def _flat(value: Any) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


def not_strings(value: Any) -> bool:
    """Tensor data that cannot pass as BYTES elements (a flat or nested list of strings could)."""
    flat = _flat(value) if isinstance(value, list) else None
    return not (flat and all(isinstance(x, str) for x in flat))


# A mutation: (name, strategy of a function instance -> instance, expected reasons, expected status)
Mutation = tuple[str, Callable[[Context], st.SearchStrategy[Callable[[dict], dict]]], frozenset[str] | None,
                 int | None]


def _set(path: tuple, value: Any) -> Callable[[dict], dict]:
    def apply(inst: dict) -> dict:
        out = json.loads(json.dumps(inst))
        target = out
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
        return out
    return apply


def _set_target(key: str, value: Any) -> Callable[[dict], dict]:
    """Set identity 0's landmark target ``key`` and drop the other one: a valid instance may carry a
    driving_image, and both together would be a different defect."""
    other = "landmarks" if key == "driving_image" else "driving_image"

    def apply(inst: dict) -> dict:
        out = _set(("identities", 0, key), value)(inst)
        out["identities"][0].pop(other, None)
        return out
    return apply


def _drop(path: tuple) -> Callable[[dict], dict]:
    def apply(inst: dict) -> dict:
        out = json.loads(json.dumps(inst))
        target = out
        for p in path[:-1]:
            target = target[p]
        target.pop(path[-1], None)
        return out
    return apply


IMG = ("identities", 0, "image")
R = frozenset


def _image(value: st.SearchStrategy[str]) -> Callable[[Context], st.SearchStrategy[Callable[[dict], dict]]]:
    return lambda ctx: value.map(lambda v: _set(IMG, v))


def _field(name: str, value: Callable[[Context], st.SearchStrategy[Any]]):
    return lambda ctx: value(ctx).map(lambda v: _set((name,), v))


def _out_of_range_ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Within 64 bits: bigger JSON integers are parsed as floats (then "not an integer": size_huge)."""
    return st.integers(-(2**63), lo - 1) | st.integers(hi + 1, 2**63 - 1)


URIS = ["file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", "https://example.com/face.png",
        "s3://bucket/face.png", "gs://b/k", "ftp://x/y", "/etc/passwd", "/etc/shadow", "../../../../etc/passwd",
        "./face.png", "~/.aws/credentials", "C:\\Windows\\win.ini", "\\\\server\\share\\x.png",
        "file:face.png", "jar:file:///x!/y", "models/../../etc/passwd"]

INSTANCE_MUTATIONS: list[Mutation] = [
    # (v2 flattens nested tensor data: [["x"]] is a valid prompt there)
    ("prompt_wrong_type", _field("prompt", lambda c: wrong_type(str).filter(not_strings)),
     R({"invalid_field", "missing_field"}), 400),
    ("prompt_empty", _field("prompt", lambda c: st.just("")), R({"out_of_range"}), 400),
    ("prompt_too_long", _field("prompt", lambda c: st.integers(c.limits.max_prompt_chars + 1,
                                                              c.limits.max_prompt_chars * 3).map(lambda n: "é" * n)),
     R({"out_of_range"}), 400),
    ("prompt_missing", lambda c: st.just(_drop(("prompt",))), R({"missing_field"}), 400),
    ("identities_missing", lambda c: st.just(_drop(("identities",))), R({"missing_field"}), 400),
    ("identities_wrong_type", _field("identities", lambda c: wrong_type(list)), R({"invalid_field"}), 400),
    ("identities_empty", _field("identities", lambda c: st.just([])), R({"out_of_range"}), 400),
    ("too_many_identities", lambda c: st.integers(c.max_ids + 1, c.max_ids + 40).map(
        lambda n: _set(("identities",), [{"image": c.face_b64}] * n)), R({"too_many_identities"}), 400),
    ("identity_wrong_type", lambda c: wrong_type(dict).map(lambda v: _set(("identities", 0), v)),
     R({"invalid_field"}), 400),
    ("image_missing", lambda c: st.just(_drop(IMG)), R({"missing_field"}), 400),
    ("image_wrong_type", lambda c: wrong_type(str).map(lambda v: _set(IMG, v)), R({"invalid_field"}), 400),
    ("image_bad_base64", _image(st.text(min_size=1, max_size=64).filter(lambda t: not t.startswith("data:"))),
     R({"invalid_base64", "not_an_image", "uri_not_allowed", "unsupported_format"}), 400),
    ("image_bad_padding", _image(st.integers(1, 200).map(lambda n: "QUJD" * n + "Q")), R({"invalid_base64"}), 400),
    ("image_not_an_image", _image(st.binary(min_size=1, max_size=256).map(b64)),
     R({"not_an_image", "unsupported_format"}), 400),
    ("image_text_bytes", _image(st.text(min_size=1, max_size=100).map(lambda t: b64(t.encode()))),
     R({"not_an_image", "unsupported_format"}), 400),
    ("image_truncated_png", lambda c: st.integers(1, 200).map(
        lambda n: _set(IMG, b64(base64.b64decode(c.face_b64)[:n]))), R({"not_an_image"}), 400),
    ("image_uri", _image(st.sampled_from(URIS)), R({"uri_not_allowed"}), 400),
    ("image_data_url_bad", _image(st.sampled_from(["data:text/plain;base64,QUJD", "data:image/png,raw",
                                                   "data:;base64,AAAA"])), R({"invalid_base64"}), 400),
    ("image_bomb_header", lambda c: st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).filter(
        lambda wh: wh[0] * wh[1] > c.limits.max_image_pixels).map(lambda wh: _set(IMG, b64(png_header_bomb(*wh)))),
     R({"too_many_pixels"}), 413),
    ("image_no_face", lambda c: st.sampled_from([(8, 8), (64, 64), (1, c.limits.max_image_pixels),
                                                (c.limits.max_image_pixels, 1)]).map(
        lambda wh: _set(IMG, plain_png(*wh))),
     R({"no_face"}), 400),
    ("image_unsupported_format", _image(st.tuples(st.integers(1, 64), st.integers(1, 64)).map(
        lambda wh: b64(gif_header(*wh)))), R({"unsupported_format"}), 400),
    ("image_too_long", lambda c: st.integers(1, 2000).map(
        lambda n: _set(IMG, "A" * (encoded_limit(c.limits.max_image_bytes) + 4 * n))), R({"image_too_large"}), 413),
    ("driving_image_bad", lambda c: st.sampled_from(["%%", "file:///etc/passwd", b64(b"x" * 10)]).map(
        lambda v: _set_target("driving_image", v)),
     R({"invalid_base64", "uri_not_allowed", "not_an_image"}), 400),
    ("driving_image_no_face", lambda c: st.sampled_from([(8, 8), (64, 64)]).map(
        lambda wh: _set_target("driving_image", plain_png(*wh))), R({"no_face"}), 400),
    ("landmarks_wrong_count", lambda c: st.integers(1, 300).filter(lambda n: n != (c.limits.landmark_count or 68)).map(
        lambda n: _set_target("landmarks", [[10.0, 10.0]] * n)), R({"bad_landmarks"}), 400),
    ("landmarks_off_face", lambda c: st.floats(-1e6, -1.0, **finite).map(
        lambda v: _set_target("landmarks", [[v, v]] * (c.limits.landmark_count or 68))),
     R({"bad_landmarks"}), 400),
    ("landmarks_wrong_type", lambda c: wrong_type(list).filter(lambda v: v is not None).map(
        lambda v: _set_target("landmarks", v)), R({"bad_landmarks"}), 400),
    ("identity_unknown_field", lambda c: st.tuples(
        st.text(min_size=1, max_size=12).filter(lambda k: k not in IDENTITY_FIELDS), garbage()).map(
        lambda kv: _set(("identities", 0, kv[0]), kv[1])), R({"unknown_field"}), 400),
    ("unknown_field", lambda c: st.tuples(st.text(min_size=1, max_size=12).filter(lambda k: k not in INSTANCE_FIELDS),
                                          garbage()).map(lambda kv: _set((kv[0],), kv[1])), R({"unknown_field"}), 400),
    ("bbox_wrong_length", lambda c: st.lists(st.floats(0, 1), max_size=8).filter(lambda v: len(v) != 4).map(
        lambda v: _set(("identities", 0, "bbox"), v)), R({"out_of_range"}), 400),
    ("bbox_out_of_range", lambda c: st.tuples(st.integers(0, 3), st.floats(1.0001, 1e300) | st.floats(-1e300, -1e-9))
     .map(lambda iv: _set(("identities", 0, "bbox"), [0.1 if iv[0] != k else iv[1] for k in range(2)]
                          + [0.9 if iv[0] != k else iv[1] for k in range(2, 4)])), R({"bbox_out_of_range"}), 400),
    ("bbox_inverted", lambda c: st.floats(0.0, 1.0, **finite).map(
        lambda v: _set(("identities", 0, "bbox"), [v, 0.0, v, 1.0])), R({"bbox_out_of_range"}), 400),
    ("bbox_nan", lambda c: st.sampled_from([float("nan"), float("inf"), float("-inf")]).map(
        lambda v: _set(("identities", 0, "bbox"), [v, 0, 1, 1])), R({"invalid_json"}), 400),
    ("expression_too_long", lambda c: st.integers(c.limits.max_expression_chars + 1, 5000).map(
        lambda n: _set(("identities", 0, "expression"), "ü" * n)), R({"out_of_range"}), 400),
    ("seed_out_of_range", _field("seed", lambda c: _out_of_range_ints(0, SEED_LIMIT - 1)), R({"out_of_range"}), 400),
    ("seed_wrong_type", _field("seed", lambda c: wrong_type(int).filter(lambda v: v is not None)),
     R({"invalid_field"}), 400),
    ("steps_out_of_range", _field("num_inference_steps", lambda c: _out_of_range_ints(1, c.limits.max_steps)),
     R({"out_of_range"}), 400),
    ("steps_wrong_type", _field("num_inference_steps", lambda c: wrong_type(int).filter(lambda v: v is not None)),
     R({"invalid_field"}), 400),
    ("guidance_out_of_range", _field("guidance_scale", lambda c: st.floats(c.limits.max_guidance, 1e308,
                                                                           exclude_min=True)
                                     | st.floats(-1e308, c.limits.min_guidance, exclude_max=True)),
     R({"out_of_range"}), 400),
    ("guidance_non_finite", _field("guidance_scale", lambda c: st.sampled_from([float("nan"), float("inf")])),
     R({"invalid_json"}), 400),
    ("id_scale_out_of_range", _field("id_scale", lambda c: st.floats(c.limits.max_id_scale, 1e308, exclude_min=True)
                                     | st.floats(-1e308, 0.0, exclude_max=True)), R({"out_of_range"}), 400),
    ("size_out_of_range", lambda c: st.tuples(st.sampled_from(["height", "width"]), st.integers(-10**6, 10**6).filter(
        lambda v: v < c.limits.min_side or v > c.limits.max_side or v % 8)).map(lambda kv: _set((kv[0],), kv[1])),
     R({"out_of_range"}), 400),
    ("size_huge", lambda c: st.tuples(st.sampled_from(["height", "width"]), st.integers(10**7, 10**40)).map(
        lambda kv: _set((kv[0],), kv[1])), R({"out_of_range", "invalid_field", "invalid_json"}), 400),
    ("number_too_big_for_json", lambda c: st.sampled_from(["seed", "num_inference_steps", "height"]).map(
        lambda k: _set((k,), 10**400)), R({"invalid_json", "out_of_range"}), 400),
    ("nested_garbage", lambda c: st.tuples(st.sampled_from(INSTANCE_FIELDS), nested()).map(
        lambda kv: _set((kv[0],), kv[1])), None, None),
]


# ------------------------------------------------------------------------------------ requests
def v1_body(instances: list[Any]) -> bytes:
    return dumps({"instances": instances})


def v2_body(inst: dict[str, Any]) -> bytes:
    """The instance in v2 tensors, tolerant of garbage (a mutated instance may have any shape)."""
    ids = inst.get("identities")
    ids_list = ids if isinstance(ids, list) else []
    images = [i.get("image") if isinstance(i, dict) else i for i in ids_list]
    params = {k: v for k, v in inst.items() if k not in ("prompt", "identities")}
    if isinstance(ids, list):
        params["identities"] = [{k: v for k, v in i.items() if k not in ("image", "driving_image", "landmarks")}
                                if isinstance(i, dict) else i for i in ids]
    elif ids is not None:
        params["identities"] = ids
    inputs = [{"name": "id_images", "datatype": "BYTES", "shape": [len(images)], "data": images}]
    if "prompt" in inst:
        inputs.insert(0, {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [inst["prompt"]]})
    if any(isinstance(i, dict) and "driving_image" in i for i in ids_list):
        inputs.append({"name": "driving_images", "datatype": "BYTES", "shape": [len(images)],
                       "data": [i.get("driving_image", "") if isinstance(i, dict) else "" for i in ids_list]})
    sets = [i.get("landmarks") if isinstance(i, dict) else None for i in ids_list]
    if any(v is not None for v in sets):
        inputs.append(landmarks_tensor(sets))
    inputs.append({"name": "parameters", "datatype": "BYTES", "shape": [1], "data": [json.dumps(params)]})
    return dumps({"inputs": inputs})


def landmarks_tensor(sets: list[Any]) -> dict[str, Any]:
    """The FP32 [N, L, 2] ``landmarks`` tensor (all zeros for an identity without); a set that is
    no list of pairs (a mutation) goes in as it is, for the server to refuse."""
    pairs = [v for v in sets if v is not None]
    lengths = {len(v) for v in pairs if isinstance(v, list)}
    if len(lengths) != 1 or not all(isinstance(v, list) and all(isinstance(pt, list) and len(pt) == 2 for pt in v)
                                    for v in pairs):
        return {"name": "landmarks", "datatype": "FP32", "shape": [len(sets), 1, 2], "data": pairs[0]}
    n = lengths.pop()
    flat = [x for v in sets for pt in (v if v is not None else [[0.0, 0.0]] * n) for x in pt]
    return {"name": "landmarks", "datatype": "FP32", "shape": [len(sets), n, 2], "data": flat}


# Shapes that do not describe n elements: another count, a negative dimension (numpy would read it
# as "infer this one"), a huge one, a wrong number of dimensions.
BAD_SHAPES: list[Callable[[int], list]] = [
    lambda n: [n + 1], lambda n: [0], lambda n: [-n], lambda n: [-2], lambda n: [n, -1], lambda n: [-1, -1],
    lambda n: [10**12], lambda n: [n, 2], lambda n: [2, -n],
]


def _v2_tensor_mutations(ctx: Context) -> st.SearchStrategy[tuple[str, Callable[[dict], dict], frozenset | None]]:
    """Mutations of a valid v2 body (a dict with "inputs")."""
    def edit(fn: Callable[[list], None]) -> Callable[[dict], dict]:
        def apply(body: dict) -> dict:
            out = json.loads(json.dumps(body))
            fn(out["inputs"])
            return out
        return apply

    def setter(name: str, key: str, value: Any) -> Callable[[list], None]:
        def fn(inputs: list) -> None:
            for t in inputs:
                if t["name"] == name:
                    t[key] = value
        return fn

    def reshape(name: str, bad: Callable[[int], list]) -> Callable[[list], None]:
        def fn(inputs: list) -> None:
            for t in inputs:
                if t["name"] == name:
                    t["shape"] = bad(len(t["data"]))
        return fn

    def driving(n: int) -> dict:  # one element per id_images element is right; n is not
        return {"name": "driving_images", "datatype": "BYTES", "shape": [n], "data": [""] * n}

    def landmarks(n: int) -> dict:  # [N, L, 2] with N = the id_images count is right; n is not
        return {"name": "landmarks", "datatype": "FP32", "shape": [n, 68, 2], "data": [1.0] * (n * 136)}

    names = st.sampled_from(["prompt", "id_images", "parameters"])
    bad_params = st.sampled_from(["not json", "[1, 2]", "null", '"x"', "1e999999", '{"seed": NaN}',
                                  '{"seed": 1' + "0" * 5000 + "}", "[" * 5000 + "]" * 5000, '{"prompt": "x"}',
                                  '{"identities": [{"image": "AAAA"}]}', '{"identities": 3}', "{" * 100000])
    return st.one_of(
        st.tuples(st.just("v2_datatype"), names.flatmap(lambda n: st.sampled_from(["FP32", "INT64", "BOOL", "FOO", ""])
                                                          .map(lambda d: edit(setter(n, "datatype", d)))),
                  st.just(R({"invalid_field"}))),
        st.tuples(st.just("v2_shape"), st.tuples(names, st.sampled_from(BAD_SHAPES)).map(
            lambda ns: edit(reshape(*ns))), st.just(R({"invalid_field"}))),
        st.tuples(st.just("v2_data_garbage"), names.flatmap(lambda n: garbage().filter(not_strings).map(
            lambda g: edit(setter(n, "data", g)))), st.just(None)),
        st.tuples(st.just("v2_unknown_tensor"), st.text(min_size=1, max_size=10).filter(
            lambda n: n not in ("prompt", "id_images", "parameters", "driving_images", "landmarks")).map(
            lambda n: edit(lambda inputs: inputs.append({"name": n, "datatype": "BYTES", "shape": [1],
                                                         "data": ["x"]}))),
            st.just(R({"unknown_field"}))),
        st.tuples(st.just("v2_duplicate_tensor"), st.just(edit(lambda inputs: inputs.append(dict(inputs[0])))),
                  st.just(R({"invalid_field"}))),
        st.tuples(st.just("v2_missing_tensor"), st.sampled_from(["prompt", "id_images"]).map(
            lambda n: edit(lambda inputs: inputs.__setitem__(slice(None), [t for t in inputs if t["name"] != n]))),
            st.just(R({"missing_field"}))),
        st.tuples(st.just("v2_bad_parameters"), bad_params.map(lambda p: edit(setter("parameters", "data", [p]))),
                  st.just(R({"invalid_field", "unknown_field", "out_of_range"}))),
        st.tuples(st.just("v2_driving_count"), st.integers(-1, 4).filter(bool).map(lambda extra: edit(
            lambda inputs: inputs.append(driving(len(inputs[1]["data"]) + extra)))), st.just(R({"invalid_field"}))),
        st.tuples(st.just("v2_landmarks_count"), st.integers(-1, 4).filter(bool).map(lambda extra: edit(
            lambda inputs: inputs.append(landmarks(len(inputs[1]["data"]) + extra)))), st.just(R({"invalid_field"}))),
        st.tuples(st.just("v2_landmarks_datatype"), st.sampled_from(["BYTES", "INT64", "BOOL", "FOO"]).map(
            lambda d: edit(lambda inputs: inputs.append({**landmarks(len(inputs[1]["data"])), "datatype": d}))),
            st.just(R({"invalid_field"}))),
        st.tuples(st.just("v2_top_level"), st.sampled_from([{"inputs": "x"}, {"inputs": [1]}, {}, {"inputs": []},
                                                            {"inputs": [{"name": "prompt"}]}, {"outputs": 1}]).map(
            lambda b: (lambda _body: b)), st.just(R({"invalid_field", "missing_field"}))),
    )


def _transport(ctx: Context, protocol: str) -> st.SearchStrategy[Request]:
    """Bodies that are not a JSON request at all, or are too big, or come with odd headers."""
    content_types = st.sampled_from(["text/plain", "application/xml", "multipart/form-data; boundary=x",
                                     "application/x-www-form-urlencoded", "image/png", "application/octet-stream",
                                     "", "application/json; charset=latin-1"])
    bodies = st.one_of(
        st.binary(max_size=300).filter(lambda b: b.strip()[:1] not in (b"{", b"[")),
        st.sampled_from([b"", b"null", b"{", b"[]", b"{}", b"\xff\xfe\x00", b'{"instances": [', b"[" * 2000,
                         b'{"instances": [{"prompt": "\\ud800"}]}', b'{"a": 1' + b"0" * 10000 + b"}"]),
        st.text(max_size=100).map(lambda t: t.encode("utf-8")),
    )
    malformed = st.builds(lambda b, ct: Request(protocol, "transport_garbage", b, {"content-type": ct}, None, None),
                          bodies, st.sampled_from(["application/json"]) | content_types)
    oversized = st.integers(1, 1000).map(  # built from n so that hypothesis never prints the body
        lambda n: Request(protocol, "body_too_large", b'{"instances": ["' + b"A" * (ctx.max_body_bytes + n) + b'"]}',
                          dict(JSON), R({"body_too_large"}), 413))
    strategies = [malformed, oversized]
    if protocol == "v2":
        lengths = st.sampled_from(["abc", "-1", "99999999", "1e3", "", "0x10", "0", "+5", "\xb2", "\u0663"])
        binary = st.tuples(lengths, st.binary(max_size=200)).map(
            lambda hb: Request("v2", "v2_binary_header", hb[1],
                               {"content-type": "application/octet-stream",
                                "inference-header-content-length": hb[0].encode("latin-1", "replace")},
                               None, 400))
        strategies.append(binary)
        # the binary extension with a JSON part that parses but is no inference request: KServe's
        # decoder indexes into it unchecked
        json_parts = st.sampled_from([
            b"{}", b"[]", b"5", b'{"inputs": 5}', b'{"inputs": [5]}', b'{"inputs": [{}]}', b'{"inputs": [{"name": 1}]}',
            b'{"inputs": [{"name": "p", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": "a"}}]}',
            b'{"inputs": [{"name": "p", "shape": "x", "datatype": "BYTES", "parameters": {"binary_data_size": 3}}]}',
            b'{"inputs": [{"name": "p", "shape": [1], "datatype": "FP16", "parameters": {"binary_data_size": 3}}]}',
            b'{"inputs": [{"name": "p", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": -9}}]}',
            b'{"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": [{}]}',
        ])
        strategies.append(st.tuples(json_parts, st.binary(max_size=40)).map(
            lambda jb: Request("v2", "v2_binary_body", jb[0] + jb[1],
                               {"content-type": "application/octet-stream",
                                "inference-header-content-length": str(len(jb[0]))}, None, None)))
    return st.one_of(*strategies)


@functools.lru_cache(maxsize=8)
def _strategies(ctx: Context) -> dict[str, Any]:
    """Every strategy built once per server (building hypothesis strategies costs more than drawing)."""
    return {
        "instance": valid_instance(ctx),
        "mutations": st.one_of([st.tuples(st.just(name), make(ctx), st.just(reasons), st.just(status))
                                for name, make, reasons, status in INSTANCE_MUTATIONS]),
        "v2": _v2_tensor_mutations(ctx),
        "transport": {p: _transport(ctx, p) for p in ("v1", "v2")},
    }


def _envelope_v1(inst: dict[str, Any], which: str, draw, ctx: Context) -> Request:
    if which == "not_a_list":
        body = {"instances": draw(wrong_type(list))}
    elif which == "empty":
        body = {"instances": []}
    elif which == "too_many":
        body = {"instances": [{}] * draw(st.integers(ctx.max_queue + 1, ctx.max_queue + 300))}  # counted first
    elif which == "extra_key":
        body = {"instances": [inst], draw(st.text(min_size=1, max_size=8).filter(lambda k: k != "instances")): 1}
    elif which == "not_an_object":
        body = draw(wrong_type(dict))
    else:
        body = {"instances": [inst, draw(wrong_type(dict))]}
    reasons = R({"too_many_instances"}) if which == "too_many" else None
    return Request("v1", f"v1_{which}", dumps(body), dict(JSON), reasons, 400)


def _mutated(protocol: str, mutation: tuple, inst: dict[str, Any]) -> Request:
    name, mutate, reasons, status = mutation
    bad = mutate(inst)
    body = v1_body([bad]) if protocol == "v1" else v2_body(bad)
    if protocol == "v2" and reasons is not None and "invalid_json" in reasons:
        reasons, status = None, None  # inside the parameters tensor, NaN / huge numbers are parsed by json.loads
    if protocol == "v2" and name in ("identities_wrong_type", "identity_wrong_type", "image_wrong_type",
                                     "identities_missing", "image_missing", "nested_garbage", "prompt_wrong_type",
                                     "prompt_missing", "identities_empty", "too_many_identities",
                                     "landmarks_wrong_type"):
        reasons, status = None, None  # the v2 mapping changes which tensor check fires first
    return Request(protocol, name, body, dict(JSON), reasons, status)


@st.composite
def request_batch(draw, ctx: Context, instance_mutations: int = 12) -> tuple[dict[str, Any], list[Request]]:
    """One valid instance (tiny settings) and the hostile requests derived from it: one documented
    defect each (v1 and v2), a v1 envelope defect, v2 tensor defects and transport defects.

    Many requests per hypothesis example: hypothesis' fixed cost per example (~2.5 ms here) is
    larger than the cost of a draw, and 10,000 requests must fit in CI time."""
    strategies = _strategies(ctx)
    inst = draw(strategies["instance"])
    out = [_mutated(draw(st.sampled_from(["v1", "v2"])), draw(strategies["mutations"]), inst)
           for _ in range(instance_mutations)]
    which = draw(st.sampled_from(["not_a_list", "empty", "too_many", "extra_key", "not_an_object",
                                  "instance_garbage"]))
    out.append(_envelope_v1(inst, which, draw, ctx))
    for _ in range(2):
        name, mutate, reasons = draw(strategies["v2"])
        out.append(Request("v2", name, dumps(mutate(json.loads(v2_body(inst)))), dict(JSON), reasons, None))
    out.extend(draw(strategies["transport"][p]) for p in ("v1", "v2"))
    return inst, out


def valid_requests(inst: dict[str, Any]) -> list[Request]:
    """The same valid instance over both protocols."""
    return [Request("v1", "valid", v1_body([inst]), dict(JSON), None, 200),
            Request("v2", "valid", v2_body(inst), dict(JSON), None, 200)]


__all__ = ["Context", "Request", "request_batch", "valid_requests", "valid_instance", "png_header_bomb", "b64",
           "plain_png", "URIS"]

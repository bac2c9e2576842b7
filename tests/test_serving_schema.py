"""Request validation of the model server, without a model: every bad input gets the right status,
reason and field, limits are enforced before pixels are decoded, and the v2 tensor mapping and the
documented JSON Schema agree with the parser."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.config import params_from_dict
from serving.errors import ServingError
from serving.protocol import v1_instances, v2_instance, v2_namer
from serving.schema import Limits, RequestSchema

LIMITS = Limits(max_ids=2, resolution=64, max_steps=8, min_side=64, max_side=128, max_guidance=10.0,
                max_id_scale=2.0, max_image_bytes=20_000, max_image_pixels=100 * 100, max_prompt_chars=50,
                max_expression_chars=20, landmark_count=68)
POINTS = [[10.0 + k % 17, 12.5 + k // 17] for k in range(68)]  # 68 [x, y] pixel pairs


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def schema() -> RequestSchema:
    return RequestSchema(LIMITS)


PHOTO = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)  # [H, W, 3]
PHOTO_B64 = b64(png(Image.fromarray(PHOTO)))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return PHOTO


@pytest.fixture(scope="module")
def photo_b64() -> str:
    return PHOTO_B64


def big_header_png(width: int, height: int) -> bytes:
    """A real PNG whose header claims width x height pixels but whose data is one empty row: what
    a decompression bomb looks like to a parser that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_valid_instance_fills_defaults_and_decodes_images(schema, photo, photo_b64):
    driver = np.random.default_rng(2).integers(0, 255, (32, 30, 3), dtype=np.uint8)
    req = schema.parse({"prompt": "a person", "identities": [
        {"image": photo_b64, "bbox": [0.1, 0, 0.9, 0.5], "expression": "smiling", "landmarks": POINTS},
        {"image": "data:image/png;base64," + photo_b64, "driving_image": b64(png(Image.fromarray(driver)))},
    ]})
    assert np.array_equal(req.identities[0].image, photo)          # lossless PNG round trip
    assert np.array_equal(req.identities[1].image, photo)          # data URL prefix accepted
    assert np.array_equal(req.identities[1].driving_image, driver)
    assert req.identities[0].landmarks.dtype == np.float32 and req.identities[0].landmarks.tolist() == POINTS
    assert req.identities[0].driving_image is None and req.identities[1].landmarks is None
    assert req.identities[0].bbox == (0.1, 0.0, 0.9, 0.5) and req.identities[1].bbox is None
    assert req.identities[0].expression == "smiling"
    assert (req.num_inference_steps, req.guidance_scale, req.id_scale) == (30, 5.0, 1.0)
    assert (req.height, req.width) == (64, 64) and 0 <= req.seed < 2**31
    assert req.batch_key == (64, 64, 30, 2, True, None, True)  # + asked layout, any bbox given
    other = schema.parse({"prompt": "b", "identities": [{"image": photo_b64}], "seed": 5, "num_inference_steps": 4,
                          "guidance_scale": 1, "height": 128, "width": 64})
    assert other.seed == 5 and other.batch_key == (128, 64, 4, 1, False, None, False)


def test_per_person_id_scale_defaults_to_the_request_one(schema, photo_b64):
    """A person's own id_scale goes to the pipeline per person; the others take the request's."""
    req = schema.parse({"prompt": "x", "id_scale": 0.5, "identities": [{"image": photo_b64, "id_scale": 0},
                                                                       {"image": photo_b64}]})
    assert [i.id_scale for i in req.identities] == [0, None] and req.id_scales == [0.0, 0.5]
    plain = schema.parse({"prompt": "x", "identities": [{"image": photo_b64}, {"image": photo_b64}]})
    assert plain.id_scales == 1.0  # nobody gives one: the request's float, as before
    assert schema.parse({"prompt": "x", "identities": [{"image": photo_b64, "id_scale": 2}]}).id_scales == [2.0]


def test_client_sends_each_persons_scale_over_v1_and_v2(schema, photo, tmp_path):
    """``dynamicid infer``'s instance: a person's id_scale in their identity (v1) and in the v2
    parameters' identities, parsed back to the same per-person scales."""
    from serving.client import build_instance, v2_request

    path = tmp_path / "p.png"
    path.write_bytes(png(Image.fromarray(photo)))
    inst = build_instance("x", [str(path), str(path)], id_scales=[None, 0.0], id_scale=0.5)
    assert [i.get("id_scale") for i in inst["identities"]] == [None, 0.0] and inst["id_scale"] == 0.5
    v1 = schema.parse(inst)
    body = v2_request(inst)
    instance, namer = v2_instance(_v2([(t["name"], t["datatype"], t["data"]) for t in body["inputs"]]))
    assert v1.id_scales == schema.parse(instance, namer).id_scales == [0.5, 0.0]


def test_line_wrapped_base64_is_accepted(schema, photo):
    text = b64(png(Image.fromarray(photo)))
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    req = schema.parse({"prompt": "x", "identities": [{"image": wrapped}]})
    assert np.array_equal(req.identities[0].image, photo)


def _bad_cases(photo_b64: str) -> list[tuple[str, dict, int, str, str, str]]:
    noise = np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)  # PNG > 20 kB
    big = b64(png(Image.fromarray(noise)))
    wide = b64(png(Image.new("RGB", (101, 100))))                                   # 10100 px > 10000
    gif = b64(png(Image.new("RGB", (20, 20)), "GIF"))
    bomb = b64(big_header_png(50_000, 50_000))
    ok = {"image": photo_b64}

    def inst(**kw):
        return {"prompt": "a person", "identities": [ok], **kw}

    return [
        ("invalid base64", inst(identities=[{"image": "not base64!"}]), 400, "invalid_base64",
         "identities[0].image", "not valid base64"),
        ("not an image", inst(identities=[ok, {"image": b64(b"hello world, no image here")}]), 400, "not_an_image",
         "identities[1].image", "not a recognised image"),
        ("file uri", inst(identities=[{"image": "file:///etc/passwd"}]), 400, "uri_not_allowed",
         "identities[0].image", "never opens"),
        ("http url", inst(identities=[ok, {"image": "https://example.com/a.png"}]), 400, "uri_not_allowed",
         "identities[1].image", "never opens"),
        ("s3 driving image", inst(identities=[{"image": photo_b64, "driving_image": "s3://bucket/x.png"}]), 400,
         "uri_not_allowed", "identities[0].driving_image", "never opens"),
        ("driving image over limit", inst(identities=[ok, {"image": photo_b64, "driving_image": big}]), 413,
         "image_too_large", "identities[1].driving_image", "the limit is 20000"),
        ("landmark count", inst(identities=[{"image": photo_b64, "landmarks": POINTS[:5]}]), 400, "bad_landmarks",
         "identities[0].landmarks",
         "expected 68 points in the iBUG 300-W 68-point order (dlib) as [x, y] pairs, got 5"),
        ("landmark point", inst(identities=[{"image": photo_b64, "landmarks": POINTS[:67] + [[1.0, 2.0, 3.0]]}]), 400,
         "bad_landmarks", "identities[0].landmarks[67]", "each point is [x, y]"),
        ("landmark coordinate", inst(identities=[{"image": photo_b64, "landmarks": POINTS[:67] + [[1.0, 1e7]]}]),
         400, "bad_landmarks", "identities[0].landmarks[67][1]", "less than or equal to 1000000"),
        ("landmarks as text", inst(identities=[{"image": photo_b64, "landmarks": "[[1, 2]]"}]), 400, "bad_landmarks",
         "identities[0].landmarks", "valid list"),
        ("driving image and landmarks", inst(identities=[{"image": photo_b64, "driving_image": photo_b64,
                                                          "landmarks": POINTS}]), 400, "invalid_field",
         "identities[0].landmarks", "give driving_image or landmarks as the target, not both"),
        ("landmarks image is internal", inst(identities=[{"image": photo_b64, "landmarks_image": photo_b64}]), 400,
         "unknown_field", "identities[0].landmarks_image",
         "allowed fields: image, bbox, expression, driving_image, landmarks"),
        ("bytes over limit", inst(identities=[{"image": big}]), 413, "image_too_large", "identities[0].image",
         "the limit is 20000"),
        ("pixels over limit", inst(identities=[{"image": wide}]), 413, "too_many_pixels", "identities[0].image",
         "101x100 = 10100 pixels"),
        ("decompression bomb", inst(identities=[{"image": bomb}]), 413, "too_many_pixels", "identities[0].image",
         "claims 2500000000 pixels, the limit is 10000"),
        ("gif", inst(identities=[{"image": gif}]), 400, "unsupported_format", "identities[0].image", "GIF"),
        ("too many identities", inst(identities=[ok, ok, ok]), 400, "too_many_identities", "identities",
         "3 identities given, at most 2"),
        ("no identity", inst(identities=[]), 400, "out_of_range", "identities", "at least 1"),
        ("bbox out of range", inst(identities=[{"image": photo_b64, "bbox": [0, 0, 1.5, 1]}]), 400,
         "bbox_out_of_range", "identities[0].bbox[2]", "less than or equal to 1 (got 1.5)"),
        ("bbox inverted", inst(identities=[ok, {"image": photo_b64, "bbox": [0.8, 0, 0.2, 1]}]), 400,
         "bbox_out_of_range", "identities[1].bbox", "y0 < y1 and x0 < x1, got [0.8, 0.0, 0.2, 1.0]"),
        ("bbox length", inst(identities=[{"image": photo_b64, "bbox": [0, 0, 1]}]), 400, "out_of_range",
         "identities[0].bbox", "at least 4"),
        ("steps high", inst(num_inference_steps=9), 400, "out_of_range", "num_inference_steps",
         "less than or equal to 8"),
        ("steps zero", inst(num_inference_steps=0), 400, "out_of_range", "num_inference_steps",
         "greater than or equal to 1"),
        ("height not /8", inst(height=100), 400, "out_of_range", "height", "multiple of 8"),
        ("width too big", inst(width=256), 400, "out_of_range", "width", "less than or equal to 128"),
        ("width too small", inst(width=32), 400, "out_of_range", "width", "greater than or equal to 64"),
        ("guidance high", inst(guidance_scale=10.5), 400, "out_of_range", "guidance_scale", "less than or equal to 10"),
        ("guidance negative", inst(guidance_scale=-1), 400, "out_of_range", "guidance_scale",
         "greater than or equal to 0"),
        ("id_scale high", inst(id_scale=3), 400, "out_of_range", "id_scale", "less than or equal to 2"),
        ("person id_scale high", inst(identities=[ok, {"image": photo_b64, "id_scale": 2.5}]), 400, "out_of_range",
         "identities[1].id_scale", "less than or equal to 2 (got 2.5)"),
        ("person id_scale negative", inst(identities=[{"image": photo_b64, "id_scale": -0.1}]), 400, "out_of_range",
         "identities[0].id_scale", "greater than or equal to 0"),
        ("person id_scale as text", inst(identities=[{"image": photo_b64, "id_scale": "1"}]), 400, "invalid_field",
         "identities[0].id_scale", "valid number"),
        ("seed negative", inst(seed=-1), 400, "out_of_range", "seed", "greater than or equal to 0"),
        ("prompt too long", inst(prompt="x" * 51), 400, "out_of_range", "prompt", "at most 50 characters"),
        ("expression too long", inst(identities=[{"image": photo_b64, "expression": "y" * 21}]), 400,
         "out_of_range", "identities[0].expression", "at most 20 characters"),
        ("unknown field", inst(steps=4), 400, "unknown_field", "steps", "allowed fields: prompt, negative_prompt"),
        ("unknown identity field", inst(identities=[{"image": photo_b64, "path": "/x.png"}]), 400, "unknown_field",
         "identities[0].path", "allowed fields: image, bbox"),
        ("seed as string", inst(seed="5"), 400, "invalid_field", "seed", "valid integer"),
        ("steps as bool", inst(num_inference_steps=True), 400, "invalid_field", "num_inference_steps", "valid integer"),
        ("missing prompt", {"identities": [ok]}, 400, "missing_field", "prompt", "required"),
        ("not an object", ["prompt"], 400, "invalid_field", "instances[0]", "expected a JSON object"),
    ]


BAD_CASES = _bad_cases(PHOTO_B64)


@pytest.mark.parametrize("name, raw, status, reason, field, text", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_name_field_status_and_reason(schema, name, raw, status, reason, field, text):
    namer = lambda p: f"instances[0].{p}" if p else "instances[0]"  # noqa: E731
    with pytest.raises(ServingError) as err:
        schema.parse(raw, namer)
    e = err.value
    want_field = field if field.startswith("instances") else f"instances[0].{field}"
    assert (e.status, e.reason, e.field) == (status, reason, want_field), name
    assert str(e).startswith(want_field + ": ") and text in str(e), (name, str(e))


def test_limits_are_checked_before_decoding(schema):
    """A header claiming 2.5 G pixels is refused in well under the time a decode would take, and a
    20 MB base64 string is refused without being decoded."""
    bomb = b64(big_header_png(50_000, 50_000))
    t = time.perf_counter()
    with pytest.raises(ServingError, match="2500000000 pixels"):
        schema.parse({"prompt": "x", "identities": [{"image": bomb}]})
    huge = "A" * 20_000_000
    with pytest.raises(ServingError) as err:
        schema.parse({"prompt": "x", "identities": [{"image": huge}]})
    assert err.value.reason == "image_too_large" and "about 15000000 bytes" in str(err.value)
    assert time.perf_counter() - t < 2.0


def test_decoded_size_is_checked_exactly():
    from serving.images import b64decode_bounded, encoded_limit

    raw = (bytes(range(256)) * 5)[:1026]  # base64 length 1368 = encoded_limit(1024), no padding
    assert len(b64(raw)) == encoded_limit(1024)
    assert b64decode_bounded(b64(raw), "f", 1026) == raw
    with pytest.raises(ServingError, match="f: 1026 bytes, the limit is 1024"):
        b64decode_bounded(b64(raw), "f", 1024)  # passes the length pre-check, caught after decoding


# ------------------------------------------------------------------------------------ protocols
def test_v1_body_shape():
    assert [inst for inst, _ in v1_instances({"instances": [{"a": 1}, {"b": 2}]})] == [{"a": 1}, {"b": 2}]
    assert v1_instances({"instances": [{}, {}]})[1][1]("seed") == "instances[1].seed"
    for body, field in [([], "body"), ({"instances": []}, "instances"), ({"instances": {}}, "instances"),
                        ({"instances": [{}], "inputs": []}, "inputs")]:
        with pytest.raises(ServingError) as err:
            v1_instances(body)
        assert err.value.status == 400 and err.value.field == field


def _v2(inputs: list[tuple]):
    """(name, datatype, data) or (name, datatype, data, shape) per tensor; shape defaults to [len(data)]."""
    from kserve import InferInput, InferRequest

    return InferRequest(model_name="dynamicid", infer_inputs=[
        InferInput(name=t[0], datatype=t[1], shape=t[3] if len(t) > 3 else [len(t[2])], data=t[2]) for t in inputs])


def _landmarks_tensor(sets: list[list[list[float]] | None], n_points: int = 68) -> tuple:
    flat = [v for s in sets for pt in (s or [[0.0, 0.0]] * n_points) for v in pt]
    return ("landmarks", "FP32", flat, [len(sets), n_points, 2])


def test_v2_tensors_map_to_the_v1_instance(schema, photo_b64):
    params = {"seed": 3, "num_inference_steps": 4, "negative_prompt": "blurry",
              "identities": [{"bbox": [0, 0, 1, 0.5]}, {"expression": "smiling", "id_scale": 0.25}]}
    req = _v2([("prompt", "BYTES", ["two people"]), ("id_images", "BYTES", [photo_b64, photo_b64]),
               ("driving_images", "BYTES", ["", photo_b64]), _landmarks_tensor([POINTS, None]),
               ("parameters", "BYTES", [json.dumps(params)])])
    instance, namer = v2_instance(req)
    assert instance == {"prompt": "two people", "seed": 3, "num_inference_steps": 4, "negative_prompt": "blurry",
                        "identities": [{"image": photo_b64, "bbox": [0, 0, 1, 0.5], "landmarks": POINTS},
                                       {"image": photo_b64, "expression": "smiling", "id_scale": 0.25,
                                        "driving_image": photo_b64}]}
    parsed = schema.parse(instance, namer)
    assert parsed.batch_key == (64, 64, 4, 2, True, None, True) and parsed.identities[0].landmarks.tolist() == POINTS
    assert parsed.id_scales == [1.0, 0.25]
    assert [namer(p) for p in ["prompt", "identities", "identities[1]", "identities[1].image",
                               "identities[0].driving_image", "identities[1].landmarks",
                               "identities[1].landmarks[3][0]", "identities[0].bbox", "identities[0].bbox[2]",
                               "seed"]] == [
        "prompt", "id_images", "id_images[1]", "id_images[1]", "driving_images[0]", "landmarks[1]",
        "landmarks[1][3][0]", "parameters.identities[0].bbox", "parameters.identities[0].bbox[2]", "parameters.seed"]


def test_v2_landmark_errors_name_the_tensor(schema, photo_b64):
    base = [("prompt", "BYTES", ["x"]), ("id_images", "BYTES", [photo_b64, photo_b64])]
    instance, namer = v2_instance(_v2(base + [_landmarks_tensor([None, POINTS[:5]], n_points=5)]))
    with pytest.raises(ServingError) as err:
        schema.parse(instance, namer)
    assert (err.value.reason, err.value.field) == ("bad_landmarks", "landmarks[1]")
    assert "expected 68 points" in str(err.value) and "got 5" in str(err.value)


@pytest.mark.parametrize("inputs, field, text", [
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("mask", "BYTES", ["m"])], "inputs",
     "unknown input tensor 'mask'"),
    ([("prompt", "BYTES", ["x"])], "id_images", "required input tensor"),
    ([("prompt", "INT32", [1]), ("id_images", "BYTES", ["a"])], "prompt", "datatype must be BYTES"),
    ([("prompt", "BYTES", ["x", "y"]), ("id_images", "BYTES", ["a"])], "prompt", "expected one prompt"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a", "b"]), ("driving_images", "BYTES", [""])],
     "driving_images", "expected 2 elements"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("landmarks", "BYTES", ["1"])],
     "landmarks", "datatype must be FP32"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a", "b"]), ("landmarks", "FP32", [1.0] * 136, [1, 68, 2])],
     "landmarks", "shape must be [2, L, 2]"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("landmarks", "FP32", [1.0] * 136, [136])],
     "landmarks", "shape must be [1, L, 2]"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("landmarks", "FP32", ["x", "y"], [1, 1, 2])],
     "landmarks", "data does not match shape"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("landmarks", "FP32", [1.0] * 6, [1, 68, 2])],
     "landmarks", "data does not match shape"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("landmarks_images", "BYTES", ["a"])], "inputs",
     "unknown input tensor 'landmarks_images'"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]),
      ("parameters", "BYTES", ['{"identities": [{"landmarks": [[1, 2]]}]}'])], "parameters.identities[0].landmarks",
     "landmarks tensor"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]),
      ("parameters", "BYTES", ['{"identities": [{"driving_image": "abc"}]}'])],
     "parameters.identities[0].driving_image",
     "driving_images tensor"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("parameters", "BYTES", ["{seed: 1"])],
     "parameters", "not valid JSON"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("parameters", "BYTES", ['{"prompt": "y"}'])],
     "parameters.prompt", "not a parameter"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]), ("parameters", "BYTES", ['{"identities": [{}, {}]}'])],
     "parameters.identities", "list of 1 objects"),
    ([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", ["a"]),
      ("parameters", "BYTES", ['{"identities": [{"image": "abc"}]}'])], "parameters.identities[0].image",
     "id_images tensor"),
])
def test_v2_errors_name_the_tensor(inputs, field, text):
    with pytest.raises(ServingError) as err:
        v2_instance(_v2(inputs))
    assert err.value.status == 400 and err.value.field == field and text in str(err.value)


def test_v2_field_names_in_parse_errors(schema, photo_b64):
    req = _v2([("prompt", "BYTES", ["x"]), ("id_images", "BYTES", [photo_b64, "nope!"]),
               ("parameters", "BYTES", [json.dumps({"num_inference_steps": 50})])])
    instance, namer = v2_instance(req)
    with pytest.raises(ServingError) as err:
        schema.parse(instance, namer)
    assert err.value.field == "parameters.num_inference_steps"
    instance["num_inference_steps"] = 4
    with pytest.raises(ServingError) as err:
        schema.parse(instance, namer)
    assert err.value.field == "id_images[1]" and err.value.reason == "invalid_base64"
    assert v2_namer("identities[0].expression") == "parameters.identities[0].expression"
    instance["identities"][1] = {"image": photo_b64, "id_scale": 9}
    with pytest.raises(ServingError) as err:
        schema.parse(instance, namer)
    assert (err.value.status, err.value.field) == (400, "parameters.identities[1].id_scale")


# ------------------------------------------------------------------------------------ JSON Schema
def test_json_schema_states_the_configured_limits_and_agrees_with_the_parser(schema, photo_b64):
    import jsonschema

    doc = schema.json_schema()["request"]
    inst = doc["$defs"]["Instance"]["properties"]
    assert inst["identities"]["maxItems"] == 2
    assert inst["num_inference_steps"]["anyOf"][0]["maximum"] == 8
    assert inst["height"]["anyOf"][0] == {"maximum": 128, "minimum": 64, "multipleOf": 8, "type": "integer"}
    lmk = doc["$defs"]["Identity"]["properties"]["landmarks"]["anyOf"][0]
    assert (lmk["minItems"], lmk["maxItems"], lmk["items"]["minItems"], lmk["items"]["maxItems"]) == (68, 68, 2, 2)
    validator = jsonschema.Draft202012Validator(doc)
    good = {"instances": [{"prompt": "x", "identities": [{"image": photo_b64, "bbox": [0, 0, 1, 1]}], "seed": 1}]}
    assert not list(validator.iter_errors(good))
    schema.parse(good["instances"][0])
    for bad in BAD_CASES:
        raw = bad[1]
        if bad[3] in ("invalid_base64", "not_an_image", "uri_not_allowed", "image_too_large", "too_many_pixels",
                      "unsupported_format", "bbox_out_of_range"):
            continue  # content checks that a JSON Schema cannot express
        assert list(validator.iter_errors({"instances": [raw]})), bad[0]


def test_docs_show_the_default_schema():
    """docs/serving.md embeds `dynamicid serve --schema` for the default params; this fails when
    the code's schema changes and the docs were not regenerated."""
    text = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    m = re.search(r"<!-- schema:begin -->\s*```json\n(.*?)```\s*<!-- schema:end -->", text, re.S)
    assert m, "docs/serving.md lacks the schema block"
    want = RequestSchema(Limits.from_params(params_from_dict({}))).json_schema()
    assert json.loads(m.group(1)) == want


def _zlib_level_class(png: bytes) -> int:
    """FLEVEL of the first IDAT's zlib header: 0 fastest, 1 fast, 2 default, 3 maximum compression."""
    pos = 8  # after the signature: chunks of length, type, data, CRC
    while True:
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            return png[pos + 9] >> 6  # the FLG byte follows CMF
        pos += 12 + length


def test_returned_pngs_are_lossless_and_written_for_speed(photo):
    """The answer's PNG costs 51-73 ms per 512 px image at zlib's default level on an H100 host, most of the served
    latency's gap over the pipeline; the server writes it at level 1: a fast-compression stream, the same pixels."""
    from serving.images import encode_png

    image = Image.fromarray(photo).convert("RGB")
    png = base64.b64decode(encode_png(image))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(image))
    assert _zlib_level_class(png) == 0
    default = io.BytesIO()
    image.save(default, format="PNG")  # PIL's default level: the control, which the old server wrote
    assert _zlib_level_class(default.getvalue()) == 2

"""The request/response schema of the model server, built from the configured limits.

One schema serves both protocols: a v1 instance and a v2 request (after serving.protocol maps its
tensors) become the same dict, validated here into a GenerationRequest with decoded images. The
pydantic models are built per configuration so that the JSON Schema they print (``dynamicid serve
--schema``, docs/serving.md) states exactly the limits enforced. Errors name the field the caller
used (see FieldNamer) and carry a metrics reason.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.motion_targets import LAYOUT_NAMES
from serving.errors import FieldNamer, ServingError, bad_request, same_name
from serving.images import decode_image, encoded_limit
from serving.timing import RequestTiming, timed

SEED_LIMIT = 2**32
MAX_COORD = 1e6  # |landmark coordinate| in pixels: far beyond any image the limits let through


@dataclass(frozen=True)
class Limits:
    """Everything a request is checked against (serve params + the loaded model's max_ids)."""

    max_ids: int = 4
    resolution: int = 512
    default_steps: int = 30
    default_guidance: float = 5.0
    default_id_scale: float = 1.0
    max_steps: int = 100
    min_side: int = 64
    max_side: int = 1024
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_id_scale: float = 4.0
    max_prompt_chars: int = 2000
    max_expression_chars: int = 300
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    landmark_count: int | None = None   # the face analyzer's landmark count; None: checked by the pipeline only

    @classmethod
    def from_params(cls, params) -> "Limits":
        from model.face_analysis.backends import landmark_count

        s, m = params.serve, params.model
        return cls(
            max_ids=m.max_ids, resolution=m.active.resolution, default_steps=s.default_steps,
            default_guidance=s.default_guidance, default_id_scale=m.saa.id_scale, max_steps=s.max_steps,
            min_side=s.min_side, max_side=s.max_side, min_guidance=s.min_guidance, max_guidance=s.max_guidance,
            max_id_scale=s.max_id_scale, max_prompt_chars=s.max_prompt_chars,
            max_expression_chars=s.max_expression_chars, max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels, image_formats=tuple(s.image_formats),
            landmark_count=landmark_count(params.face, m.profile),
        )


@dataclass
class IdentityRequest:
    image: np.ndarray                                   # [H, W, 3] uint8 RGB
    bbox: tuple[float, float, float, float] | None      # (y0, x0, y1, x1) in [0, 1]
    expression: str | None
    driving_image: np.ndarray | None = None             # [H, W, 3] uint8 RGB: target pose / expression
    landmarks: np.ndarray | None = None                 # [L, 2] float32 x, y, pixels of ``image``
    id_scale: float | None = None                       # this person's identity scale; None: the request's


@dataclass
class GenerationRequest:
    """One image to generate: validated, defaults filled in, images decoded."""

    prompt: str
    negative_prompt: str
    identities: list[IdentityRequest]
    seed: int
    num_inference_steps: int
    guidance_scale: float
    id_scale: float                                     # the request's scale: people without their own take it
    height: int
    width: int
    field: FieldNamer = field(default=same_name, repr=False)
    layout: str | None = None                           # "auto" | "strips" | None (model/saa/auto_run.py)
    layout_maps: bool = False                           # return the auto layout's maps as a PNG

    @property
    def id_scales(self) -> float | list[float]:
        """The pipeline's per-sample ``id_scale`` entry: one float, or one per person when any person
        gives their own (requests of both kinds share a batch: the pipeline takes a mixed list)."""
        if all(i.id_scale is None for i in self.identities):
            return self.id_scale
        return [self.id_scale if i.id_scale is None else i.id_scale for i in self.identities]

    @property
    def batch_key(self) -> tuple[int, int, int, int, bool, str | None, bool]:
        """Requests that can share one UNet batch: same latent size, step count, identity count (the
        encoder states' length), whether classifier-free guidance doubles the batch, and the same
        layout (asked layout, any bbox given): one pipeline call uses one layout."""
        boxed = any(i.bbox is not None for i in self.identities)
        return (self.height, self.width, self.num_inference_steps, len(self.identities), self.guidance_scale > 1.0,
                self.layout, boxed)


def field_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location -> the dotted/indexed field name errors report (``identities[0].bbox``)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class RequestSchema:
    """Pydantic models for one set of limits, and the parser that turns a JSON instance into a
    GenerationRequest (ServingError otherwise)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = lim = limits
        b64 = encoded_limit(lim.max_image_bytes)
        image_doc = (f"base64 image ({', '.join(lim.image_formats)}), at most {lim.max_image_bytes} bytes decoded "
                     f"and {lim.max_image_pixels} pixels; a data:image/...;base64, prefix is accepted; "
                     "URLs and paths are never fetched")
        side = Annotated[int, Field(ge=lim.min_side, le=lim.max_side, multiple_of=8)]
        unit = Annotated[float, Field(ge=0.0, le=1.0)]
        coord = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COORD, le=MAX_COORD)]
        point = Annotated[list[coord], Field(min_length=2, max_length=2)]
        count = lim.landmark_count
        layout = layout_text(count)

        class Identity(BaseModel):
            """One person, from one reference photo (if it shows several faces, the largest is used).
            Target motion: expression and/or one landmark target, driving_image or landmarks."""

            model_config = ConfigDict(extra="forbid", strict=True, title="Identity", json_schema_extra={
                "not": {"required": ["driving_image", "landmarks"],  # one landmark target at most
                        "properties": {"driving_image": {"type": "string"}, "landmarks": {"type": "array"}}}})
            image: str = Field(description=image_doc, json_schema_extra={"maxLength": b64, "contentEncoding": "base64"})
            bbox: list[unit] | None = Field(
                None, min_length=4, max_length=4,
                description="where the person goes: [y0, x0, y1, x1] in [0, 1], y0 < y1, x0 < x1; "
                "default: the instance's layout (auto: found from the model's activation maps)",
            )
            expression: str | None = Field(
                None, min_length=1, max_length=lim.max_expression_chars,
                description="target expression / head pose, e.g. 'smiling' or 'the face is turned to the left'",
            )
            driving_image: str | None = Field(
                None, description="target pose and expression: a photo of anyone (its largest face), " + image_doc,
                json_schema_extra={"maxLength": b64, "contentEncoding": "base64"},
            )
            landmarks: list[point] | None = Field(
                None, min_length=count or 1, max_length=count,
                description=f"target landmarks: [x, y] pixels of this identity's image, {layout}; "
                "e.g. the reference face's own landmarks, moved; not with driving_image",
            )

            id_scale: float | None = Field(
                None, ge=0.0, le=lim.max_id_scale,
                description="this person's identity scale (0 leaves the person's identity out); default: the "
                "instance's id_scale",
            )

            @field_validator("landmarks")
            @classmethod
            def _landmarks(cls, v: list[list[float]] | None, info) -> list[list[float]] | None:
                if v is not None and info.data.get("driving_image") is not None:
                    raise ValueError("give driving_image or landmarks as the target, not both")
                return v

            @field_validator("bbox")
            @classmethod
            def _bbox(cls, v: list[float] | None) -> list[float] | None:
                if v is not None and (v[0] >= v[2] or v[1] >= v[3]):
                    raise ValueError(f"bbox must be [y0, x0, y1, x1] within [0, 1] with y0 < y1 and x0 < x1, got {v}")
                return v

        class Instance(BaseModel):
            """One image to generate (a v1 instance; the same fields as a v2 request's tensors)."""

            model_config = ConfigDict(extra="forbid", strict=True, title="Instance")
            prompt: str = Field(min_length=1, max_length=lim.max_prompt_chars)
            negative_prompt: str = Field("", max_length=lim.max_prompt_chars)
            identities: list[Identity] = Field(min_length=1, max_length=lim.max_ids)
            seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="default: random (returned)")
            num_inference_steps: int | None = Field(None, ge=1, le=lim.max_steps,
                                                    description=f"default {lim.default_steps}")
            guidance_scale: float | None = Field(None, ge=lim.min_guidance, le=lim.max_guidance,
                                                 description=f"default {lim.default_guidance}")
            id_scale: float | None = Field(None, ge=0.0, le=lim.max_id_scale,
                                           description=f"default {lim.default_id_scale}; the default of every "
                                           "identity without its own id_scale")
            height: side | None = Field(None, description=f"pixels, multiple of 8, default {lim.resolution}")
            layout: Literal["auto", "strips"] | None = Field(
                None, description="where several people go when no identity gives a bbox: auto = one region per "
                "person from SAA's activation maps of the first steps (default for 2-4 people), strips = equal "
                "vertical strips; not together with bboxes")
            layout_maps: bool = Field(False, description="layout auto: also return the activation maps and the "
                                      "regions found as a PNG (layout_maps of the prediction)")
            width: side | None = Field(None, description=f"pixels, multiple of 8, default {lim.resolution}")

        class IdentityResult(BaseModel):
            region: list[float] = Field(min_length=4, max_length=4,
                                        description="[y0, x0, y1, x1] used (layout auto: the region found)")
            edited: bool = Field(description="an expression / pose edit was applied")

        class Prediction(BaseModel):
            model_config = ConfigDict(title="Prediction")
            image: str = Field(description="base64 PNG", json_schema_extra={"contentEncoding": "base64"})
            seed: int
            identities: list[IdentityResult]
            layout: str = Field("boxes", description="the layout used: boxes | strips | auto")
            layout_maps: str | None = Field(None, description="base64 PNG: each person's activation map and "
                                            "region in one colour (asked with layout_maps, layout auto only)")

        class V1Request(BaseModel):
            model_config = ConfigDict(extra="forbid", title="V1PredictRequest")
            instances: list[Instance] = Field(min_length=1)

        class V1Response(BaseModel):
            model_config = ConfigDict(title="V1PredictResponse")
            predictions: list[Prediction]

        self.identity_model, self.instance_model = Identity, Instance
        self.v1_request_model, self.v1_response_model = V1Request, V1Response

    # ------------------------------------------------------------------ schema documents
    def json_schema(self) -> dict[str, Any]:
        """JSON Schemas of the v1 request and response bodies (the v2 tensors carry the same fields)."""
        return {"request": self.v1_request_model.model_json_schema(),
                "response": self.v1_response_model.model_json_schema(mode="serialization")}

    # ------------------------------------------------------------------ parsing
    def _error(self, err: ValidationError, namer: FieldNamer) -> ServingError:
        problems = err.errors(include_url=False)
        e = problems[0]
        path = field_path(tuple(e["loc"]))
        kind, got = e["type"], e.get("input")
        if kind == "extra_forbidden":
            owner = self.identity_model if "identities" in path else self.instance_model
            reason, msg = "unknown_field", f"unknown field; allowed fields: {', '.join(owner.model_fields)}"
        elif path == "identities" and kind == "too_long":
            reason = "too_many_identities"
            msg = f"{len(got)} identities given, at most {self.limits.max_ids} (model.max_ids)"
        elif ".landmarks" in path:
            reason = "bad_landmarks"
            if path.endswith(".landmarks") and kind in ("too_short", "too_long"):
                msg = f"expected {layout_text(self.limits.landmark_count)} as [x, y] pairs, got {len(got)}"
            elif kind == "value_error":
                msg = e["msg"].removeprefix("Value error, ")
                reason = "invalid_field" if "not both" in msg else reason
            else:
                msg = f"each point is [x, y], finite numbers: {e['msg']} (got {str(got)[:80]})"
        elif ".bbox" in path and kind in ("value_error", "greater_than_equal", "less_than_equal"):
            reason = "bbox_out_of_range"
            msg = e["msg"].removeprefix("Value error, ") + ("" if kind == "value_error" else f" (got {got!r})")
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                      "too_long", "too_short", "string_too_long", "string_too_short"):
            long = isinstance(got, (list, str)) and len(str(got)) >= 80
            shown = f"{type(got).__name__} of length {len(got)}" if long else got
            reason, msg = "out_of_range", f"{e['msg']} (got {shown!r})"
        elif kind == "missing":
            reason, msg = "missing_field", "required field is missing"
        else:
            reason, msg = "invalid_field", f"{e['msg']} (got {type(got).__name__})"
        if len(problems) > 1:
            others = ", ".join(namer(field_path(tuple(p["loc"]))) for p in problems[1:4])
            msg += f" (and {len(problems) - 1} more: {others})"
        return bad_request(reason, msg, namer(path))

    def parse(self, raw: Any, namer: FieldNamer = same_name, timing: RequestTiming | None = None) -> GenerationRequest:
        """A JSON instance -> GenerationRequest; images decoded only after every other field passed
        (their decoding is added to ``timing``'s image_decode phase)."""
        if not isinstance(raw, dict):
            raise bad_request("invalid_field", f"expected a JSON object, got {type(raw).__name__}", namer("") or None)
        try:
            inst = self.instance_model.model_validate(raw)
        except ValidationError as err:
            raise self._error(err, namer) from None
        lim = self.limits
        identities = []
        for i, ident in enumerate(inst.identities):
            with timed(timing, "image_decode"):
                image = decode_image(ident.image, namer(f"identities[{i}].image"), lim.max_image_bytes,
                                     lim.max_image_pixels, lim.image_formats)
                driving = None
                if ident.driving_image is not None:
                    driving = decode_image(ident.driving_image, namer(f"identities[{i}].driving_image"),
                                           lim.max_image_bytes, lim.max_image_pixels, lim.image_formats)
            lmk = None if ident.landmarks is None else np.asarray(ident.landmarks, dtype=np.float32)  # [L, 2]
            identities.append(IdentityRequest(image=image, bbox=tuple(ident.bbox) if ident.bbox else None,
                                              expression=ident.expression, driving_image=driving, landmarks=lmk,
                                              id_scale=ident.id_scale))
        return GenerationRequest(
            prompt=inst.prompt, negative_prompt=inst.negative_prompt, identities=identities,
            seed=inst.seed if inst.seed is not None else secrets.randbelow(2**31),
            num_inference_steps=inst.num_inference_steps or lim.default_steps,
            guidance_scale=lim.default_guidance if inst.guidance_scale is None else inst.guidance_scale,
            id_scale=lim.default_id_scale if inst.id_scale is None else inst.id_scale,
            height=inst.height or lim.resolution, width=inst.width or lim.resolution, field=namer,
            layout=inst.layout, layout_maps=inst.layout_maps,
        )


def layout_text(count: int | None) -> str:
    """"68 points in the iBUG 300-W 68-point order (dlib)": what a landmark error says is expected."""
    if not count:
        return "the face analyzer's landmark points (68 dlib, 106 insightface)"
    return f"{count} points in {LAYOUT_NAMES.get(count, 'the face analyzer layout')}"


def identity_index(message: str) -> int | None:
    """The identity a pipeline error names ("identity 2: no face found" -> 2)."""
    m = re.search(r"\bidentity (\d+)\b", message)
    return int(m.group(1)) if m else None


__all__ = ["Limits", "RequestSchema", "field_path", "GenerationRequest", "IdentityRequest", "identity_index",
           "SEED_LIMIT"]

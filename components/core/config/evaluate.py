"""Evaluation and the promotion gate (docs/evaluation.md defines every metric and check)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from model.config import StrictModel


class EvaluateParams(StrictModel):
    """The fixed evaluation set and how it is generated. Everything here goes into the evaluation
    set hash, so two reports are only compared when they measured the same thing."""

    checkpoint: str = Field("runs/reconfigure/export",
                            description="checkpoint to evaluate when --checkpoint is not given: a directory, "
                            "s3:// URI or models:/name@alias")
    output: str = "runs/evaluate"
    split: Literal["test", "val"] = Field("test", description="prepared split the references come from "
                                          "(identities never seen in training)")
    num_identities: int = Field(0, ge=0, description="held-out identities in the evaluation set (0 = every "
                                "one with a usable reference); the intervals are over these people")
    reference_image: Literal["face_crop", "pixels"] = Field(
        "face_crop", description="which stored image of a prepared sample is the reference photo")
    # The embedded (tiny) profile's base learned from test-bed captions that always name an expression, a pose and a
    # background, and draws no face from a generic prompt; these are in its language and name nothing of who a
    # person is. sd15 evaluates with generic prompts (components/core/config/profiles.py).
    prompts: list[str] = Field([f"a photo of a person, with a neutral expression, facing the camera, on a {c} "
                                "background" for c in ("grey", "blue")],
                               min_length=1, description="single-ID and edit prompts (edits use the first)")
    multi_prompts: list[str] = Field(["a photo of {count} people, facing the camera, on a grey background"],
                                     min_length=1, description="multi-ID prompts; {count} becomes two, three, ...")
    seeds: list[int] = Field([0], min_length=1)
    steps: int = Field(8, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0)
    id_scale: float | None = Field(None, ge=0.0, description="null = model.saa.id_scale")
    negative_prompt: str = ""
    multi_id: list[int] = Field([2, 3], description="identity counts of the multi-ID cases")
    multi_groups: int = Field(1, ge=1, description="groups of references per identity count")
    layouts: list[Literal["boxes", "strips"]] = Field(
        [], description="also generate every multi-ID case with these layouts, reported as multi<N>_boxes / "
        "multi<N>_strips next to multi<N> (the default layout: auto for 2-4 people); docs/evaluation.md")
    edits: list[str] = Field(["the expression is happy", "the face is turned to the left"],
                             description="expression/pose edits, in face-prompt words (model.motion)")
    landmark_edits: bool = Field(True, description="also edit each held-out person to the landmarks of another "
                                 "held-out person's photo (a driving photo with a different labelled expression "
                                 "and a turned head) and read the result against that photo's labels")
    motion_reader: Literal["trained", "landmarks"] = Field(
        "trained", description="how expression and pose are read from generated faces: trained = a small CNN fitted "
        "to the prepared training split's ground-truth labels (annotation records; for the test bed the renderer's), "
        "independent of the landmark rule; landmarks = that rule (for comparison only)")
    clip_model: str | None = Field(None, description="CLIPModel dir or s3:// URI for CLIP-T; null = the seeded "
                                   "tiny CLIP (tiny profile only; a plumbing check, not a score)")
    batch_size: int = Field(4, ge=1, description="images per pipeline call")
    grid_rows: int = Field(8, ge=1, description="rows per grid page")

    @field_validator("multi_id")
    @classmethod
    def _multi_sizes(cls, v: list[int]) -> list[int]:
        bad = [n for n in v if not 2 <= n <= 16]
        if bad:
            raise ValueError(f"identity counts must be between 2 and 16, got {bad}")
        return sorted(set(v))

    @field_validator("edits")
    @classmethod
    def _edits_parse(cls, v: list[str]) -> list[str]:
        from components.core.metric_catalogue import edit_target

        for text in v:
            edit_target(text)  # ValueError names the edit
        return v


def _check_names(v: dict[str, float], direction: str | None) -> dict[str, float]:
    from components.core.metric_catalogue import metric_info

    for name in v:
        info = metric_info(name)  # KeyError: unknown name, with the list of known ones
        if direction is not None and info.direction != direction:
            where = "gate.maximums" if info.direction == "lower" else "gate.minimums"
            raise ValueError(f"{name} is {info.direction}-is-better: put its threshold under {where}")
    return v


class GateParams(StrictModel):
    """What a candidate must show before it is registered (every check: docs/evaluation.md, the gate).

    A point value on its own can pass by luck on a few people, so effects that must exist (the identity lift,
    an edit moving the face) are gated on their 95 % interval over people: ``interval_above`` needs the whole
    interval strictly above the bound. Regression is measured against one fixed reference record, never
    against the previous champion, so small allowed losses cannot add up over successive promotions.
    """

    learning_checks: bool = Field(True, description="require the learning checks recorded in the checkpoint "
                                  "(stage 1 identity, stage 2 motion) to have passed on these very weights")
    minimums: dict[str, float] = Field(default_factory=dict,
                                       description="higher-is-better metric -> absolute minimum of its value")
    maximums: dict[str, float] = Field(default_factory=dict,
                                       description="lower-is-better metric -> absolute maximum of its value")
    interval_above: dict[str, float] = Field(
        default_factory=dict, description="metric -> bound its 95 % interval over people must lie strictly above")
    reference: str | None = Field(None, description="fixed reference record (JSON written by `dynamicid register "
                                  "--save-reference`, local path or s3:// URI) that max_regression compares with; "
                                  "null = no regression checks")
    max_regression: dict[str, float] = Field(
        default_factory=dict, description="metric -> allowed worsening vs the reference record, in the metric's units")
    promote: bool = Field(False, description="move the champion alias to a passing candidate (as --promote)")
    output: str = Field("runs/register", description="where registration.json is written")
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    await_registration_s: int = Field(300, ge=1, description="how long to wait for the version to be READY")

    @field_validator("minimums")
    @classmethod
    def _mins(cls, v: dict[str, float]) -> dict[str, float]:
        return _wrap(_check_names, v, "higher")

    @field_validator("maximums")
    @classmethod
    def _maxs(cls, v: dict[str, float]) -> dict[str, float]:
        return _wrap(_check_names, v, "lower")

    @field_validator("interval_above")
    @classmethod
    def _above(cls, v: dict[str, float]) -> dict[str, float]:
        return _wrap(_check_names, v, "higher")

    @field_validator("max_regression")
    @classmethod
    def _regs(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"allowed regressions must be >= 0, got {bad}")
        return _wrap(_check_names, v, None)

    @model_validator(mode="after")
    def _reference_needed(self) -> "GateParams":
        if self.max_regression and not self.reference:
            raise ValueError("max_regression needs gate.reference (the fixed record to compare with); "
                             "write one with `dynamicid register --save-reference PATH`")
        return self


def _wrap(fn, v, direction):
    """pydantic reports ValueError (not KeyError) with the field's key path; convert."""
    try:
        return fn(v, direction)
    except KeyError as err:
        raise ValueError(err.args[0]) from None

"""Evaluation and the promotion gate (docs/evaluation.md defines every metric and check)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

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
    num_identities: int = Field(3, ge=1, description="test-split identities in the evaluation set")
    reference_image: Literal["face_crop", "pixels"] = Field(
        "face_crop", description="which stored image of a prepared sample is the reference photo")
    prompts: list[str] = Field(["a photo of a person", "a portrait of a person outdoors"], min_length=1,
                               description="single-ID and edit prompts (edits use the first)")
    multi_prompts: list[str] = Field(["a photo of {count} people"],
                                     min_length=1, description="multi-ID prompts; {count} becomes two, three, ...")
    seeds: list[int] = Field([0], min_length=1)
    steps: int = Field(8, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0)
    id_scale: float | None = Field(None, ge=0.0, description="null = model.saa.id_scale")
    negative_prompt: str = ""
    multi_id: list[int] = Field([2, 3], description="identity counts of the multi-ID cases")
    multi_groups: int = Field(1, ge=1, description="groups of references per identity count")
    edits: list[str] = Field(["the expression is happy", "the face is turned to the left"],
                             description="expression/pose edits, in face-prompt words (model.motion)")
    expression_estimator: Literal["landmarks", "none"] = Field(
        "landmarks", description="landmarks = model.motion.estimate_expression; none = no expression agreement")
    clip_model: str | None = Field(None, description="CLIPModel dir or s3:// URI for CLIP-T; null = the seeded "
                                   "tiny CLIP (tiny profile only; a plumbing check, not a score)")
    batch_size: int = Field(4, ge=1, description="images per pipeline call")
    grid_rows: int = Field(8, ge=1, description="rows per grid page")
    compare_champion: bool = Field(True, description="also measure the registry's champion on this set when its "
                                   "recorded metrics come from a different evaluation set")

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
    """Thresholds a candidate must meet before it is registered (checks: docs/evaluation.md)."""

    minimums: dict[str, float] = Field(default_factory=dict,
                                       description="higher-is-better metric -> absolute minimum")
    maximums: dict[str, float] = Field(default_factory=dict,
                                       description="lower-is-better metric -> absolute maximum")
    max_regression: dict[str, float] = Field(
        default_factory=dict, description="metric -> allowed worsening vs the champion, in the metric's units")
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

    @field_validator("max_regression")
    @classmethod
    def _regs(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"allowed regressions must be >= 0, got {bad}")
        return _wrap(_check_names, v, None)


def _wrap(fn, v, direction):
    """pydantic reports ValueError (not KeyError) with the field's key path; convert."""
    try:
        return fn(v, direction)
    except KeyError as err:
        raise ValueError(err.args[0]) from None

"""Evaluation and the promotion gate."""

from __future__ import annotations

from pydantic import Field

from model.config import StrictModel


class EvaluateParams(StrictModel):
    output: str = "runs/evaluate"
    num_identities: int = Field(6, ge=1, description="test-split identities in the evaluation set")
    prompts: list[str] = ["a photo of a person", "a portrait of a person outdoors"]
    seeds: list[int] = [0, 1]
    steps: int = Field(20, ge=1)
    guidance_scale: float = 5.0
    multi_id: list[int] = [2, 3]
    edits: list[str] = ["the expression is happy", "the face is turned to the left"]


class GateParams(StrictModel):
    minimums: dict[str, float] = Field(default_factory=dict, description="metric -> absolute minimum")
    max_regression: dict[str, float] = Field(default_factory=dict, description="metric -> allowed drop vs champion")
    promote: bool = False

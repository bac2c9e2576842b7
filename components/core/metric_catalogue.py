"""The metric catalogue (names, directions, meanings) and the edit-text parser: what params validation, the
evaluation and the gate must agree on, importable without torch. Names are ``<kind>.<leaf>`` with kind
``single``, ``multi<N>`` (N identities per image, the default layout: auto for 2-4 people), ``multi<N>_boxes`` /
``multi<N>_strips`` (the same cases with user boxes / equal strips, evaluate.layouts), ``edit`` (text edits) or
``drive`` (edits to a driving photo's landmarks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class MetricInfo:
    direction: Direction
    description: str


_ID = "identity cosine similarity, reference vs detected generated face; a missed face counts 0"


SINGLE: dict[str, MetricInfo] = {
    "id_similarity": MetricInfo("higher", _ID),
    "shuffled_id_similarity": MetricInfo(
        "lower", "the control: similarity to this person's reference of the image generated (same prompt and seed) "
        "with another held-out person's ID tokens"),
    "id_lift": MetricInfo("higher", "id_similarity - shuffled_id_similarity, paired per case: how much of the "
                          "likeness comes from this person's tokens rather than from any person's"),
    "identification_rate": MetricInfo("higher", "fraction of cases whose generated face is closer to its own "
                                      "reference than to every other held-out person's (a missed face is wrong)"),
    "identification_chance": MetricInfo("higher", "1 / number of held-out people: identification_rate by guessing"),
    "detection_rate": MetricInfo("higher", "fraction of expected faces the detector found"),
    "copy_paste": MetricInfo("lower", "similarity to the reference photo minus the mean similarity to other photos "
                             "of the same person (MultiID-Bench): > 0 leans on the one photo rather than the person"),
    "clip_t": MetricInfo("higher", "CLIP image-text cosine of generated image and prompt"),
    "baseline_id_similarity": MetricInfo("higher", "id_similarity of the same prompt/seed with ID injection off"),
    "baseline_clip_t": MetricInfo("higher", "clip_t with ID injection off"),
    "clip_t_delta": MetricInfo("higher", "clip_t - baseline_clip_t: text alignment the ID path costs (< 0) or adds"),
    "people": MetricInfo("higher", "held-out people behind the numbers (N of the intervals)"),
}


MULTI: dict[str, MetricInfo] = {
    "id_similarity": MetricInfo("higher", _ID + "; faces matched to references by Hungarian assignment"),
    "confusion_rate": MetricInfo("lower", "fraction of people whose matched face is more similar to another "
                                 "person's reference than to their own"),
    "missing_rate": MetricInfo("lower", "fraction of people left without a face after matching"),
    "copy_paste": SINGLE["copy_paste"],
    "clip_t": SINGLE["clip_t"],
    "baseline_clip_t": SINGLE["baseline_clip_t"],
    "clip_t_delta": SINGLE["clip_t_delta"],
    "people": SINGLE["people"],
}


EDIT: dict[str, MetricInfo] = {
    "id_similarity": MetricInfo("higher", _ID + ", on the edited output"),
    "detection_rate": MetricInfo("higher", "fraction of edited outputs with a detected face"),
    "pose_error": MetricInfo("lower", "mean |measured - requested| of yaw and pitch in degrees (pose edits)"),
    "expression_agreement": MetricInfo("higher", "fraction of expression edits whose estimated expression matches"),
    "baseline_pose_error": MetricInfo("lower", "pose_error of the unedited output (same identity, prompt, seed)"),
    "baseline_expression_agreement": MetricInfo("higher", "expression_agreement of the unedited output"),
    "pose_error_gain": MetricInfo("higher", "baseline_pose_error - pose_error, paired per case: degrees the edit "
                                  "moves towards the request"),
    "expression_agreement_gain": MetricInfo("higher", "expression_agreement - baseline_expression_agreement, "
                                            "paired per case"),
    "people": SINGLE["people"],
}


DRIVE: dict[str, MetricInfo] = {
    **EDIT,
    "id_similarity": MetricInfo("higher", _ID + ", on the output edited to a driving photo's landmarks"),
    "detection_rate": MetricInfo("higher", "fraction of landmark-edited outputs with a detected face"),
    "pose_error": MetricInfo("lower", "mean |measured - driving photo's| yaw and pitch in degrees"),
    "expression_agreement": MetricInfo("higher", "fraction of landmark edits whose read expression is the driving "
                                       "photo's labelled expression"),
}


# The learning checks (components/train/checks.py): stage -> prefix of their metrics (``<prefix>_gain``,
# ``<prefix>_passed``, ...); training writes them, the gate and the summary read them.
LEARNING_CHECK_PREFIX: dict[str, str] = {"anchor": "id", "reconfigure": "imr"}


# Metrics reported with a 95 % interval over people (``<name>_low`` / ``<name>_high`` next to the value).
INTERVAL_SUFFIXES = ("_low", "_high")


_NAME = re.compile(r"^(single|multi(\d+)(?:_(?:boxes|strips))?|edit|drive)\.([a-z_]+)$")


def metric_info(name: str) -> MetricInfo:
    """Catalogue entry of a metric name; KeyError with the known names when unknown."""
    m = _NAME.match(name)
    table = None
    if m and m.group(3).endswith(INTERVAL_SUFFIXES) and "_" in m.group(3):
        base = name.rsplit("_", 1)[0]
        try:
            return metric_info(base)
        except KeyError:
            pass
    if m:
        kind = m.group(1)
        table = {"single": SINGLE, "edit": EDIT, "drive": DRIVE}.get(kind) or (
            MULTI if kind.startswith("multi") and int(m.group(2)) >= 2 else None)
    if table is None or m is None or m.group(3) not in table:
        raise KeyError(
            f"unknown metric {name!r}; known: single.<{'|'.join(SINGLE)}>, "
            f"multi<N>[_boxes|_strips].<{'|'.join(MULTI)}> (N >= 2), "
            f"edit.<{'|'.join(EDIT)}>, drive.<{'|'.join(DRIVE)}>"
        )
    return table[m.group(3)]


def higher_is_better(name: str) -> bool:
    return metric_info(name).direction == "higher"


@dataclass(frozen=True)
class EditTarget:
    """What an edit prompt asks for: an expression, a pose, or both."""

    text: str
    expression: str | None
    yaw: float
    pitch: float
    pose_requested: bool


def edit_target(text: str) -> EditTarget:
    """Parse an edit ("the expression is happy", "the face is turned to the left") with the same
    parser the IMR's face prompts use (model.motion.parse_face_prompt); ValueError if it asks nothing."""
    from model.motion import parse_face_prompt

    fp = parse_face_prompt(text)
    low = text.lower()
    pose = fp.yaw != 0.0 or fp.pitch != 0.0 or "frontal" in low
    return EditTarget(text=text, expression=fp.expression, yaw=fp.yaw, pitch=fp.pitch, pose_requested=pose)

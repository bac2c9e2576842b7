"""model/motion.py: the geometric expression rule on hand-made landmark sets (68 and 106 layouts),
pose words, face prompts and their parser."""

from __future__ import annotations

import numpy as np
import pytest

from model.motion import (
    EXPRESSIONS,
    INSIGHTFACE_106,
    ExpressionThresholds,
    describe_pose,
    estimate_expression,
    expression_features,
    face_frame,
    face_prompt,
    layout_for,
    parse_face_prompt,
)
from tests.fixtures import synthetic_landmarks

# Shapes named by what a face does; values sit clearly on one side of the default thresholds.
CASES = {
    "neutral": {},
    "smile": dict(corner_lift=0.12, mouth_width=1.0),
    "laugh": dict(mouth_open=0.75, corner_lift=0.10, mouth_width=1.0),
    "open-mouth surprise": dict(mouth_open=0.9, corner_lift=0.0, brow_raise=0.6, eye_open=0.5),
    "brow surprise": dict(brow_raise=0.65, eye_open=0.5),
    "frown": dict(brow_raise=0.24, eye_open=0.22),
    "sad": dict(corner_lift=-0.09),
}
EXPECTED = {
    "neutral": "neutral",
    "smile": "happy",
    "laugh": "happy",
    "open-mouth surprise": "surprised",
    "brow surprise": "surprised",
    "frown": "angry",
    "sad": "sad",
}


@pytest.mark.parametrize("count", [68, 106])
@pytest.mark.parametrize("case", list(CASES))
def test_expression_rule_on_hand_made_faces(case, count):
    lm = synthetic_landmarks(count, **CASES[case])
    assert estimate_expression(lm) == EXPECTED[case]


@pytest.mark.parametrize("count", [68, 106])
def test_features_are_measured_exactly(count):
    shape = dict(mouth_open=0.5, mouth_width=0.9, corner_lift=0.07, eye_open=0.33, brow_raise=0.47)
    f = expression_features(synthetic_landmarks(count, **shape))
    assert (f.mouth_open, f.mouth_width, f.corner_lift, f.eye_open, f.brow_raise) == pytest.approx(
        tuple(shape.values()), abs=1e-9
    )


@pytest.mark.parametrize("count", [68, 106])
def test_features_ignore_position_scale_roll_and_point_order(count):
    base = expression_features(synthetic_landmarks(count, corner_lift=0.08))
    for kw in (dict(scale=37.0, centre=(10.0, 900.0)), dict(roll_deg=35.0), dict(roll_deg=180.0)):
        moved = expression_features(synthetic_landmarks(count, corner_lift=0.08, **kw))
        assert moved.__dict__ == pytest.approx(base.__dict__, abs=1e-9), kw
    # Points may be in any order inside their groups (only 2d106's group ranges are relied on).
    lm = synthetic_landmarks(count, corner_lift=0.08)
    layout = layout_for(lm)
    rng = np.random.default_rng(0)
    shuffled = lm.copy()
    for group in (layout.contour, *layout.eyes, *layout.brows, layout.nose, layout.mouth):
        idx = list(group)
        shuffled[idx] = lm[rng.permutation(idx)]
    assert expression_features(shuffled).__dict__ == pytest.approx(base.__dict__, abs=1e-9)


def test_face_frame_points_down_the_face_even_upside_down():
    lm = synthetic_landmarks(106, roll_deg=180.0, scale=50.0, centre=(0.0, 0.0))
    frame = face_frame(lm)
    np.testing.assert_allclose(frame.y_axis, [0.0, -1.0], atol=1e-9)  # the mouth is above the eyes
    assert frame.iod == pytest.approx(50.0)
    mouth = frame.project(lm[list(INSIGHTFACE_106.mouth)])
    assert mouth[:, 1].mean() == pytest.approx(1.16, abs=1e-9)


def test_thresholds_are_parameters():
    smile = synthetic_landmarks(68, corner_lift=0.12)
    assert estimate_expression(smile, ExpressionThresholds(smile_lift=0.2)) == "neutral"


@pytest.mark.parametrize(
    "bad",
    [np.zeros((5, 2)), np.zeros((68, 3)), np.full((68, 2), np.nan), np.zeros((68, 2))],
)
def test_bad_landmarks_raise(bad):
    with pytest.raises(ValueError):
        estimate_expression(bad)


@pytest.mark.parametrize(
    "yaw, pitch, words",
    [
        (0.0, 0.0, "the face is frontal"),
        (9.9, -9.9, "the face is frontal"),
        (-10.0, 0.0, "the face is slightly turned to the left"),
        (18.0, 0.0, "the face is slightly turned to the right"),
        (-30.0, 0.0, "the face is turned to the left"),
        (0.0, 12.0, "the face is slightly tilted up"),
        (0.0, -40.0, "the face is tilted down"),
        (30.0, -15.0, "the face is turned to the right and slightly tilted down"),
    ],
)
def test_describe_pose(yaw, pitch, words):
    assert describe_pose(yaw, pitch) == words


def test_face_prompt_and_its_parser():
    assert face_prompt("happy", -15.0, 3.0) == "the expression is happy, the face is slightly turned to the left"
    assert face_prompt(" Sad ", 0.0, 0.0) == "the expression is sad, the face is frontal"
    with pytest.raises(ValueError, match="unknown expression 'grumpy'"):
        face_prompt("grumpy", 0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        describe_pose(float("nan"), 0.0)
    # Round trip: the parsed angles fall in the range the words describe.
    for expression in EXPRESSIONS:
        for yaw in (-40.0, -15.0, 0.0, 15.0, 40.0):
            for pitch in (-30.0, 0.0, 12.0):
                parsed = parse_face_prompt(face_prompt(expression, yaw, pitch))
                assert parsed.expression == expression
                assert describe_pose(parsed.yaw, parsed.pitch) == describe_pose(yaw, pitch)
    loose = parse_face_prompt("Surprised,  turned to the right")
    assert (loose.expression, loose.yaw, loose.pitch) == ("surprised", 35.0, 0.0)
    with pytest.raises(ValueError, match="unknown expression 'grumpy'"):
        parse_face_prompt("the expression is grumpy, the face is frontal")
    with pytest.raises(ValueError, match="names no expression and no pose"):
        parse_face_prompt("a photo of a person")

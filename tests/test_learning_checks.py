"""The learning checks have real controls and fail on models that lack the property they check.

Broken models are built for real (their weights are changed, nothing is mocked): an identity-blind face encoder
whose tokens are the same for everyone, and a motion-blind IMR whose motion latents ignore the asked motion. The
statistics are intervals over people (components.core.stats), tested on values whose answer is known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.stats import clustered_interval
from components.train.checks import (
    heldout_people,
    id_token_check,
    identity_triples,
    imr_check,
    motion_pairs,
    shuffled_targets,
)

# --------------------------------------------------------------------------- statistics


def test_interval_is_over_people_and_each_person_counts_once():
    # person a: 10 values of 1.0; b and c: one value each of -1.0 and 2.0 -> mean of means (1 - 1 + 2) / 3
    values = [1.0] * 10 + [-1.0, 2.0]
    people = ["a"] * 10 + ["b", "c"]
    iv = clustered_interval(values, people)
    assert iv.mean == pytest.approx(2 / 3) and iv.people == 3 and iv.values == 12
    assert iv.low <= -0.99 and iv.high >= 1.99 and not iv.excludes(0.0)  # 3 people: wide, whatever 10 images say


def test_copies_of_one_persons_images_do_not_narrow_the_interval():
    rng = np.random.default_rng(0)
    means = rng.normal(0.1, 1.0, size=8)
    once = clustered_interval(means, range(8))
    many = clustered_interval(np.repeat(means, 50), np.repeat(np.arange(8), 50))
    assert (many.low, many.high) == pytest.approx((once.low, once.high))


def test_a_clear_effect_is_excluded_from_zero_and_no_effect_is_not():
    people = np.repeat(np.arange(10), 3)
    assert clustered_interval(1.0 + 0.1 * np.sin(np.arange(30)), people).excludes(0.0)
    assert not clustered_interval(np.zeros(30), people).excludes(0.0)
    assert not clustered_interval([5.0, 6.0], ["only", "only"]).excludes(0.0)  # one person proves nothing
    with pytest.raises(ValueError, match="finite"):
        clustered_interval([1.0, float("nan")], ["a", "b"])


# --------------------------------------------------------------------------- held-out people and controls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from components.core.shards import PreparedData
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("checks-data")
    write_testbed(root, identities=6, images_per_identity=4, test_identities=3)
    return PreparedData(root)


def test_checks_use_only_people_never_seen_in_training(data):
    split, people = heldout_people(data)
    assert split == "test" and len(people) == 3
    trained = set(data.identities("train"))
    assert not trained & set(people)
    for target, own, other in identity_triples(data, people, limit=0):
        who = data.index[target]["identity"]
        assert own != target and data.index[own]["identity"] == who  # another photo of the same person
        assert data.index[other]["identity"] != who and data.index[other]["identity"] in people


def test_motion_controls_ask_for_another_motion(data):
    _, people = heldout_people(data)
    pairs = motion_pairs(data, people, limit=0)
    assert pairs
    for (source, target), shuffled in zip(pairs, shuffled_targets(data, pairs)):
        assert data.index[source]["identity"] == data.index[target]["identity"]
        assert data.index[source]["face_prompt"] != data.index[target]["face_prompt"]
        assert data.index[shuffled]["face_prompt"] != data.index[target]["face_prompt"]


# --------------------------------------------------------------------------- broken models fail


def _tasks(tiny_params, seed=0):
    from tests.trained import tasks

    return tasks(tiny_params, None, seed)  # untrained parts over the seeded base (trained ones: test_trained_behaviour)


def test_identity_blind_model_fails_the_identity_check(tiny_params, data):
    dyn, anchor, _ = _tasks(tiny_params)
    kw = dict(limit=0, resolution=tiny_params.model.tiny.resolution, repeats=1, seed=0)
    aware = id_token_check(anchor, data, **kw)
    assert aware["heldout_loss_own_id"] != aware["heldout_loss_other_id"]  # different people, different tokens
    empty = id_token_check(anchor, data, prompt="", **kw)  # the diagnostic reading: tokens as the only condition
    assert empty["heldout_loss_own_id"] != aware["heldout_loss_own_id"]
    with torch.no_grad():  # same tokens for everyone: the embedding and the CLIP features no longer reach them
        dyn.face_encoder.id_mlp[0].weight.zero_()
        dyn.face_encoder.clip_proj.weight.zero_()
    for prompt in (None, ""):
        blind = id_token_check(anchor, data, prompt=prompt, **kw)
        assert blind["id_gain"] == 0.0 and blind["id_gain_low"] == 0.0 and blind["id_gain_high"] == 0.0
        assert blind["id_passed"] == 0.0 and blind["id_gain_people"] == 3.0


def test_motion_blind_imr_fails_the_motion_check(tiny_params, data):
    dyn, _, recon = _tasks(tiny_params)
    aware = imr_check(recon, data, limit=0)
    assert aware["heldout_dist_pred"] != aware["heldout_dist_shuffled"]
    with torch.no_grad():  # motion latents no longer depend on landmarks or face prompt
        dyn.imr.motion_mlp[1].weight.zero_()
    blind = imr_check(recon, data, limit=0)
    assert blind["imr_gain"] == 0.0 and blind["imr_gain_passed"] == 0.0 and blind["imr_passed"] == 0.0
    assert blind["imr_gain_people"] == 3.0


def test_the_check_reading_runs_the_shipped_check_and_each_asked_prompt(data, capsys):
    """benchmarks/testbed/id_check.py: one JSON line per reading, the captions first when asked for, each with
    the check's interval over the held-out people."""
    import json

    from benchmarks.testbed.id_check import main

    main(["--checkpoint", "init", "-S", f"data.prepared={data.root}", "-S", "train.check_images=4",
          "-S", "train.check_repeats=1", "--caption", "--prompt", ""])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["caption", ""]
    for r in rows:
        assert r["checkpoint"] == "init" and r["id_gain_people"] == 3.0
        assert r["id_gain_low"] <= r["id_gain"] <= r["id_gain_high"]
    assert rows[0]["id_gain"] != rows[1]["id_gain"]


def test_the_check_reading_needs_held_out_people(tmp_path):
    from benchmarks.testbed.id_check import main
    from components.train.testbed import write_testbed

    write_testbed(tmp_path, identities=3, images_per_identity=2, test_identities=1)
    with pytest.raises(SystemExit, match="no held-out people"):
        main(["--checkpoint", "init", "-S", f"data.prepared={tmp_path}"])

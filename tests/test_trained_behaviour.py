"""Behaviour on trained weights (issue 16, item 3): the GPU-trained test-bed model uses identity and follows the asked
motion on people it never saw, and the same weights with that property cut out, or untrained parts, do not.

The weights are tests/fixtures/testbed_trained (the GPU test-bed recipe's stage-2 export, both stages' parts,
rounded to fp16; its README holds the commands that rebuild it), over the stored base model/testbed_base they were
trained on. The people are rendered here with another renderer seed than the training data's, so none of them was
trained on: 24 held-out people, 12 photos each, the stage-1 check's intervals clustered by person (docs/evaluation.md,
"the curriculum", gives how often other draws of 24 people pass). Broken models are built for real by changing
weights, as tests/test_learning_checks.py does on untrained ones.
"""

from __future__ import annotations

import torch

from components.train.checks import id_token_check, imr_check
from tests.trained import NEW_PEOPLE as PEOPLE
from tests.trained import TRAINED as FIXTURE
from tests.trained import tasks as _tasks


def _id_check(params, anchor, data, limit: int = 0) -> dict[str, float]:
    with torch.no_grad():
        return id_token_check(anchor, data, limit=limit, resolution=params.model.tiny.resolution, repeats=2, seed=0)


def test_the_fixture_is_the_trained_recipe_over_the_stored_base():
    import json

    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assert manifest["stage"] == "reconfigure" and manifest["dims"]["profile"] == "tiny"
    assert set(manifest["parts"]) == {"face_encoder", "saa", "imr", "keypoint_encoder"}
    assert manifest["fixture"]["base"] == "model/testbed_base" and not manifest["bundled_base"]
    learned = manifest["fixture"]["learning_checks_fp32"]  # what the GPU run measured before the rounding
    assert learned["anchor"]["id_gain_passed"] == 1.0 and learned["reconfigure"]["imr_passed"] == 1.0
    assert (FIXTURE / "README.md").read_text().count("run_gpu.sh") >= 3  # the commands that rebuild it


def test_trained_tokens_carry_identity_to_new_people_and_an_identity_blind_copy_does_not(trained_params, new_people):
    dyn, anchor, _ = _tasks(trained_params, FIXTURE)
    trained = _id_check(trained_params, anchor, new_people)
    assert trained["id_gain_people"] == PEOPLE and trained["id_gain_comparisons"] >= 400
    assert trained["id_gain_low"] > 0 and trained["id_passed"] == 1.0  # own tokens beat another person's
    with torch.no_grad():  # the same trained weights; the embedding and the CLIP features no longer reach the tokens
        dyn.face_encoder.id_mlp[0].weight.zero_()
        dyn.face_encoder.clip_proj.weight.zero_()
    blind = _id_check(trained_params, anchor, new_people, limit=2 * PEOPLE)  # exactly 0 needs few images
    assert blind["id_gain_people"] == PEOPLE and blind["id_gain"] == 0.0 and blind["id_passed"] == 0.0


def test_untrained_parts_over_the_same_base_do_not_pass_the_identity_check(trained_params, new_people):
    _, anchor, _ = _tasks(trained_params, None)
    untrained = _id_check(trained_params, anchor, new_people)
    assert untrained["id_gain_people"] == PEOPLE and untrained["id_passed"] == 0.0
    assert untrained["id_gain_low"] <= 0 <= untrained["id_gain_high"]


def test_trained_imr_moves_toward_the_asked_motion_and_a_motion_blind_copy_does_not(trained_params, new_people):
    dyn, _, recon = _tasks(trained_params, FIXTURE)
    with torch.no_grad():
        trained = imr_check(recon, new_people, limit=0)
    assert trained["imr_gain_people"] == PEOPLE
    assert trained["imr_gain_low"] > 0 and trained["imr_stay_ratio_passed"] == 1.0 and trained["imr_passed"] == 1.0
    # closer to the asked motion than to the source, and than a shuffled target is
    assert trained["heldout_dist_pred"] < min(trained["heldout_dist_source"], trained["heldout_dist_shuffled"])
    with torch.no_grad():  # motion latents no longer depend on the landmarks or the face prompt
        dyn.imr.motion_mlp[1].weight.zero_()
        blind = imr_check(recon, new_people, limit=0)
    assert blind["imr_gain"] == 0.0 and blind["imr_passed"] == 0.0


def test_the_fixture_writer_rounds_every_part_and_keeps_the_export_loadable(init_ckpt, tmp_path):
    """benchmarks/testbed/fixture.py on a checkpoint with both stages' parts: fp16 files whose hashes the loader
    verifies, no bundled base, no learning-check record (it would describe the unrounded weights)."""
    from benchmarks.testbed.fixture import write_fixture
    from model.checkpoint import load_parts

    manifest = write_fixture(init_ckpt, tmp_path / "fixture")
    loaded, parts = load_parts(tmp_path / "fixture")  # verify=True: every file's sha256 against the manifest
    _, original = load_parts(init_ckpt)
    assert set(parts) == set(original) and not loaded["bundled_base"] and "learning_checks" not in loaded
    assert not (tmp_path / "fixture" / "base").exists() and loaded["fixture"]["rounded"] == "fp16"
    for name, state in parts.items():
        for key, value in state.items():
            assert value.dtype == torch.float16
            assert torch.equal(value, original[name][key].to(torch.float16))
    assert manifest["files"] == loaded["files"]

"""The identity-signal diagnostic (benchmarks/testbed/id_signal.py) tells a face encoder that separates people from one
that gives everyone the same tokens. The blind encoder is built for real (its input layers zeroed), as in
tests/test_learning_checks.py; the readings of the blind model are exact, not thresholds."""

from __future__ import annotations

import pytest
import torch

from benchmarks.testbed.id_signal import measure_task


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from components.core.shards import PreparedData
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("id-signal-data")
    write_testbed(root, identities=4, images_per_identity=4, test_identities=1)
    return PreparedData(root)


def _task(tiny_params):
    from components.train.tasks import AnchorTask
    from model.dynamicid import build_dynamicid
    from model.loading import load_backbone_for

    bb = load_backbone_for(tiny_params.model, tiny_params.storage.cache_dir)
    torch.manual_seed(0)
    dyn = build_dynamicid(bb, tiny_params.model, "dlib")
    return dyn, AnchorTask(bb, dyn, tiny_params.model, 0).eval()


def test_a_blind_encoder_reads_as_no_spread_and_no_identity_gain(tiny_params, data):
    dyn, task = _task(tiny_params)
    kw = dict(split="train", people=3, photos=3, repeats=1, resolution=tiny_params.model.tiny.resolution)
    aware = measure_task(task, data, **kw)
    assert aware["people"] == 3 and aware["tokens"]["relative_spread"] > 0.01
    assert aware["loss"]["caption_own"] != aware["loss"]["caption_other"]
    assert aware["inputs"]["embedding"]["centred_within"] > aware["inputs"]["embedding"]["centred_between"]

    with torch.no_grad():  # same tokens for everyone: neither the embedding nor the CLIP features reach them
        dyn.face_encoder.id_mlp[0].weight.zero_()
        dyn.face_encoder.clip_proj.weight.zero_()
    blind = measure_task(task, data, **kw)
    assert blind["tokens"]["relative_spread"] < 1e-6
    assert blind["id_gain_with_caption"] == 0.0 and blind["id_gain_without_caption"] == 0.0
    assert blind["inputs"] == aware["inputs"]  # the inputs did not change, only what the encoder makes of them
    assert blind["text_gain"] != 0.0  # the text still conditions the UNet


def test_too_few_people_is_a_clear_error(tiny_params, data):
    _, task = _task(tiny_params)
    with pytest.raises(ValueError, match="fewer than 2 people"):
        measure_task(task, data, split="test", people=3, photos=3, repeats=1,
                     resolution=tiny_params.model.tiny.resolution)


def test_the_capacity_fit_reads_identity_only_through_a_seeing_encoder(tiny_params, data):
    from benchmarks.testbed.id_capacity import fit_task

    kw = dict(people=3, steps=6, lr=1e-3, caption=False, readings=2, resolution=tiny_params.model.tiny.resolution,
              repeats=1)
    _, task = _task(tiny_params)
    aware = list(fit_task(task, data, **kw))
    assert [r["step"] for r in aware] == [0, 3, 6] and aware[-1]["samples"] == 18
    assert aware[-1]["loss_own"] < aware[0]["loss_own"]  # the fit trains
    assert all(r["id_gain"] != 0.0 and r["token_spread"] > 0.01 for r in aware)

    dyn, task = _task(tiny_params)
    with torch.no_grad():  # blind for good: the input layers zeroed and frozen, so the fit cannot reopen them
        for layer in (dyn.face_encoder.id_mlp[0], dyn.face_encoder.clip_proj):
            layer.weight.zero_()
            layer.weight.requires_grad_(False)
    blind = list(fit_task(task, data, **kw))
    assert blind[-1]["loss_own"] < blind[0]["loss_own"]  # it trains all the same ...
    assert all(r["id_gain"] == 0.0 and r["token_spread"] < 1e-6 for r in blind)  # ... and never tells people apart


def test_the_capacity_fit_needs_two_people(tiny_params, data):
    from benchmarks.testbed.id_capacity import fit_task

    _, task = _task(tiny_params)
    with pytest.raises(ValueError, match="at least 2 people"):
        next(fit_task(task, data, people=1, steps=1, lr=1e-3, caption=False,
                      resolution=tiny_params.model.tiny.resolution))


def test_the_branch_reading_tells_a_silent_branch_and_a_blind_one_from_a_working_one(tiny_params, data):
    """benchmarks/testbed/id_branch.py: what the ID branch adds at SAA's cross-attentions, and how much of it changes
    with another person's tokens. Two broken models, built for real: a blind encoder (same tokens for everyone)
    still adds something, but nothing that depends on the person; a silent branch (every to_v_id zeroed) adds
    exactly nothing."""
    from benchmarks.testbed.id_branch import measure_task as branch
    from model.saa.processor import SAAAttnProcessor

    dyn, task = _task(tiny_params)
    kw = dict(people=3, timesteps=[500], resolution=tiny_params.model.tiny.resolution)
    seeing = branch(task, data, **kw)["timesteps"]["500"]
    assert seeing["id_out"] > 0.01 and seeing["id_by_person"] > 0.01 and seeing["text_out"] > 0.01
    procs = [p for p in task.backbone.unet.attn_processors.values() if isinstance(p, SAAAttnProcessor)]
    assert procs and all("_add_id_branch" not in vars(p) for p in procs)  # the recording undid its patches

    with torch.no_grad():
        dyn.face_encoder.id_mlp[0].weight.zero_()
        dyn.face_encoder.clip_proj.weight.zero_()
    blind = branch(task, data, **kw)["timesteps"]["500"]
    assert blind["id_out"] > 0.01 and blind["id_by_person"] == 0.0
    assert blind["id_gain"] == 0.0 and blind["id_gain_same_photo"] == 0.0

    with torch.no_grad():
        for p in procs:
            p.to_v_id.weight.zero_()
    silent = branch(task, data, **kw)["timesteps"]["500"]
    assert silent["id_out"] == 0.0 and silent["id_by_person"] == 0.0
    assert silent["id_gain"] == 0.0 and silent["text_out"] > 0.01  # nothing of the person reaches the loss


def test_the_detection_ceiling_counts_faces_in_real_photos_and_none_in_blanks(tiny_params, data):
    """benchmarks/testbed/detect_real.py: the evaluation's analyzer on real test-bed photos, by pose. Control: the
    same photos blanked read 0, so the rate is the detector seeing faces, not a count of images."""
    import dataclasses

    import numpy as np

    from benchmarks.testbed.detect_real import detection_ceiling, pose_group
    from model.face_analysis.backends import build_face_analyzer

    analyzer = build_face_analyzer(tiny_params.face, tiny_params.model.profile)
    real = detection_ceiling(analyzer, data, "train")
    assert real["people"] == 3 and real["photos"] == 12 == sum(g["photos"] for g in real["groups"].values())
    assert real["rate"] > 0 and set(real["groups"]) <= {"frontal", "turned", "up/down"}

    class Blank:
        def __init__(self, inner):
            self.inner = inner

        def identities(self, split):
            return self.inner.identities(split)

        def sample(self, pos):
            s = self.inner.sample(pos)
            return dataclasses.replace(s, pixels=np.full_like(s.pixels, 128))

    blank = detection_ceiling(analyzer, Blank(data), "train")
    assert blank["rate"] == 0.0 and blank["photos"] == 12
    assert (pose_group(0, 0), pose_group(-18, 0), pose_group(0, 14)) == ("frontal", "turned", "up/down")
    with pytest.raises(ValueError, match="no people"):
        detection_ceiling(analyzer, data, "val")

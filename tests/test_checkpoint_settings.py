"""Settings that shape training travel with the weights: a checkpoint records SAA's gating and tau and the face
crop size, and loading it under params that contradict them is refused with the params key named."""

from __future__ import annotations

import json

import pytest

from components.core.config import params_from_dict
from model.checkpoint import CheckpointError, read_manifest
from model.loading import init_checkpoint, load_pipeline


@pytest.fixture(scope="module")
def ckpt(tiny_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("settings") / "ckpt"
    return init_checkpoint(tiny_params.model, tiny_params.face, out, tiny_params.storage.cache_dir, seed=1)


def _params(tiny_params, **saa):
    return params_from_dict({"storage": {"cache_dir": tiny_params.storage.cache_dir}, "model": {"saa": saa}})


def test_the_checkpoint_records_the_training_settings(ckpt, tiny_params):
    settings = read_manifest(ckpt)["dims"]["settings"]
    assert settings == {"model.saa.gating": True, "model.saa.tau": tiny_params.model.saa.tau,
                        "model.face_crop_size": tiny_params.model.tiny.face_crop_size}


@pytest.mark.parametrize("saa, key", [({"tau": 0.5}, "model.saa.tau"), ({"gating": False}, "model.saa.gating")])
def test_contradicting_settings_are_refused_naming_the_key(ckpt, tiny_params, saa, key):
    p = _params(tiny_params, **saa)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        load_pipeline(p.model, p.face, ckpt, p.storage.cache_dir, device="cpu")
    assert "trained with" in str(err.value)


def test_inference_only_settings_may_differ(ckpt, tiny_params):
    """boost and id_scale are chosen per request: they do not contradict the checkpoint."""
    p = _params(tiny_params, boost=1.0, boost_steps=1, id_scale=0.5)
    pipe = load_pipeline(p.model, p.face, ckpt, p.storage.cache_dir, device="cpu")
    assert pipe.checkpoint_manifest["dims"]["settings"]["model.saa.tau"] == tiny_params.model.saa.tau


def test_tau_does_not_matter_when_both_sides_have_gating_off(tiny_params, tmp_path):
    off = _params(tiny_params, gating=False, tau=0.3)
    ckpt = init_checkpoint(off.model, off.face, tmp_path / "off", off.storage.cache_dir, seed=1)
    other = _params(tiny_params, gating=False, tau=0.7)
    load_pipeline(other.model, other.face, ckpt, other.storage.cache_dir, device="cpu")  # no error


def test_a_checkpoint_without_recorded_settings_still_loads(ckpt, tiny_params, tmp_path):
    """Checkpoints written before settings were recorded compare nothing (and keep loading)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["dims"]["settings"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    p = _params(tiny_params, tau=0.5)
    load_pipeline(p.model, p.face, old, p.storage.cache_dir, device="cpu")

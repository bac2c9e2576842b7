"""End-to-end DynamicIDPipeline in the tiny profile with the real dlib face models."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from components.cli import main
from components.core.config import params_from_dict
from model.checkpoint import CheckpointError, read_manifest
from model.loading import load_pipeline
from model.pipeline import GenerationError, IdentityInput


@pytest.fixture(scope="module")
def ckpt(init_ckpt):
    return init_ckpt


@pytest.fixture(scope="module")
def pipe(tiny_params, ckpt):
    p = load_pipeline(tiny_params.model, tiny_params.face, ckpt, tiny_params.storage.cache_dir)
    p.set_progress(False)
    return p


@pytest.fixture(scope="module")
def hanks(single_face_photo) -> np.ndarray:
    return np.asarray(Image.open(single_face_photo).convert("RGB"))


@pytest.fixture(scope="module")
def group_faces(pipe, group_photo) -> list[np.ndarray]:
    """Square crops of two people from the group photo (real faces, different identities)."""
    from model.pipeline import face_crop_box

    img = np.asarray(Image.open(group_photo).convert("RGB"))
    faces = pipe.analyzer().detect(img)
    crops = []
    for f in faces[:2]:
        l, t, r, b = face_crop_box(f.bbox, img.shape[:2], margin=0.6)
        crops.append(np.ascontiguousarray(img[t:b, l:r]))
    return crops


def _gen(pipe, ids, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("seed", 7)
    return pipe("a photo of a person", ids, output_type="pt", **kw)


def test_single_id_is_deterministic_and_reports_region(pipe, hanks):
    a = _gen(pipe, [IdentityInput(image=hanks)])
    b = _gen(pipe, [IdentityInput(image=hanks)])
    assert a.images.shape == (1, 3, 64, 64)
    assert torch.equal(a.images, b.images)
    meta = a.identities[0][0]
    assert meta.region == [0.0, 0.0, 1.0, 1.0] and meta.edited is False
    assert meta.source_prompt.startswith("the expression is")
    c = _gen(pipe, [IdentityInput(image=hanks)], seed=8)
    assert not torch.equal(a.images, c.images)


def test_id_scale_zero_equals_plain_text_to_image(pipe, hanks):
    with_ids = _gen(pipe, [IdentityInput(image=hanks)], id_scale=0.0)
    without = _gen(pipe, [])
    assert torch.equal(with_ids.images, without.images)
    injected = _gen(pipe, [IdentityInput(image=hanks)], id_scale=1.0)
    assert not torch.equal(injected.images, without.images)


def test_multi_id_with_boxes_and_default_strips(pipe, group_faces):
    a, b = group_faces
    boxes = _gen(pipe, [IdentityInput(image=a, bbox=(0.1, 0.0, 0.9, 0.5)),
                        IdentityInput(image=b, bbox=(0.1, 0.5, 0.9, 1.0))])
    assert [r.region for r in boxes.identities[0]] == [[0.1, 0.0, 0.9, 0.5], [0.1, 0.5, 0.9, 1.0]]
    strips = _gen(pipe, [IdentityInput(image=a), IdentityInput(image=b)], layout="strips")  # default: auto
    assert [r.region for r in strips.identities[0]] == [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]
    assert (boxes.layout, strips.layout) == ("boxes", "strips")
    assert not torch.equal(boxes.images, strips.images)


def test_expression_edit_goes_through_imr(pipe, hanks):
    plain = _gen(pipe, [IdentityInput(image=hanks)])
    edit = _gen(pipe, [IdentityInput(image=hanks, expression="happy")])
    meta = edit.identities[0][0]
    assert meta.edited and meta.target_prompt == "the expression is happy"
    assert not torch.equal(plain.images, edit.images)
    tokens_plain = pipe.encode_identities([IdentityInput(image=hanks)]).tokens
    tokens_edit = pipe.encode_identities([IdentityInput(image=hanks, expression="happy")]).tokens
    assert tokens_plain.shape == tokens_edit.shape == (1, pipe.dims.num_tokens, pipe.dims.cross_attention_dim)
    assert not torch.allclose(tokens_plain, tokens_edit)


def test_precomputed_inputs_match_image_inputs(pipe, hanks):
    from model.dynamicid import clip_image_features

    enc = pipe.encode_identities([IdentityInput(image=hanks)])
    a = pipe._analyse(IdentityInput(image=hanks), "identity 0")
    feats = clip_image_features(pipe.backbone, a["crop"][None])[0]
    pre = pipe.encode_identities([IdentityInput(embedding=a["embedding"], clip_features=feats)])
    torch.testing.assert_close(enc.tokens, pre.tokens)


def test_precomputed_inputs_without_a_target_need_no_face_analyzer(tiny_params, ckpt, pipe, hanks, monkeypatch):
    """The trainer's sample grids give embeddings and CLIP features; a GPU training host has no dlib (an H200 run
    stopped at its first grid when the pipeline built the analyzer for a landmark target nobody asked for)."""
    from model.dynamicid import clip_image_features

    a = pipe._analyse(IdentityInput(image=hanks), "identity 0")
    feats = clip_image_features(pipe.backbone, a["crop"][None])[0]
    fresh = load_pipeline(tiny_params.model, tiny_params.face, ckpt, tiny_params.storage.cache_dir)
    fresh.set_progress(False)
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` now fails, as on that host
    out = _gen(fresh, [IdentityInput(embedding=a["embedding"], clip_features=feats)])
    assert out.images.shape == (1, 3, 64, 64) and fresh.face_analyzer is None
    with pytest.raises(ImportError):  # the block is real: asking for a landmark target does need the analyzer
        _gen(fresh, [IdentityInput(embedding=a["embedding"], clip_features=feats, landmarks=np.zeros((68, 2)))])


@pytest.mark.parametrize(
    "ids, kw, match",
    [
        ([IdentityInput(image=np.full((64, 64, 3), 127, np.uint8))], {}, "identity 0"),
        ([IdentityInput(image="HANKS", bbox=(0.5, 0.0, 0.4, 1.0))], {}, "identity 0: bbox"),
        ([IdentityInput(image="HANKS", bbox=(0.0, 0.0, 1.2, 1.0))], {}, "identity 0: bbox"),
        ([IdentityInput(image="HANKS")] * 5, {}, "at most model.max_ids = 4"),
        ([IdentityInput(image="HANKS")], {"height": 60}, "multiples of 8"),
        ([IdentityInput()], {}, "identity 0: give a reference image"),
        ([IdentityInput(embedding=np.zeros(7), clip_features=torch.zeros(65, 64))], {}, "identity 0: embedding has 7"),
    ],
)
def test_bad_input_raises_named_errors(pipe, hanks, ids, kw, match):
    ids = [IdentityInput(**{**i.__dict__, "image": hanks if isinstance(i.image, str) else i.image}) for i in ids]
    with pytest.raises(GenerationError, match=match):
        _gen(pipe, ids, **kw)


def test_no_face_names_the_identity(pipe, hanks):
    blank = np.full((96, 96, 3), 200, np.uint8)
    with pytest.raises(GenerationError, match="identity 1") as err:
        _gen(pipe, [IdentityInput(image=hanks), IdentityInput(image=blank)])
    assert "face" in str(err.value).lower()


def test_checkpoint_of_another_profile_or_shape_is_rejected(tiny_params, ckpt, tmp_path):
    import shutil

    bad = tmp_path / "other-profile"
    shutil.copytree(ckpt, bad)
    manifest = read_manifest(bad)
    manifest["dims"]["profile"] = "sd15"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="profile 'sd15'"):
        load_pipeline(tiny_params.model, tiny_params.face, bad, tiny_params.storage.cache_dir)

    other = params_from_dict({"storage": {"cache_dir": tiny_params.storage.cache_dir},
                              "model": {"tiny": {"num_id_tokens": 2}}})
    with pytest.raises(CheckpointError, match="num_tokens: checkpoint has 4, this model needs 2"):
        load_pipeline(other.model, other.face, ckpt, other.storage.cache_dir)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    (corrupt / "face_encoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="sha256"):
        load_pipeline(tiny_params.model, tiny_params.face, corrupt, tiny_params.storage.cache_dir)


def test_checkpoint_round_trip_keeps_weights(tiny_params, ckpt, pipe):
    from model.checkpoint import load_parts

    _, parts = load_parts(ckpt)
    fe = pipe.dynamicid.face_encoder.state_dict()
    for k, v in parts["face_encoder"].items():
        assert torch.equal(fe[k], v), k
    assert set(parts) == {"saa", "face_encoder", "imr", "keypoint_encoder"}


def test_generate_cli_takes_a_scale_per_person(tiny_params, ckpt, single_face_photo, tmp_path, capsys):
    """--person-id-scale belongs to the i-th --id-image ('-': --id-scale); equal per-person scales
    are --id-scale's image exactly, a person at 0 changes it; a bad value is a usage error."""
    cache = f"storage.cache_dir={tiny_params.storage.cache_dir}"
    common = ["-S", cache, "generate", "--checkpoint", str(ckpt), "--prompt", "two people", "--steps", "2",
              "--id-image", str(single_face_photo), "--id-image", str(single_face_photo), "--layout", "strips"]

    def run(*extra: str) -> np.ndarray:
        out = tmp_path / f"g{len(list(tmp_path.iterdir()))}.png"
        assert main([*common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out))

    scalar = run("--id-scale", "0.7")
    assert np.array_equal(run("--person-id-scale", "0.7", "--person-id-scale", "0.7"), scalar)
    assert np.array_equal(run("--id-scale", "0.7", "--person-id-scale", "-", "--person-id-scale", "0.7"), scalar)
    assert not np.array_equal(run("--id-scale", "0.7", "--person-id-scale", "0", "--person-id-scale", "-"), scalar)
    assert main([*common, "--person-id-scale", "-1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--person-id-scale '-1': expected a finite number >= 0" in capsys.readouterr().err
    assert main([*common, *["--person-id-scale", "1"] * 3, "--out", str(tmp_path / "x.png")]) == 2
    assert "more --person-id-scale values than --id-image values" in capsys.readouterr().err


def test_generate_cli_writes_png_and_metadata(tiny_params, ckpt, single_face_photo, tmp_path, capsys):
    out = tmp_path / "g.png"
    cache = f"storage.cache_dir={tiny_params.storage.cache_dir}"
    rc = main(["-S", cache, "generate", "--checkpoint", str(ckpt), "--prompt", "a photo of a person",
               "--id-image", str(single_face_photo), "--expression", "smiling", "--steps", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["identities"][0]["edited"] is True
    rc = main(["-S", cache, "generate", "--checkpoint", str(ckpt), "--prompt", "x", "--id-image",
               str(tmp_path / "missing.png"), "--out", str(out)])
    assert rc == 2
    assert "missing.png" in capsys.readouterr().err

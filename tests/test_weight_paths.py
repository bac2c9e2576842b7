"""Missing model weights fail at once (issue 17, item 1): every stage that reads weight locations checks them right
after params load, names the params key, exits non-zero and writes nothing (components/core/config/weights.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from components.cli import main
from components.core.config import ParamsError, params_from_dict
from components.core.config.weights import check_stage_weights, weight_paths


def _sd15(tmp_path: Path, **model) -> dict:
    missing = tmp_path / "missing"
    sd15 = {"base": str(missing / "sd15"), "image_encoder": str(missing / "vit-h-14"), **model}
    return {"model": {"profile": "sd15", "sd15": sd15},
            "face": {"insightface": {"root": str(missing / "insightface")}},
            "evaluate": {"clip_model": str(missing / "clip-l")},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"}}


CASES = {
    "prepare": (["prepare", "--input", "raw", "--output", "prepared"], ["face.insightface"]),
    "train anchor": (["train", "--stage", "anchor"], ["model.sd15.base", "model.sd15.image_encoder"]),
    "train reconfigure": (["train", "--stage", "reconfigure", "--nproc", "2"], ["model.sd15.base"]),
    "evaluate": (["evaluate", "--checkpoint", "ckpt"],
                 ["model.sd15.base", "model.sd15.image_encoder", "evaluate.clip_model", "face.insightface"]),
    "generate": (["generate", "--checkpoint", "ckpt", "--prompt", "a photo", "--id-image", "me.png",
                  "--out", "out.png"],
                 ["model.sd15.base", "face.insightface"]),
    "init": (["init", "--out", "init"], ["model.sd15.base", "model.sd15.image_encoder"]),
    "serve": (["serve", "--port", "0"], ["model.sd15.base", "face.insightface"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_stage_fails_at_once_naming_the_missing_key_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    argv, keys = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_sd15(tmp_path)))
    monkeypatch.chdir(work)
    t0 = time.monotonic()
    rc = main(["--params", str(params), *argv])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "missing model weights (nothing was run)" in err
    for key in keys:
        assert f"{key}: {tmp_path / 'missing'}" in err, (key, err)
    assert f"model.sd15.base: {tmp_path / 'missing' / 'sd15'} does not exist" in err or case == "prepare"
    assert list(work.iterdir()) == []  # no data, no mlflow.db, no checkpoints, no caches
    assert elapsed < 20, elapsed  # no import of DeepSpeed, no process group, no data loading


def test_present_weights_pass_and_a_bundled_base_is_not_read(tmp_path):
    base = tmp_path / "sd15"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / sub).mkdir(parents=True)
    (tmp_path / "vit").mkdir()
    (tmp_path / "clip").mkdir()
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(b"")
    sd15 = {"base": str(base), "image_encoder": str(tmp_path / "vit")}
    p = params_from_dict({"model": {"profile": "sd15", "sd15": sd15},
                          "face": {"insightface": {"root": str(tmp_path / "insightface")}},
                          "evaluate": {"clip_model": str(tmp_path / "clip")}})
    for command in ("prepare", "evaluate", "generate", "serve", "init"):
        check_stage_weights(p, command)
    check_stage_weights(p, "train", stage="anchor")
    tuned = p.model_copy(deep=True)  # fine-tuning stage 1 from an export: its location is checked as well
    tuned.train.anchor.init_from = str(tmp_path / "no-export")
    with pytest.raises(ParamsError, match=r"train.anchor.init_from: .*no-export does not exist"):
        check_stage_weights(tuned, "train", stage="anchor")
    (base / "vae").rmdir()
    with pytest.raises(ParamsError, match=r"model.sd15.base: .* is not a diffusers-layout SD1.5 folder \(no vae\)"):
        check_stage_weights(p, "init")
    ckpt = tmp_path / "ckpt"
    (ckpt / "base" / "unet").mkdir(parents=True)
    assert [w.key for w in weight_paths(p, "evaluate", checkpoint=str(ckpt))] == ["evaluate.clip_model",
                                                                                   "face.insightface"]
    assert weight_paths(p, "train", stage="base") == [] and weight_paths(p, "register") == []


def test_a_single_file_base_needs_a_tokenizer(tmp_path):
    (tmp_path / "vit").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    raw = {"model": {"profile": "sd15", "sd15": {"base": str(tmp_path / "model.safetensors"),
                                                  "image_encoder": str(tmp_path / "vit")}}}
    with pytest.raises(ParamsError, match="model.sd15.tokenizer: null, but model.sd15.base is a single-file"):
        check_stage_weights(params_from_dict(raw), "init")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    raw["model"]["sd15"]["tokenizer"] = str(tmp_path / "tok")
    check_stage_weights(params_from_dict(raw), "init")
    (tmp_path / "model.bin").write_bytes(b"")
    raw["model"]["sd15"]["base"] = str(tmp_path / "model.bin")
    with pytest.raises(ParamsError, match="is a file, but not a single-file checkpoint"):
        check_stage_weights(params_from_dict(raw), "init")


def test_sd15_evaluation_without_a_clip_fails_before_any_work(tmp_path):
    p = params_from_dict({"model": {"profile": "sd15"}, "profiles": {"sd15": {"evaluate": {"clip_model": None}}}})
    with pytest.raises(ParamsError, match="evaluate.clip_model: null, but the sd15 profile needs a real CLIP"):
        check_stage_weights(p, "evaluate")


def test_s3_locations_are_checked_by_listing_one_key(tmp_path, monkeypatch):
    from tests.services import S3_ENV, moto_s3

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    with moto_s3("weights") as s3:
        s3.client().put_object(Bucket="weights", Key="sd15/unet/config.json", Body=b"{}")
        raw = {"model": {"profile": "sd15", "sd15": {"base": "s3://weights/sd15", "image_encoder": "s3://weights/vit",
                                                      "cache_dir": str(tmp_path)}},
               "storage": {"endpoint_url": s3.endpoint, "cache_dir": str(tmp_path)}}
        with pytest.raises(ParamsError) as err:
            check_stage_weights(params_from_dict(raw), "init")
        assert str(err.value).splitlines()[1:] == [
            "  model.sd15.image_encoder: s3://weights/vit no objects under this prefix"]
        s3.client().put_object(Bucket="weights", Key="vit/config.json", Body=b"{}")
        check_stage_weights(params_from_dict(raw), "init")

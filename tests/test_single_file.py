"""Community single-file SD1.5 checkpoints (issue 17, item 3): a random SD1.5-structured model with small widths,
saved as a diffusers folder and written in the single-file LDM key layout (.safetensors and .ckpt), loads through
``model.sd15.base`` to the very weights and outputs of the folder; the shipped configuration is SD1.5's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check_models import write_sd15
from model import single_file
from model.backbone import load_backbone
from model.config import ModelParams
from model.loading import load_backbone_for


@pytest.fixture(scope="module")
def shaped(tmp_path_factory) -> dict[str, Path]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("sd15-shaped")
    files = write_sd15(root, "shaped")
    torch.manual_seed(1)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, image_size=32, patch_size=8,
                                                         projection_dim=32))
    enc.save_pretrained(root / "image_encoder")
    return {**files, "image_encoder": root / "image_encoder"}


def _params(base: Path, files: dict[str, Path], tokenizer: Path | None) -> ModelParams:
    return ModelParams(profile="sd15", sd15={"base": str(base), "image_encoder": str(files["image_encoder"]),
                                             "tokenizer": str(tokenizer) if tokenizer else None})


@torch.no_grad()
def _outputs(bb) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = bb.tokenizer(["a photo of a person smiling"], padding="max_length", max_length=77,
                       return_tensors="pt").input_ids
    text = bb.text_encoder(ids)[0]
    latents = torch.randn(1, 4, 8, 8, generator=g)
    eps = bb.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    image = bb.vae.decode(latents).sample
    return [ids, text, eps, image]


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_single_file_loads_the_weights_and_outputs_of_the_diffusers_folder(shaped, suffix, tmp_path, monkeypatch):
    monkeypatch.setattr(single_file, "SD15_CONFIG", shaped["config"])  # shaped-down widths, SD1.5 structure
    folder = load_backbone(shaped["diffusers"], shaped["image_encoder"])
    params = _params(shaped[suffix], shaped, shaped["tokenizer"])
    converted = load_backbone_for(params, tmp_path)
    assert converted.base_dir.parent == tmp_path and converted.base_dir.name.startswith("sd15-single-")
    assert json.loads((converted.base_dir / "model_index.json").read_text())["source"] == str(shaped[suffix])
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(folder, name).state_dict(), getattr(converted, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    for a, b in zip(_outputs(folder), _outputs(converted)):
        assert torch.equal(a, b)
    assert dict(converted.scheduler.config)["beta_schedule"] == "scaled_linear"

    def no_second_conversion(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(single_file, "convert_single_file", no_second_conversion)
    assert load_backbone_for(params, tmp_path).base_dir == converted.base_dir  # the cache is reused


def test_a_single_file_without_a_tokenizer_or_without_a_vae_is_refused(shaped, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(single_file, "SD15_CONFIG", shaped["config"])
    with pytest.raises(single_file.SingleFileError, match="model.sd15.tokenizer"):
        load_backbone_for(_params(shaped["safetensors"], shaped, None), tmp_path)
    state = {k: v for k, v in load_file(shaped["safetensors"]).items() if not k.startswith("first_stage_model.")}
    save_file(state, tmp_path / "no-vae.safetensors")
    with pytest.raises(single_file.SingleFileError, match="the VAE lacks .* weights of the SD1.5 structure"):
        load_backbone_for(_params(tmp_path / "no-vae.safetensors", shaped, shaped["tokenizer"]), tmp_path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / ".single-file-pwned",))


def test_a_ckpt_is_unpickled_with_weights_only(tmp_path):
    """A pickled .ckpt cannot run code when it is read (torch.load(weights_only=True) through diffusers)."""
    marker = Path(__file__).parent / ".single-file-pwned"
    marker.unlink(missing_ok=True)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception):
        single_file.read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_the_shipped_configuration_is_sd15_and_ships_with_the_package():
    """Built on the meta device (no memory): SD1.5's parameter counts, from files inside the `model` package."""
    from importlib.resources import files

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(str(files("model") / "sd15_config"))
    assert root == single_file.SD15_CONFIG
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]

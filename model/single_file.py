"""Community SD1.5 checkpoints distributed as one file, converted offline into the diffusers layout the loader reads.

Fine-tunes of SD1.5 are mostly shared as a single ``.safetensors`` (or pickled ``.ckpt``) in the original
CompVis/LDM key layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``).
They carry no configuration, so the SD1.5 one ships with the package (``model/sd15_config``), and diffusers' own
conversion functions map the keys; nothing is fetched from the hub. A ``.ckpt`` is unpickled with
``weights_only=True`` (diffusers' ``load_state_dict``), so a file cannot run code when it is read.

The converted base is written once into the cache (keyed by the file's path, size and modification time, the
tokenizer and the shipped configuration) and then loaded like any diffusers folder, so training ranks, the fast path
and every later run read the same folder and pay the conversion once. A file that lacks weights of the SD1.5
structure fails, naming the first missing ones, instead of leaving random weights in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SD15_CONFIG = Path(__file__).with_name("sd15_config")
SUFFIXES = (".safetensors", ".ckpt")


class SingleFileError(ValueError):
    """A single-file checkpoint that is not an SD1.5 checkpoint of the configured structure."""


def is_single_file(path: str | Path) -> bool:
    return Path(path).suffix in SUFFIXES and Path(path).expanduser().is_file()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's state dict (a nested ``state_dict`` unwrapped); ``.ckpt`` through torch.load(weights_only=True)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    return load_single_file_checkpoint(str(Path(path).expanduser()), local_files_only=True)


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Load converted weights; missing ones are an error (unexpected extras such as EMA copies are not)."""
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes of another architecture (SD2, SDXL, a pruned variant)
        first = str(err).split("size mismatch for ", 2)[1].split("\n")[0] if "size mismatch" in str(err) else str(err)
        raise SingleFileError(f"{path}: the {what} does not have SD1.5's shapes (first: {first[:300]}); "
                              "is this an SD1.5 checkpoint?") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise SingleFileError(f"{path}: the {what} lacks {len(missing)} weights of the SD1.5 structure "
                              f"(first: {', '.join(missing[:3])}); is this an SD1.5 checkpoint?")


def convert_components(checkpoint: dict[str, torch.Tensor], config_dir: Path, path: Path):
    """(unet, vae, text_encoder) built from ``config_dir`` and filled from the LDM-layout ``checkpoint``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        is_clip_model,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
        raise SingleFileError(f"{path}: no model.diffusion_model.* weights (not an SD1.5 single-file checkpoint)")
    if not is_clip_model(checkpoint):
        raise SingleFileError(f"{path}: no cond_stage_model.transformer.* text encoder (SD1.5 uses CLIP ViT-L/14)")
    unet_cfg = UNet2DConditionModel.load_config(config_dir / "unet")
    unet = UNet2DConditionModel.from_config(unet_cfg)
    _load_strict(unet, convert_ldm_unet_checkpoint(checkpoint, unet_cfg), "UNet", path)
    vae_cfg = AutoencoderKL.load_config(config_dir / "vae")
    vae = AutoencoderKL.from_config(vae_cfg)
    _load_strict(vae, convert_ldm_vae_checkpoint(checkpoint, vae_cfg), "VAE", path)
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True))
    state = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    _load_strict(text, state, "text encoder", path)
    return unet, vae, text


def convert_single_file(path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path,
                        config_dir: str | Path = SD15_CONFIG) -> Path:
    """Write the diffusers-layout base (unet, vae, text_encoder, tokenizer, scheduler) of a single-file checkpoint."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from model.backbone import save_base

    path, out_dir, config_dir = Path(path).expanduser(), Path(out_dir), Path(config_dir)
    tokenizer = CLIPTokenizer.from_pretrained(Path(tokenizer_dir).expanduser(), local_files_only=True)
    unet, vae, text = convert_components(read_checkpoint(path), config_dir, path)
    scheduler = DDPMScheduler.from_pretrained(config_dir / "scheduler", local_files_only=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_base(tmp, unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, image_encoder=None,
              scheduler=scheduler, profile="sd15", source=str(path))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _config_digest(config_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(config_dir.rglob("*.json")):
        h.update(f.relative_to(config_dir).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def single_file_base(path: str | Path, tokenizer_dir: str | Path | None, cache_dir: str | Path,
                     config_dir: str | Path | None = None) -> Path:
    """The converted folder of a single-file checkpoint, converting it on first use (see the module docstring).
    ``config_dir`` None = the shipped SD1.5 configuration (looked up at call time)."""
    config_dir = Path(config_dir) if config_dir is not None else SD15_CONFIG
    path = Path(path).expanduser().resolve()
    if tokenizer_dir is None:
        raise SingleFileError(f"{path} is a single-file checkpoint, which holds no tokenizer: set "
                              "model.sd15.tokenizer to a CLIP ViT-L/14 tokenizer folder")
    st = path.stat()
    key = json.dumps([str(path), st.st_size, st.st_mtime_ns, str(Path(tokenizer_dir).expanduser().resolve()),
                      _config_digest(Path(config_dir))])
    out = Path(cache_dir).expanduser() / f"sd15-single-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (out / "model_index.json").exists():
        log.info("converting the single-file checkpoint %s into %s (once)", path, out)
        convert_single_file(path, out, tokenizer_dir, config_dir)
    return out


__all__ = ["SD15_CONFIG", "SingleFileError", "convert_single_file", "convert_components", "is_single_file",
           "read_checkpoint", "single_file_base"]

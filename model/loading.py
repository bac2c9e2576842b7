"""One loading path for every user (CLI, trainers, evaluation, server, MLflow pyfunc).

``load_pipeline`` resolves the base (bundled in the checkpoint, the tiny base, or the
SD1.5 directory named in params), builds the trainable parts for the configured face
backend, loads a checkpoint into them (rejecting one that does not fit), merges LoRA for
inference and moves everything to the configured device and dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.backbone import Backbone, load_backbone, resolve_device, resolve_dtype, tiny_base_dir
from model.checkpoint import CheckpointError, ModelDims, load_parts, read_manifest, save_checkpoint
from model.config import FaceParams, ModelParams
from model.dynamicid import DynamicID, build_dynamicid
from model.notices import LibraryNotices as _LibraryNotices, quiet_library_warnings

log = logging.getLogger(__name__)


def quiet_hf_progress() -> None:
    """transformers 5 prints a progress bar per load/save, and both libraries print notices (_LibraryNotices) that
    say nothing about our runs; both are kept out of the logs, with the Python warnings of LIBRARY_WARNINGS."""
    quiet_library_warnings()
    try:
        from diffusers.utils import logging as d_logging
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        handlers = [*hf_logging.get_logger("transformers").handlers, *d_logging.get_logger("diffusers").handlers,
                    *logging.getLogger().handlers]
        for handler in handlers:
            if not any(isinstance(f, _LibraryNotices) for f in handler.filters):
                handler.addFilter(_LibraryNotices())
    except ImportError:  # pragma: no cover - transformers always present with the model extra
        pass


def base_location(params: ModelParams, cache_dir: str | Path,
                  checkpoint: str | Path | None = None) -> tuple[Path, Path | None]:
    """-> (base diffusers dir, separate image encoder dir or None). Paths must be local here:
    s3:// URIs are resolved to a local cache by components.core.storage before this is called. A single-file
    sd15 base is converted once into cache_dir (model/single_file.py) and that folder returned."""
    if checkpoint is not None and (Path(checkpoint) / "base" / "unet").is_dir():
        return Path(checkpoint) / "base", None
    if params.profile == "tiny":
        return tiny_base_dir(params.tiny, cache_dir), None
    base = Path(params.sd15.base).expanduser()
    if base.suffix in (".safetensors", ".ckpt"):  # a community single-file checkpoint: converted once, offline
        from model.single_file import single_file_base

        base = single_file_base(base, params.sd15.tokenizer, cache_dir)
    return base, Path(params.sd15.image_encoder).expanduser()


def load_backbone_for(params: ModelParams, cache_dir: str | Path, checkpoint: str | Path | None = None) -> Backbone:
    quiet_hf_progress()
    base, enc = base_location(params, cache_dir, checkpoint)
    return load_backbone(base, enc)


def load_pipeline(
    params: ModelParams,
    face: FaceParams,
    checkpoint: str | Path | None,
    cache_dir: str | Path = "~/.cache/dynamicid",
    *,
    fuse_lora: bool = True,
    face_analyzer=None,
    device: str | None = None,
    dtype: str | None = None,
):
    """Build a ready-to-run DynamicIDPipeline. ``checkpoint=None`` gives freshly initialised parts."""
    from model.pipeline import DynamicIDPipeline

    manifest = None
    if checkpoint is not None:
        manifest = read_manifest(checkpoint)
        got = manifest["dims"].get("profile")
        if got != params.profile:
            raise CheckpointError(
                f"checkpoint {checkpoint} was trained for profile {got!r}, but model.profile is {params.profile!r}"
            )
    backbone = load_backbone_for(params, cache_dir, checkpoint)
    backend = face.resolved_backend(params.profile)
    dyn = build_dynamicid(backbone, params, backend)
    if checkpoint is not None:
        manifest, parts = load_parts(checkpoint)
        dyn.load_parts(backbone.unet, manifest, parts)
    if fuse_lora:
        from model.saa.install import merge_lora

        merge_lora(backbone.unet)
    dev = resolve_device(device or params.device)
    dt = resolve_dtype(dtype or params.dtype, dev)
    backbone.to(dev, dt)
    dyn.to(dev, dt)
    pipe = DynamicIDPipeline.from_backbone(backbone, dyn, params, face, face_analyzer=face_analyzer)
    pipe.checkpoint_manifest = manifest
    return pipe


def init_checkpoint(params: ModelParams, face: FaceParams, out_dir: str | Path, cache_dir: str | Path,
                    seed: int = 0, bundle_base: bool | None = None) -> Path:
    """A freshly initialised checkpoint (to try the pipeline before training; training starts from code)."""
    torch.manual_seed(seed)
    backbone = load_backbone_for(params, cache_dir)
    dyn: DynamicID = build_dynamicid(backbone, params, face.resolved_backend(params.profile))
    bundle = params.profile == "tiny" if bundle_base is None else bundle_base
    return save_checkpoint(out_dir, dyn.dims, dyn.state_parts(backbone.unet),
                           base_dir=backbone.base_dir if bundle else None, extra={"stage": "init"})


__all__ = ["load_pipeline", "load_backbone_for", "init_checkpoint", "base_location", "ModelDims", "quiet_hf_progress",
           "quiet_library_warnings"]

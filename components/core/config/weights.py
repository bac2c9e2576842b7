"""Fail fast on missing model weights: each stage checks the weight paths it will read, right after params load.

A production run that names a wrong SD1.5, ViT-H/14, CLIP or insightface location used to find out deep inside the
stage (after data loading, after DeepSpeed started its process group, or minutes into an evaluation), with an error
from diffusers or onnxruntime that does not name the params key. ``check_stage_weights`` runs before any of that and
names the key: ``model.sd15.base: /models/sd15 does not exist``.

Which keys a stage reads (``weight_paths``):

==================  ========================================================================================
prepare             the insightface pack (face.insightface.root / name) when the face backend is insightface
train anchor        the base (model.<profile>.base; sd15 also model.sd15.image_encoder, model.sd15.tokenizer)
train reconfigure   the base, unless the stage-1 export bundles one (the tiny profile's exports do)
evaluate            the base (unless the checkpoint bundles one), evaluate.clip_model, the insightface pack
generate, serve     the base (unless the checkpoint bundles one), the insightface pack
init                the base
==================  ========================================================================================

``train base`` with sd15, ``register``, ``summary``, ``deploy``, ``launch`` (its pods read the paths on their own
volume), ``pipeline`` and ``infer`` read no weights. ``s3://`` locations are checked with one ListObjectsV2 call
(MaxKeys 1) unless the prefix is already in the local download cache; a location that lists nothing is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

if TYPE_CHECKING:
    from components.core.config import Params

Kind = Literal["base", "dir", "pack", "tokenizer"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class WeightPath:
    """One weight location a stage reads, with the params key that names it."""

    key: str
    value: str
    kind: Kind


def bundles_base(checkpoint: str | None) -> bool:
    """Whether a local checkpoint carries its own base (``base/unet``), so the params' base is not read. Remote
    checkpoints (models:/, s3://) are not opened here; sd15 training and ``init`` never bundle a base."""
    if not checkpoint or "://" in checkpoint or checkpoint.startswith(("models:/", "runs:/")):
        return False
    root = Path(checkpoint).expanduser()
    return any(next(root.glob("/".join(["*"] * depth + ["base", "unet"])), None) for depth in range(5))


def _base_paths(params: "Params") -> list[WeightPath]:
    model = params.model
    if model.profile == "tiny":
        return [WeightPath("model.tiny.base", model.tiny.base, "dir")] if model.tiny.base else []
    sd = model.sd15
    out = [WeightPath("model.sd15.base", sd.base, "base"),
           WeightPath("model.sd15.image_encoder", sd.image_encoder, "dir")]
    if sd.tokenizer:
        out.append(WeightPath("model.sd15.tokenizer", sd.tokenizer, "tokenizer"))
    return out


def _face_pack(params: "Params") -> list[WeightPath]:
    if params.face.resolved_backend(params.model.profile) != "insightface":
        return []
    ins = params.face.insightface
    return [WeightPath("face.insightface", str(Path(ins.root).expanduser() / "models" / ins.name), "pack")]


def weight_paths(params: "Params", command: str, *, stage: str | None = None,
                 checkpoint: str | None = None) -> list[WeightPath]:
    """The weight locations ``dynamicid <command>`` reads with this configuration (see the module docstring)."""
    if command == "prepare":
        return _face_pack(params)
    if command == "train":
        if stage == "anchor":
            start = params.train.anchor.init_from
            return _base_paths(params) + ([WeightPath("train.anchor.init_from", start, "dir")] if start else [])
        if stage == "reconfigure":
            export = str(Path(params.train.anchor.output) / "export")
            return [] if bundles_base(export) else _base_paths(params)
        return []  # base: the tiny stage builds its own; sd15 skips it
    if command in ("evaluate", "generate", "serve", "init"):
        out = [] if bundles_base(checkpoint) else _base_paths(params)
        if command == "evaluate" and params.evaluate.clip_model:
            out.append(WeightPath("evaluate.clip_model", params.evaluate.clip_model, "dir"))
        return out + ([] if command == "init" else _face_pack(params))
    return []


def _s3_missing(uri: str, params: "Params") -> str | None:
    """None when the s3:// prefix holds at least one object (or is already in the download cache)."""
    from components.core.storage import StorageError, s3_client, split_s3

    key = hashlib.sha256(uri.encode()).hexdigest()[:16]  # components.core.storage.resolve_local's cache key
    for cache in {params.model.sd15.cache_dir, params.storage.cache_dir}:
        if (Path(cache).expanduser() / "s3" / key).is_dir():
            return None
    try:
        bucket, prefix = split_s3(uri)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            listed = s3_client(params.storage).list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/",
                                                                MaxKeys=1)
        except (BotoCoreError, ClientError) as err:
            return f"cannot be listed: {type(err).__name__}: {err}"
    except StorageError as err:
        return str(err)
    return None if listed.get("KeyCount", 0) else "no objects under this prefix"


def _local_missing(path: Path, kind: Kind) -> str | None:
    if not path.exists():
        return "does not exist"
    if kind == "base":
        if path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                return f"is a file, but not a single-file checkpoint ({' or '.join(SINGLE_FILE_SUFFIXES)})"
            return None
        lacking = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
        return f"is not a diffusers-layout SD1.5 folder (no {', '.join(lacking)})" if lacking else None
    if kind == "pack":
        return None if path.is_dir() and any(path.glob("*.onnx")) else "holds no .onnx models"
    if kind == "tokenizer":
        found = any((path / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        return None if found else "holds no vocab.json or tokenizer.json (a CLIP tokenizer folder)"
    return None if path.is_dir() else "is not a directory"


def missing_weights(params: "Params", paths: Iterable[WeightPath]) -> list[str]:
    """One ``key: value problem`` line per location that is not there."""
    from components.core.storage import is_s3

    problems = []
    for wp in paths:
        why = _s3_missing(wp.value, params) if is_s3(wp.value) else _local_missing(Path(wp.value).expanduser(),
                                                                                    wp.kind)
        if why:
            problems.append(f"{wp.key}: {wp.value} {why}")
    if params.model.profile == "sd15":
        base = params.model.sd15.base
        if base.endswith(SINGLE_FILE_SUFFIXES) and not params.model.sd15.tokenizer and any(
                p.key == "model.sd15.base" for p in paths):
            problems.append("model.sd15.tokenizer: null, but model.sd15.base is a single-file checkpoint, which holds "
                            "no tokenizer: name a CLIP ViT-L/14 tokenizer folder (e.g. /models/clip-vit-large-patch14 "
                            "or an SD1.5 diffusers folder's tokenizer/)")
    return problems


def sd15_needs_clip(params: "Params", command: str) -> list[str]:
    if command == "evaluate" and params.model.profile == "sd15" and not params.evaluate.clip_model:
        return ["evaluate.clip_model: null, but the sd15 profile needs a real CLIP (a CLIPModel folder or s3:// URI) "
                "for CLIP-T"]
    return []


def check_stage_weights(params: "Params", command: str, *, stage: str | None = None,
                        checkpoint: str | None = None) -> None:
    """Raise ParamsError naming every missing weight location ``command`` would read; nothing is written."""
    from components.core.config import ParamsError

    paths = weight_paths(params, command, stage=stage, checkpoint=checkpoint)
    problems = sd15_needs_clip(params, command) + missing_weights(params, paths)
    if problems:
        raise ParamsError("missing model weights (nothing was run):\n  " + "\n  ".join(problems))


def check_cli_weights(args, params: "Params") -> None:
    """The CLI's hook: the weight check of the parsed subcommand (train checks in its own preflight, so that
    ``dynamicid launch`` running it on this machine checks too)."""
    command = getattr(args, "command", None)
    if command == "serve" and getattr(args, "schema", False):
        return
    checkpoint = {"evaluate": getattr(args, "checkpoint", None) or params.evaluate.checkpoint,
                  "generate": getattr(args, "checkpoint", None),
                  "serve": getattr(args, "model_uri", None) or params.serve.model_uri}.get(command)
    if command in ("prepare", "evaluate", "generate", "serve", "init"):
        check_stage_weights(params, command, checkpoint=checkpoint)


__all__ = ["WeightPath", "weight_paths", "missing_weights", "check_stage_weights", "check_cli_weights",
           "bundles_base"]

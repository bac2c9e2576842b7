"""DynamicID checkpoints: one safetensors file per trainable part plus a JSON manifest.

Layout of a checkpoint directory::

    manifest.json               profile, dims, library versions, sha256 of every file
    saa.safetensors             SAA ID key/value projections + LoRA (all attention layers)
    face_encoder.safetensors
    imr.safetensors             (absent before stage 2)
    keypoint_encoder.safetensors
    base/                       optional bundled base in diffusers layout (tiny profile)

Writes go to a sibling temp directory renamed into place at the end, so a reader never
sees a half-written checkpoint. Loading validates the manifest against the backbone and
the configured dims and names the first mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = ("saa", "face_encoder", "imr", "keypoint_encoder")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the backbone/config."""


@dataclass
class ModelDims:
    """Everything that fixes the shapes of the trainable parts."""

    profile: str
    cross_attention_dim: int
    id_dim: int
    clip_dim: int
    text_dim: int
    num_tokens: int
    lora_rank: int
    face_encoder: dict[str, Any] = field(default_factory=dict)
    imr: dict[str, Any] = field(default_factory=dict)
    face_backend: str = "dlib"
    # Settings that shaped training and that inference must repeat (params key -> value); compared key by key,
    # so a checkpoint written before a setting was recorded still loads.
    settings: dict[str, Any] = field(default_factory=dict)


# Architecture variants recorded inside ``ModelDims.face_encoder`` / ``.imr`` (docs/release.md), with the value a
# checkpoint written before they existed has: the project's own design.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "face_encoder": {"proj_out": False},
    "imr": {"norm_in": False, "motion_mlp": "dynamicid", "keypoint_encoder": "dynamicid"},
}


def architecture(dims: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The architecture variants of a (manifest's) dims dict, defaults filled in for older checkpoints."""
    return {part: {k: (dims.get(part) or {}).get(k, v) for k, v in keys.items()}
            for part, keys in ARCHITECTURE_DEFAULTS.items()}


def with_architecture_defaults(dims: dict[str, Any]) -> dict[str, Any]:
    """A manifest's dims with the architecture variants filled in (a checkpoint from before they existed)."""
    arch = architecture(dims)
    return {**dims, **{part: {**(dims.get(part) or {}), **arch[part]} for part in arch}}


def training_settings(saa_gating: bool, saa_tau: float, face_crop_size: int) -> dict[str, Any]:
    """The inference-relevant settings a checkpoint records: SAA's gating and threshold decide which queries
    received identity during training, and the crop size fixes the CLIP features the face encoder learnt from."""
    return {"model.saa.gating": bool(saa_gating), "model.saa.tau": float(saa_tau),
            "model.face_crop_size": int(face_crop_size)}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def parts_digest(parts: dict[str, dict[str, torch.Tensor]], names: Sequence[str]) -> str:
    """sha256 over the named parts' tensors (names, dtypes, shapes, bytes) as exported (fp32 on the CPU).

    A learning-check record stores it for the parts it measured, so a gate can tell whether the record belongs
    to the weights it evaluates: changing any of those weights, or copying a record onto another checkpoint,
    changes the digest. Tensors, not files, so the frozen stage-1 parts a stage-2 export carries still match.
    """
    h = hashlib.sha256()
    for name in sorted(names):
        if name not in parts:
            raise KeyError(f"no part {name!r} (have {sorted(parts)})")
        for key in sorted(parts[name]):
            t = parts[name][key].detach().to("cpu").contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def save_checkpoint(
    out_dir: str | os.PathLike,
    dims: ModelDims,
    parts: dict[str, dict[str, torch.Tensor]],
    *,
    base_dir: str | os.PathLike | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``parts`` (name -> state dict) and a manifest to ``out_dir``."""
    from safetensors.torch import save_file

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise CheckpointError(f"unknown checkpoint parts: {sorted(unknown)}; allowed: {PARTS}")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files: dict[str, str] = {}
    for name, state in parts.items():
        fname = f"{name}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, tmp / fname, metadata={"part": name, "profile": dims.profile})
        files[fname] = sha256_file(tmp / fname)
    if base_dir is not None:
        shutil.copytree(base_dir, tmp / "base", ignore=shutil.ignore_patterns("*.tmp*"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "dims": asdict(dims),
        "parts": sorted(parts),
        "files": files,
        "bundled_base": base_dir is not None,
        "libraries": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync_files_under(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return out


def _fsync_files_under(path: Path) -> None:
    """Flush every file's contents under a directory to disk before it is renamed into place."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: not a DynamicID checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt manifest ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    return manifest


def find_checkpoint(root: str | os.PathLike, max_depth: int = 4) -> Path:
    """The checkpoint directory inside ``root`` (root itself, or e.g. an MLflow model's
    artifacts/checkpoint, or KServe's /mnt/models): the shallowest dir holding our manifest."""
    root = Path(root)
    for depth in range(max_depth + 1):
        pattern = "/".join(["*"] * depth + [MANIFEST]) if depth else MANIFEST
        for candidate in sorted(root.glob(pattern)):
            try:
                if json.loads(candidate.read_text()).get("format_version") == FORMAT_VERSION:
                    return candidate.parent
            except (OSError, json.JSONDecodeError):
                continue
    raise CheckpointError(f"no DynamicID checkpoint (manifest.json) found under {root}")


def check_dims(manifest: dict[str, Any], expected: ModelDims) -> None:
    """Raise CheckpointError naming every field where the checkpoint and the backbone/config disagree, and every
    recorded training setting that the configuration contradicts (named by its params key)."""
    got = with_architecture_defaults(manifest["dims"])
    want = with_architecture_defaults(asdict(expected))
    bad = [f"{k}: checkpoint has {got.get(k)!r}, this model needs {want[k]!r}" for k in want
           if k != "settings" and got.get(k) != want[k]]
    recorded = got.get("settings") or {}
    wanted = want["settings"]
    if recorded.get("model.saa.gating") is False and wanted.get("model.saa.gating") is False:
        recorded = {k: v for k, v in recorded.items() if k != "model.saa.tau"}  # no gating: tau is unused
    bad += [f"{k} is {wanted[k]!r} here, but the checkpoint was trained with {v!r} (set {k}: {v!r})"
            for k, v in sorted(recorded.items()) if k in wanted and wanted[k] != v]
    if bad:
        raise CheckpointError("checkpoint does not fit this model: " + "; ".join(bad))


def load_parts(ckpt_dir: str | os.PathLike, verify: bool = True) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read the manifest and every part (verifying file hashes) -> (manifest, {part: state dict})."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    manifest = read_manifest(ckpt)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for fname, digest in manifest["files"].items():
        path = ckpt / fname
        if not path.exists():
            raise CheckpointError(f"{ckpt}: manifest lists {fname} but it is missing")
        if verify and sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 does not match the manifest (corrupt or modified file)")
        parts[fname.removesuffix(".safetensors")] = load_file(path)
    return manifest, parts


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], part: str) -> None:
    """load_state_dict with a message that names the part, the key and both shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{part}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{part}.{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    module.load_state_dict(state)

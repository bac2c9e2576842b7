"""Release tensors -> our checkpoint parts (renames only, fp32), and ``import_release`` which writes the checkpoint.

The mapping is the one measured in release-checkpoint.md, section 5: every tensor maps by renaming
(the face encoder with its optional ``proj_out``, the IMR with ``norm_in`` and the release motion
MLP, the release keypoint encoder 1:1); values are kept bit for bit, in the dtype they were stored in.
The checkpoint records the architecture variants in its dims, ``model.saa.compat: release`` in its
settings, and the sha256 of every source file, so an imported model says where it came from.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from model.checkpoint import ModelDims, save_checkpoint, training_settings
from model.release.layout import LAYOUT_VERSION, ReleaseLayout
from model.release.reader import LoadedFile, ReleaseImportError, load_file, match_tables

HF_REPO = "meteorite2023/DynamicID"

# release key (regex) -> our key, per part; applied in order, first match wins.
_FACE_RULES = [
    (r"proj\.(0|2)\.(.+)", r"id_mlp.\1.\2"),
    (r"norm\.(.+)", r"id_norm.\1"),
    (r"perceiver_resampler\.proj_in\.(.+)", r"clip_proj.\1"),
    (r"perceiver_resampler\.proj_out\.(.+)", r"proj_out.\1"),
    (r"perceiver_resampler\.norm_out\.(.+)", r"norm_out.\1"),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.norm1\.(.+)", r"layers.\1.0.norm_context.\2"),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.norm2\.(.+)", r"layers.\1.0.norm_latents.\2"),
    (r"perceiver_resampler\.layers\.(\d+)\.0\.(to_q|to_kv|to_out)\.(.+)", r"layers.\1.0.\2.\3"),
    (r"perceiver_resampler\.layers\.(\d+)\.1\.(\d)\.(.+)", r"layers.\1.1.net.\2.\3"),
]
_IMR_LAYER = [
    (r"0\.norm1\.(.+)", r"cross.norm_context.\1"),
    (r"0\.norm2\.(.+)", r"cross.norm_latents.\1"),
    (r"0\.(to_q|to_kv|to_out)\.(.+)", r"cross.\1.\2"),
    (r"1\.norm1\.(.+)", r"self_attn.norm_latents.\1"),
    (r"1\.(to_q|to_kv|to_out)\.(.+)", r"self_attn.\1.\2"),
    (r"2\.(\d)\.(.+)", r"ff.net.\1.\2"),
]


def _shift(template: str) -> str:
    """Renumber a layer rule's groups by one, because the layer index becomes group 1."""
    return re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), template)


_IMR_RULES = [
    (r"feature_fusion\.(\d)\.(.+)", r"motion_mlp.\1.\2"),
    (r"(norm_in|proj_in|norm_out|proj_out)\.(.+)", r"\1.\2"),
    *[(rf"disentangleNet\.(\d+)\.{src}", r"disentangle_layers.\1." + _shift(dst)) for src, dst in _IMR_LAYER],
    *[(rf"entangleNet\.(\d+)\.{src}", r"entangle_layers.\1." + _shift(dst)) for src, dst in _IMR_LAYER],
]


def _rename(key: str, rules: list[tuple[str, str]], part: str) -> str:
    for pattern, template in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    raise ReleaseImportError(f"{part}: no mapping for release key {key!r}")  # the tables and rules disagree: a bug


def _stored(t: Tensor) -> Tensor:
    """The tensor as stored (fp16 stays fp16, fp32 stays fp32): the checkpoint holds exactly the release's
    values at the release's size, and loading casts them into the model's dtype."""
    return t.detach().to("cpu").contiguous()


def map_face_encoder(release: dict[str, Tensor]) -> dict[str, Tensor]:
    """``proj_module`` keys -> ``FaceEncoder(proj_out=True)`` keys."""
    return {_rename(k, _FACE_RULES, "face encoder"): _stored(v) for k, v in release.items()}


def map_saa(release: dict[str, Tensor], layout: ReleaseLayout) -> dict[str, Tensor]:
    """``SAA_module`` keys ``{i}.<param>`` -> ``<attention path>.processor.<param>``; ``*_ip`` -> ``*_id``."""
    names = [name for name, _, _ in layout.processors]
    out = {}
    for key, value in release.items():
        index, param = key.split(".", 1)
        param = param.replace("to_k_ip.", "to_k_id.").replace("to_v_ip.", "to_v_id.")
        out[f"{names[int(index)]}.processor.{param}"] = _stored(value)
    return out


def map_imr(release: dict[str, Tensor]) -> dict[str, Tensor]:
    """``IMR.bin`` keys -> ``IMR(norm_in=True, motion_mlp="release")`` keys."""
    return {_rename(k, _IMR_RULES, "IMR"): _stored(v) for k, v in release.items()}


def map_keypoint_encoder(release: dict[str, Tensor]) -> dict[str, Tensor]:
    """``key_point_encoder.bin`` keys are ``ReleaseKeypointEncoder``'s own (a 1:1 port)."""
    return {k: _stored(v) for k, v in release.items()}


def release_dims(layout: ReleaseLayout, face_crop_size: int = 224) -> ModelDims:
    """The checkpoint's dims: the layout's shapes, the release architecture variants, the release settings
    (gating on and tau 0.3 as in the release's example scripts; compat mode ``release``)."""
    settings = training_settings(True, 0.3, face_crop_size)
    settings["model.saa.compat"] = "release"
    return ModelDims(
        profile=layout.profile, cross_attention_dim=layout.token_dim, id_dim=layout.id_dim,
        clip_dim=layout.clip_dim, text_dim=layout.text_dim, num_tokens=layout.num_tokens,
        lora_rank=layout.lora_rank,
        face_encoder={"depth": layout.fe_depth, "heads": layout.fe_heads, "dim_head": layout.fe_dim_head,
                      "ff_mult": layout.fe_ff_mult, "shortcut": False, "shortcut_scale": 1.0, "proj_out": True},
        imr={"depth": layout.imr_depth, "width": layout.imr_width, "heads": layout.imr_heads,
             "num_latents": layout.imr_latents, "landmark_size": layout.landmark_size,
             "landmark_feature_dim": layout.landmark_dim, "ff_mult": layout.imr_ff_mult, "norm_in": True,
             "motion_mlp": "release", "keypoint_encoder": "release"},
        face_backend=layout.face_backend, settings=settings,
    )


@dataclass
class ReleaseSource:
    """One release file: where it came from (recorded) and its bytes."""

    uri: str
    data: bytes


def _describe(src: ReleaseSource, loaded: LoadedFile) -> dict[str, Any]:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in loaded.tensors.values() if t.is_floating_point()})
    return {"uri": src.uri, "sha256": hashlib.sha256(src.data).hexdigest(), "bytes": len(src.data),
            "format": loaded.file_format, "dtypes": dtypes, "tensors": len(loaded.tensors)}


def convert_release(saa: ReleaseSource, imr: ReleaseSource, keypoint: ReleaseSource,
                    layout: ReleaseLayout) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read, check and map the three files -> ({part: our state dict}, provenance). Raises ReleaseImportError."""
    what = "SD1.5" if layout.profile == "sd15" else f"the {layout.profile} release layout"
    files = {"saa": (saa, {"face_encoder": layout.face_encoder_shapes(), "saa": layout.saa_shapes()}),
             "imr": (imr, {"imr": layout.imr_shapes()}),
             "keypoint_encoder": (keypoint, {"keypoint_encoder": layout.keypoint_shapes()})}
    found: dict[str, dict[str, Tensor]] = {}
    sources: dict[str, Any] = {}
    for name, (src, tables) in files.items():
        loaded = load_file(src.data, src.uri)
        found.update(match_tables(loaded, tables, what))
        sources[name] = _describe(src, loaded)
    parts = {"saa": map_saa(found["saa"], layout), "face_encoder": map_face_encoder(found["face_encoder"]),
             "imr": map_imr(found["imr"]), "keypoint_encoder": map_keypoint_encoder(found["keypoint_encoder"])}
    provenance = {"layout_version": LAYOUT_VERSION, "weights": HF_REPO, "sources": sources,
                  "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return parts, provenance


def import_release(saa: ReleaseSource, imr: ReleaseSource, keypoint: ReleaseSource, out_dir: str | os.PathLike,
                   layout: ReleaseLayout | None = None, face_crop_size: int = 224) -> Path:
    """Check and convert the release files, then write a checkpoint to ``out_dir`` atomically (temp dir, rename).
    Every check runs before anything is written, so a bad file leaves no output at all."""
    layout = layout or ReleaseLayout.sd15()
    parts, provenance = convert_release(saa, imr, keypoint, layout)
    dims = release_dims(layout, face_crop_size)
    return save_checkpoint(out_dir, dims, parts, extra={"stage": "import-release", "release": provenance})


def keypoint_sibling(imr_uri: str) -> str:
    """Where the release keeps the keypoint encoder: next to ``IMR.bin``, ``IMR`` replaced by ``key_point_encoder``
    in the file name only (the release replaces it in the whole path, which breaks a directory named ...IMR...)."""
    head, sep, name = imr_uri.rpartition("/")
    if "IMR" not in name:
        raise ReleaseImportError(f"cannot derive the keypoint encoder's file from {imr_uri!r} (no 'IMR' in the file "
                                 "name); pass --keypoint-encoder")
    return f"{head}{sep}{name.replace('IMR', 'key_point_encoder')}"

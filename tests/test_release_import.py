"""Importing the research release's weights (docs/release.md, /work/shared/release-checkpoint.md).

Release-layout files are built here from the key/shape tables with seeded random tensors (nothing is
downloaded). The SD1.5-size files check the mapping itself: counts and sizes from the doc, every tensor at
the place the doc's section 5 names (written out again here, independently of the importer's rules), an
attention layer and the face encoder against straightforward re-implementations of the release's math.
The error cases and the end-to-end generate/serve use the tiny profile's scaled-down release layout
(``--profile tiny``): same structure and key patterns, sizes of the tiny base, so a full generation and a
model-server load run in seconds on a CPU. The error paths do not depend on the sizes, except the SD1.5
shape check, which uses the SD1.5 files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.release.layout import ReleaseLayout, processor_order

SD15 = ReleaseLayout.sd15()
# release-checkpoint.md, section 3, in order (two processors each: attn1, attn2).
DOC_ORDER = [("down_blocks.0.attentions.0", 320), ("down_blocks.0.attentions.1", 320),
             ("down_blocks.1.attentions.0", 640), ("down_blocks.1.attentions.1", 640),
             ("down_blocks.2.attentions.0", 1280), ("down_blocks.2.attentions.1", 1280),
             *[(f"up_blocks.1.attentions.{a}", 1280) for a in range(3)],
             *[(f"up_blocks.2.attentions.{a}", 640) for a in range(3)],
             *[(f"up_blocks.3.attentions.{a}", 320) for a in range(3)],
             ("mid_block.attentions.0", 1280)]


def _tensors(table: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            out[key] = (torch.rand(shape, generator=g) + 0.5).to(dtype)
        else:
            out[key] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return out


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _release(layout: ReleaseLayout, dtype=torch.float16, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    return {"proj_module": _tensors(layout.face_encoder_shapes(), seed, dtype),
            "SAA_module": _tensors(layout.saa_shapes(), seed + 1, dtype),
            "imr": _tensors(layout.imr_shapes(), seed + 2, dtype),
            "keypoint": _tensors(layout.keypoint_shapes(), seed + 3, dtype)}


def _doc_key(part: str, key: str) -> str:
    """Our key for a release key, as release-checkpoint.md section 5 states it (written independently of
    model/release/convert.py's rules)."""
    if part == "face_encoder":
        if key.startswith("proj."):
            return "id_mlp." + key[len("proj."):]
        if key.startswith("norm."):
            return "id_norm." + key[len("norm."):]
        rest = key[len("perceiver_resampler."):]
        if rest.startswith("proj_in."):
            return "clip_proj." + rest[len("proj_in."):]
        if rest.startswith(("proj_out.", "norm_out.")):
            return rest
        _, layer, sub, tail = rest.split(".", 3)
        tail = tail.replace("norm1.", "norm_context.").replace("norm2.", "norm_latents.") if sub == "0" \
            else "net." + tail
        return f"layers.{layer}.{sub}.{tail}"
    if part == "saa":
        index, param = key.split(".", 1)
        block, _ = DOC_ORDER[int(index) // 2]
        param = param.replace("_ip.", "_id.")
        return f"{block}.transformer_blocks.0.attn{1 + int(index) % 2}.processor.{param}"
    if part == "imr":
        if key.startswith("feature_fusion."):
            return "motion_mlp." + key[len("feature_fusion."):]
        for net, ours in (("disentangleNet.", "disentangle_layers."), ("entangleNet.", "entangle_layers.")):
            if key.startswith(net):
                layer, sub, tail = key[len(net):].split(".", 2)
                if sub == "0":
                    tail = "cross." + tail.replace("norm1.", "norm_context.").replace("norm2.", "norm_latents.")
                elif sub == "1":
                    tail = "self_attn." + tail.replace("norm1.", "norm_latents.")
                else:
                    tail = "ff.net." + tail
                return f"{ours}{layer}.{tail}"
        return key
    return key  # keypoint encoder: a 1:1 port


@pytest.fixture(scope="module")
def sd15_release():
    return _release(SD15, torch.float16, seed=0)


@pytest.fixture(scope="module")
def sd15_import(sd15_release):
    """fp16 files under the names the published loader reads, converted at SD1.5 size: the parts and the manifest
    fields ``import_release`` writes (writing and reading a checkpoint back is shown by the tiny import below;
    at SD1.5 size it would only add a quarter gigabyte of disk traffic)."""
    from dataclasses import asdict

    from model.release.convert import ReleaseSource, convert_release, release_dims

    r = sd15_release
    files = {"saa": _torch_bytes({"proj_module": r["proj_module"], "SAA_module": r["SAA_module"]}),
             "imr": _torch_bytes(r["imr"]), "kp": _torch_bytes(r["keypoint"])}
    parts, provenance = convert_release(ReleaseSource("models/SAA.bin", files["saa"]),
                                        ReleaseSource("models/IMR.bin", files["imr"]),
                                        ReleaseSource("models/key_point_encoder.bin", files["kp"]), SD15)
    return files, {"dims": asdict(release_dims(SD15)), "release": provenance}, parts


def _sd15_unet_on_meta():
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in SD15.unet.items() if k != "mid_block_type"}
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg, cross_attention_dim=768, attention_head_dim=8)


def test_tables_and_processor_order_follow_the_doc_and_diffusers(tiny_params):
    counts = {"fe": (SD15.face_encoder_shapes(), 56, 33_581_568), "saa": (SD15.saa_shapes(), 288, 44_679_168),
              "imr": (SD15.imr_shapes(), 48, 40_926_464), "kp": (SD15.keypoint_shapes(), 126, 8_306_624)}
    for name, (table, n, params) in counts.items():
        floats = sum(math.prod(s) for k, s in table.items() if not k.endswith("num_batches_tracked"))
        assert (len(table), floats) == (n, params), name
    assert SD15.saa_shapes()["7.to_k_lora.down.weight"] == (128, 768)
    assert SD15.saa_shapes()["6.to_k_lora.down.weight"] == (128, 640)
    assert SD15.saa_shapes()["31.to_v_ip.weight"] == (1280, 768)
    assert SD15.imr_shapes()["feature_fusion.4.weight"] == (4096, 1024)
    assert SD15.keypoint_shapes()["blocks.6.1.conv_block.0.weight"] == (768, 512, 1, 1)
    doc = [(f"{b}.transformer_blocks.0.attn{k}", h, k == 2) for b, h in DOC_ORDER for k in (1, 2)]
    assert SD15.processors == doc
    assert [n.removesuffix(".processor") for n in _sd15_unet_on_meta().attn_processors] == [n for n, _, _ in doc]
    from model.backbone import load_backbone
    from model.loading import base_location

    base, enc = base_location(tiny_params.model, tiny_params.storage.cache_dir)
    tiny_unet = load_backbone(base, enc).unet
    tiny = ReleaseLayout.scaled("tiny", tiny_params.model.tiny, 128, "dlib")
    assert [n.removesuffix(".processor") for n in tiny_unet.attn_processors] == [n for n, _, _ in tiny.processors]
    assert processor_order(dict(tiny_unet.config)) == tiny.processors


def test_every_tensor_lands_where_the_doc_says(sd15_release, sd15_import):
    files, manifest, parts = sd15_import
    sources = {"face_encoder": sd15_release["proj_module"], "saa": sd15_release["SAA_module"],
               "imr": sd15_release["imr"], "keypoint_encoder": sd15_release["keypoint"]}
    for part, release in sources.items():
        want = {_doc_key(part, k): v for k, v in release.items()}
        assert set(parts[part]) == set(want), part
        for key, value in want.items():
            got = parts[part][key]
            assert got.dtype == value.dtype and torch.equal(got, value), f"{part}.{key}"
    dims = manifest["dims"]
    assert dims["face_encoder"]["proj_out"] is True
    assert (dims["imr"]["norm_in"], dims["imr"]["motion_mlp"], dims["imr"]["keypoint_encoder"]) == \
        (True, "release", "release")
    assert dims["settings"]["model.saa.compat"] == "release" and dims["profile"] == "sd15"
    release = manifest["release"]
    assert release["sources"]["saa"]["sha256"] == hashlib.sha256(files["saa"]).hexdigest()
    assert release["sources"]["imr"]["dtypes"] == ["float16"] and release["layout_version"]
    # the parts load strictly into our modules built with the release variants, SAA into an SD1.5 UNet
    from model.checkpoint import load_state_strict
    from model.face_encoder import FaceEncoder
    from model.imr import IMR
    from model.release.keypoint_encoder import ReleaseKeypointEncoder
    from model.saa.install import install_saa, saa_state_dict

    load_state_strict(FaceEncoder(proj_out=True), parts["face_encoder"], "face_encoder")
    load_state_strict(IMR(norm_in=True, motion_mlp="release"), parts["imr"], "imr")
    load_state_strict(ReleaseKeypointEncoder(), parts["keypoint_encoder"], "keypoint_encoder")
    unet = _sd15_unet_on_meta()
    with torch.device("meta"):
        install_saa(unet, lora_rank=128)
    ours = saa_state_dict(unet)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in parts["saa"].items()}


def test_other_top_level_names_and_safetensors_import_the_same(sd15_release, sd15_import):
    """IP-Adapter's names with a DDP ``module.`` prefix, and an IMR saved as safetensors (fp32 files: the tiny
    end-to-end import below)."""
    from safetensors.torch import save as st_save

    from model.release.convert import ReleaseSource, convert_release

    r = sd15_release
    saa = {"image_proj": {f"module.{k}": v for k, v in r["proj_module"].items()},
           "ip_adapter": {f"module.{k}": v for k, v in r["SAA_module"].items()}}
    imr = st_save({f"module.{k}": v.contiguous() for k, v in r["imr"].items()})
    kp = {"state_dict": {f"module.{k}": v for k, v in r["keypoint"].items()}}
    parts, provenance = convert_release(ReleaseSource("SAA.bin", _torch_bytes(saa)),
                                        ReleaseSource("IMR.safetensors", imr),
                                        ReleaseSource("kp.bin", _torch_bytes(kp)), SD15)
    for part, tensors in sd15_import[2].items():
        assert set(parts[part]) == set(tensors) and all(torch.equal(parts[part][k], v) for k, v in tensors.items())
    assert provenance["sources"]["imr"]["format"] == "safetensors"
    assert provenance["sources"]["saa"]["format"] == "torch-zip"


def _release_face_encoder(w: dict, id_embeds: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """ProjPlusModel's forward (shortcut=False) as the doc states it, with plain tensor ops."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], w[f"{p}.weight"], w[f"{p}.bias"])

    def lin(x, p, bias=True):
        return x @ w[f"{p}.weight"].T + (w[f"{p}.bias"] if bias else 0)

    x = lin(F.gelu(lin(id_embeds, "proj.0")), "proj.2").reshape(id_embeds.shape[0], 4, 768)
    x = ln(x, "norm")
    ctx = lin(clip, "perceiver_resampler.proj_in")
    for layer in range(4):
        p = f"perceiver_resampler.layers.{layer}"
        lat, c = ln(x, f"{p}.0.norm2"), ln(ctx, f"{p}.0.norm1")
        q = lin(lat, f"{p}.0.to_q", bias=False)
        k, v = lin(torch.cat([c, lat], dim=1), f"{p}.0.to_kv", bias=False).chunk(2, dim=-1)
        heads = [t.reshape(t.shape[0], t.shape[1], 12, 64).transpose(1, 2) for t in (q, k, v)]
        scale = 64 ** -0.25
        weight = ((heads[0] * scale) @ (heads[1] * scale).transpose(-2, -1)).float().softmax(dim=-1)
        out = (weight @ heads[2]).transpose(1, 2).reshape(x.shape)
        x = lin(out, f"{p}.0.to_out", bias=False) + x
        h = F.gelu(lin(ln(x, f"{p}.1.0"), f"{p}.1.1", bias=False))
        x = lin(h, f"{p}.1.3", bias=False) + x
    x = lin(x, "perceiver_resampler.proj_out")
    return ln(x, "perceiver_resampler.norm_out")


def test_face_encoder_reproduces_the_release_math(sd15_release, sd15_import):
    from model.checkpoint import load_state_strict
    from model.face_encoder import FaceEncoder

    fe = FaceEncoder(proj_out=True).eval()
    load_state_strict(fe, sd15_import[2]["face_encoder"], "face_encoder")
    w = {k: v.float() for k, v in sd15_release["proj_module"].items()}
    g = torch.Generator().manual_seed(3)
    emb, clip = F.normalize(torch.randn(2, 512, generator=g), dim=-1), torch.randn(2, 257, 1280, generator=g)
    with torch.no_grad():
        ours, theirs = fe(emb, clip), _release_face_encoder(w, emb, clip)
    assert (ours - theirs).norm() / theirs.norm() < 1e-5


def _lora(w: dict, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ w[f"{i}.{name}_lora.down.weight"].T @ w[f"{i}.{name}_lora.up.weight"].T


def _release_cross_attention(attn, w, i, x, text, ids, boxes, grid, gating, boost, scale=1.0, tau=0.3):
    """SAAProcessor's forward as the doc states it (section 4): base + LoRA text attention; ID scores; gate from
    the raw scores (sum over heads and tokens, min-max per sample, < tau -> 0); boost inside / outside the
    boxes with edges truncated to rows/columns; routing by -inf per box; fp32 softmax over the ID tokens."""
    b, hw, _ = x.shape
    heads, n = attn.heads, len(boxes)
    q = attn.to_q(x) + _lora(w, i, "to_q", x)
    k = attn.to_k(text) + _lora(w, i, "to_k", text)
    v = attn.to_v(text) + _lora(w, i, "to_v", text)
    k_id, v_id = ids @ w[f"{i}.to_k_ip.weight"].T, ids @ w[f"{i}.to_v_ip.weight"].T
    split = [t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v, k_id, v_id)]
    q, k, v, k_id, v_id = split
    d = q.shape[-1]
    text_out = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
    scores = (q @ k_id.transpose(-1, -2)) / math.sqrt(d)  # [B, heads, HW, 4N]
    a = torch.ones(b, hw)
    if gating:
        a = scores.sum(dim=(1, 3))
        a = (a - a.min(1, keepdim=True).values) / (a.max(1, keepdim=True).values - a.min(1, keepdim=True).values)
        a[a < tau] = 0
        inside = torch.zeros(b, grid, grid, dtype=torch.bool)
        masked = scores.clone()
        for j, (y0, x0, y1, x1) in enumerate(boxes):
            r0, r1, c0, c1 = int(y0 * grid), int(y1 * grid), int(x0 * grid), int(x1 * grid)
            inside[:, r0:r1, c0:c1] = True
            box = torch.zeros(grid, grid, dtype=torch.bool)
            box[r0:r1, c0:c1] = True
            others = [t for t in range(4 * n) if t // 4 != j]
            sel = masked[:, :, box.flatten()]
            sel[..., others] = -math.inf
            masked[:, :, box.flatten()] = sel
        scores = masked
        if boost:
            flat = inside.flatten(1)
            a = torch.where(flat, a + 4.0, a / 5.0)
    id_out = scores.float().softmax(-1) @ v_id
    out = text_out + scale * a[:, None, :, None] * id_out
    out = out.transpose(1, 2).reshape(b, hw, -1)
    return attn.to_out[0](out) + _lora(w, i, "to_out", out)


def _one_layer(w_ours: dict, i: int, h: int, cross: bool):
    from diffusers.models.attention_processor import Attention

    from model.saa.lora import LoRAAttnProcessor
    from model.saa.processor import SAAAttnProcessor

    torch.manual_seed(11)
    attn = Attention(query_dim=h, cross_attention_dim=768 if cross else None, heads=8, dim_head=h // 8,
                     out_bias=True).eval()
    proc = SAAAttnProcessor(h, 768, 128) if cross else LoRAAttnProcessor(h, 128)
    block, _ = DOC_ORDER[i // 2]
    prefix = f"{block}.transformer_blocks.0.attn{1 + i % 2}.processor."
    proc.load_state_dict({k[len(prefix):]: v for k, v in w_ours.items() if k.startswith(prefix)})
    attn.set_processor(proc)
    return attn


def test_attention_layers_reproduce_the_release_math(sd15_release, sd15_import):
    from model.release.compat import context_options
    from model.config import SAAParams
    from model.saa.context import IDContext

    w = {k: v.float() for k, v in sd15_release["SAA_module"].items()}
    saa_ours = sd15_import[2]["saa"]
    g = torch.Generator().manual_seed(5)
    grid = 16
    x = torch.randn(2, grid * grid, 320, generator=g)
    text, ids = torch.randn(2, 77, 768, generator=g), torch.randn(2, 8, 768, generator=g)
    boxes = [(0.1, 0.03, 0.9, 0.47), (0.2, 0.55, 0.77, 0.97)]  # not on cell edges: truncation matters
    attn = _one_layer(saa_ours, 1, 320, cross=True)
    states = torch.cat([text, ids], dim=1)
    with torch.no_grad():
        for gating, boost in ((True, True), (True, False), (False, False)):
            opts = context_options("release", SAAParams(gating=gating))
            ctx = IDContext(num_ids=2, regions=torch.tensor(boxes), latent_hw=(grid, grid), gating=gating,
                            boost_active=boost, **opts)
            ours = attn(x, encoder_hidden_states=states, id_context=ctx)
            theirs = _release_cross_attention(attn, w, 1, x, text, ids, boxes, grid, gating, boost)
            assert (ours - theirs).norm() / theirs.norm() < 1e-5, (gating, boost)
        # our own convention (cell centres, routing kept without gating) is a different function here
        ctx = IDContext(num_ids=2, regions=torch.tensor(boxes), latent_hw=(grid, grid), boost_active=True)
        theirs = _release_cross_attention(attn, w, 1, x, text, ids, boxes, grid, True, True)
        assert (attn(x, encoder_hidden_states=states, id_context=ctx) - theirs).norm() / theirs.norm() > 1e-3
        self_attn = _one_layer(saa_ours, 0, 320, cross=False)
        q = self_attn.to_q(x) + _lora(w, 0, "to_q", x)
        k = self_attn.to_k(x) + _lora(w, 0, "to_k", x)
        v = self_attn.to_v(x) + _lora(w, 0, "to_v", x)
        q, k, v = (t.reshape(2, -1, 8, 40).transpose(1, 2) for t in (q, k, v))
        out = (((q @ k.transpose(-1, -2)) / math.sqrt(40)).softmax(-1) @ v).transpose(1, 2).reshape(2, -1, 320)
        theirs = self_attn.to_out[0](out) + _lora(w, 0, "to_out", out)
        assert (self_attn(x) - theirs).norm() / theirs.norm() < 1e-5


# ---------------------------------------------------------------------- CLI, errors, tiny end to end


@pytest.fixture(scope="module")
def tiny_layout(tiny_params):
    return ReleaseLayout.scaled("tiny", tiny_params.model.tiny, 128, "dlib")


@pytest.fixture(scope="module")
def tiny_files(tiny_layout, tmp_path_factory) -> Path:
    """Scaled-down release files in the release's own directory layout (models/SAA.bin, IMR.bin, key_point...)."""
    r = _release(tiny_layout, torch.float32, seed=7)
    d = tmp_path_factory.mktemp("release") / "models"
    d.mkdir()
    (d / "SAA.bin").write_bytes(_torch_bytes({"proj_module": r["proj_module"], "SAA_module": r["SAA_module"]}))
    (d / "IMR.bin").write_bytes(_torch_bytes(r["imr"]))
    (d / "key_point_encoder.bin").write_bytes(_torch_bytes(r["keypoint"]))
    return d


def _cli(tiny_params, tmp_path, *args: str) -> int:
    from components.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"storage": {"cache_dir": str(tiny_params.storage.cache_dir)}}))
    return main(["--params", str(params), "import-release", *args])


def _bad_files(tiny_layout, tiny_files) -> dict[str, tuple[bytes, str]]:
    good = (tiny_files / "SAA.bin").read_bytes()
    saa = torch.load(io.BytesIO(good), weights_only=True)
    missing = {"proj_module": dict(saa["proj_module"]), "SAA_module": dict(saa["SAA_module"])}
    del missing["proj_module"]["perceiver_resampler.proj_out.weight"], missing["SAA_module"]["3.to_k_ip.weight"]
    extra = {**saa, "extra": {"vae.decoder.weight": torch.zeros(3)}}
    shaped = {"proj_module": {**saa["proj_module"], "proj.0.weight": torch.zeros(256, 512)},
              "SAA_module": saa["SAA_module"]}
    return {
        "not a state dict": (_torch_bytes(torch.zeros(3)), "not a state dict"),
        "a list": (_torch_bytes([torch.zeros(3)]), "not a state dict"),
        "missing": (_torch_bytes(missing), "2 missing tensor(s): perceiver_resampler.proj_out.weight, "
                                           "3.to_k_ip.weight"),
        "unexpected": (_torch_bytes(extra), "1 unexpected tensor(s): extra.vae.decoder.weight"),
        "shape": (_torch_bytes(shaped), "proj_module.proj.0.weight has shape (256, 512), the tiny release layout "
                                        "needs (256, 128)"),
        "truncated": (good[: len(good) // 2], "truncated or corrupt file"),
        "corrupt": (b"\x80\x02garbage" * 64, "truncated or corrupt file"),
        "objects": (_torch_bytes({**saa, "args": argparse.Namespace(lr=1e-4)}), "not plain tensors"),
    }


@pytest.mark.parametrize("case", ["not a state dict", "a list", "missing", "unexpected", "shape", "truncated",
                                  "corrupt", "objects"])
def test_bad_files_fail_with_their_message_and_write_nothing(case, tiny_params, tiny_layout, tiny_files, tmp_path,
                                                             capsys):
    data, message = _bad_files(tiny_layout, tiny_files)[case]
    bad = tmp_path / "SAA.bin"
    bad.write_bytes(data)
    out = tmp_path / "out" / "ckpt"
    code = _cli(tiny_params, tmp_path, "--saa", str(bad), "--imr", str(tiny_files / "IMR.bin"), "--out", str(out),
                "--profile", "tiny")
    err = capsys.readouterr().err
    assert code == 2 and message in err and "nothing written" in err, err
    assert not out.exists() and not (tmp_path / "out").exists()


def test_sd15_shape_mismatch_names_the_tensor(sd15_release):
    """The SD1.5 tables refuse a tensor of another size (the CLI cases above show that nothing is written)."""
    from model.release.reader import ReleaseImportError, load_file, match_tables

    imr = {**sd15_release["imr"], "proj_in.weight": torch.zeros(1024, 1024, dtype=torch.float16)}
    with pytest.raises(ReleaseImportError, match=r"IMR.bin: 1 tensor\(s\) do not fit: proj_in.weight has shape "
                                                 r"\(1024, 1024\), SD1.5 needs \(1024, 768\)"):
        match_tables(load_file(_torch_bytes(imr), "IMR.bin"), {"imr": SD15.imr_shapes()}, "SD1.5")


@pytest.fixture(scope="module")
def tiny_import(tiny_params, tiny_files, tmp_path_factory) -> Path:
    from components.cli import main

    work = tmp_path_factory.mktemp("tiny-import")
    (work / "params.yaml").write_text(json.dumps({"storage": {"cache_dir": str(tiny_params.storage.cache_dir)}}))
    out = work / "ckpt"
    assert main(["--params", str(work / "params.yaml"), "import-release", "--saa", str(tiny_files / "SAA.bin"),
                 "--imr", str(tiny_files / "IMR.bin"), "--out", str(out), "--profile", "tiny"]) == 0
    return out


def test_imported_checkpoint_generates_single_and_multi_id(tiny_params, tiny_import, single_face_photo):
    from model.face_analysis.images import load_image
    from model.loading import load_pipeline
    from model.pipeline import IdentityInput
    from model.release.keypoint_encoder import ReleaseKeypointEncoder

    manifest = json.loads((tiny_import / "manifest.json").read_text())
    assert manifest["stage"] == "import-release" and manifest["dims"]["settings"]["model.saa.compat"] == "release"
    saa_bin = Path(manifest["release"]["sources"]["saa"]["uri"])
    assert manifest["release"]["sources"]["saa"]["sha256"] == hashlib.sha256(saa_bin.read_bytes()).hexdigest()
    assert manifest["release"]["sources"]["keypoint_encoder"]["uri"].endswith("models/key_point_encoder.bin")
    assert manifest["release"]["sources"]["imr"]["dtypes"] == ["float32"]
    pipe = load_pipeline(tiny_params.model, tiny_params.face, tiny_import, tiny_params.storage.cache_dir)
    dyn = pipe.dynamicid
    assert dyn.compat == "release" and dyn.face_encoder.proj_out is not None and dyn.imr.norm_in is not None
    assert isinstance(dyn.keypoint_encoder, ReleaseKeypointEncoder)
    hanks = load_image(single_face_photo)
    one = pipe("a photo of a person", [IdentityInput(image=hanks, expression="smiling")], num_inference_steps=2,
               seed=1, output_type="pt")
    assert one.identities[0][0].edited and torch.isfinite(one.images).all()
    two = [IdentityInput(image=hanks, bbox=(0.1, 0.0, 0.9, 0.5)), IdentityInput(image=hanks, bbox=(0.1, 0.5, 0.9, 1.0))]
    multi = pipe("two people", two, num_inference_steps=2, seed=1, output_type="pt")
    assert torch.isfinite(multi.images).all() and len(multi.identities[0]) == 2
    # the compat mode changes the computation; overriding it back to ours gives another image
    pipe.model_params = pipe.model_params.model_copy(update={"saa": pipe.model_params.saa.model_copy(
        update={"compat": "dynamicid"})})
    pipe._uncond_tokens = None
    ours = pipe("a photo of a person", [IdentityInput(image=hanks, expression="smiling")], num_inference_steps=2,
                seed=1, output_type="pt")
    assert not torch.equal(ours.images, one.images)


def test_imported_checkpoint_loads_in_the_model_server(tiny_params, tiny_import):
    from prometheus_client import CollectorRegistry

    from components.core.config import params_from_dict
    from serving.metrics import ServingMetrics
    from serving.predictor import DynamicIDModel

    params = params_from_dict({"storage": {"cache_dir": str(tiny_params.storage.cache_dir)},
                               "serve": {"cpu_threads": 1, "default_steps": 2}})
    m = DynamicIDModel(params, model_uri=str(tiny_import),
                       metrics=ServingMetrics("dynamicid", 4, registry=CollectorRegistry()))
    try:
        assert m.load() and m.ready  # includes the warm-up generation through the fast path
        assert m._engine.pipe.dynamicid.compat == "release"
    finally:
        m.stop_engine()


def test_release_landmark_and_clip_inputs():
    from transformers import CLIPImageProcessor

    from model.release.compat import clip_input, landmark_image, uncond_clip_image
    from model.dynamicid import normalize_for_clip

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 217, 3), dtype=np.uint8)
    want = torch.from_numpy(CLIPImageProcessor()(images=image, return_tensors="np")["pixel_values"][0])
    assert torch.allclose(normalize_for_clip(clip_input(image, 224)[None])[0], want, atol=1e-5)
    assert torch.equal(normalize_for_clip(uncond_clip_image("release", 8, "cpu")), torch.zeros(1, 3, 8, 8))
    pts = np.array([[0.0, 0.0], [100.9, 50.2], [217.0, 300.0], [108.5, 150.0]])
    img = landmark_image(pts, (300, 217), 96)
    on = {(int(y), int(x)) for y, x in zip(*np.nonzero(img[0]))}
    assert on == {(int(50.2 * 96 / 300), int(100.9 * 96 / 217)), (48, 48)}  # (0, 0) and the far corner are out


def test_checkpoint_without_architecture_keys_loads_as_our_design(tiny_params, init_ckpt, tmp_path):
    """A checkpoint written before the architecture options existed is our design in our conventions."""
    import shutil

    from model.imr import KeypointEncoder
    from model.loading import load_pipeline

    old = tmp_path / "old"
    shutil.copytree(init_ckpt, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["dims"]["face_encoder"].pop("proj_out")
    for key in ("norm_in", "motion_mlp", "keypoint_encoder"):
        manifest["dims"]["imr"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = load_pipeline(tiny_params.model, tiny_params.face, old, tiny_params.storage.cache_dir)
    dyn = pipe.dynamicid
    assert dyn.compat == "dynamicid" and dyn.face_encoder.proj_out is None and dyn.imr.norm_in is None
    assert isinstance(dyn.keypoint_encoder, KeypointEncoder)


def test_s3_sources_and_output(tiny_params, tiny_files, tmp_path, monkeypatch, capsys):
    """s3:// in and out through the project's storage client (a local moto server): the keypoint file is found
    next to IMR.bin, the checkpoint is uploaded, and a missing object is an error that writes nothing."""
    from components.cli import main
    from services import moto_s3

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto_s3("weights") as s3:
        client = s3.client()
        for name in ("SAA.bin", "IMR.bin", "key_point_encoder.bin"):
            client.upload_file(str(tiny_files / name), "weights", f"release/{name}")
        params = tmp_path / "params.yaml"
        params.write_text(json.dumps({"storage": {"cache_dir": str(tiny_params.storage.cache_dir),
                                                  "endpoint_url": s3.endpoint, "max_attempts": 1}}))
        args = ["--params", str(params), "import-release", "--imr", "s3://weights/release/IMR.bin", "--profile",
                "tiny"]
        assert main(args + ["--saa", "s3://weights/release/nope.bin", "--out", "s3://weights/out/a"]) == 2
        assert "s3://weights/release/nope.bin" in capsys.readouterr().err and not s3.keys("out/")
        assert main(args + ["--saa", "s3://weights/release/SAA.bin", "--out", "s3://weights/out/b"]) == 0
        keys = set(s3.keys("out/b/"))
        assert {f"out/b/{p}.safetensors" for p in ("saa", "face_encoder", "imr", "keypoint_encoder")} < keys
        manifest = json.loads(client.get_object(Bucket="weights", Key="out/b/manifest.json")["Body"].read())
        assert manifest["release"]["sources"]["keypoint_encoder"]["uri"] == \
            "s3://weights/release/key_point_encoder.bin"


@pytest.mark.parametrize("grid", [(8, 8), (10, 10), (6, 10), (16, 12)])
def test_truncated_boxes_follow_the_release_rule(grid):
    """``box_rule="truncate"``: rows int(y0*h)..int(y1*h)-1 and columns alike, also for edges that float32 puts
    just below a cell boundary (0.7 * 10); ``routing=False`` lets every query see every identity."""
    from model.saa.context import IDContext

    q_h, q_w = grid
    boxes = [(0.0, 0.1, 0.7, 0.45), (0.25, 0.5, 1.0, 0.95)]
    ctx = IDContext(num_ids=2, regions=torch.tensor(boxes), latent_hw=grid, box_rule="truncate")
    masks = ctx.region_masks(q_h, q_w, "cpu")
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        want = torch.zeros(q_h, q_w, dtype=torch.bool)
        want[int(y0 * q_h):int(y1 * q_h), int(x0 * q_w):int(x1 * q_w)] = True
        assert torch.equal(masks.inside[0, :, i], want.flatten()), (grid, i)
    free = IDContext(num_ids=2, regions=torch.tensor(boxes), latent_hw=grid, box_rule="truncate", routing=False)
    assert bool(free.region_masks(q_h, q_w, "cpu").allowed.all())

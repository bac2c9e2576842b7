"""The research release's tensors: key patterns and shapes of every file, and the attention-processor order.

``ReleaseLayout`` describes one target model (the SD1.5 release by default, ``ReleaseLayout.sd15()``;
a scaled-down layout of the same structure for tests and the tiny profile) and produces the
key -> shape table of each release file (``/work/shared/release-checkpoint.md``, sections 2-3).
Tables, not hard-coded lists, so the importer can check a file key by key and shape by shape
and name the first thing that does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.release.keypoint_encoder import release_keypoint_units

# What a checkpoint records as the layout it was imported from (release code commit + table version).
LAYOUT_VERSION = "dynamicid-release-sd15/1 (ByteCat-bot/DynamicID e8237e3..0cd30a5)"

# Stable Diffusion 1.5's UNet config, the fields the processor order depends on.
SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}

Shape = tuple[int, ...]


def processor_order(unet_config: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """(attention module path, width h, is cross-attention) in ``unet.attn_processors`` order.

    That dict is filled by a recursive ``named_children()`` walk, and UNet2DConditionModel
    registers ``down_blocks`` and ``up_blocks`` before ``mid_block``: down, up, then mid, attn1
    before attn2 (release-checkpoint.md, section 3). The release's integer keys index this list.
    """
    widths = list(unet_config["block_out_channels"])
    layers = int(unet_config["layers_per_block"])
    out: list[tuple[str, int, bool]] = []

    def block(prefix: str, count: int, width: int) -> None:
        for a in range(count):
            for k in (1, 2):
                out.append((f"{prefix}.attentions.{a}.transformer_blocks.0.attn{k}", width, k == 2))

    for i, kind in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in kind:
            block(f"down_blocks.{i}", layers, widths[i])
    for i, kind in enumerate(unet_config["up_block_types"]):
        if "CrossAttn" in kind:
            block(f"up_blocks.{i}", layers + 1, widths[::-1][i])
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        block("mid_block", 1, widths[-1])
    return out


@dataclass(frozen=True)
class ReleaseLayout:
    """Dimensions of a release-layout model; ``sd15()`` is the released one (section 4)."""

    profile: str
    unet: dict[str, Any]
    id_dim: int = 512
    clip_dim: int = 1280
    token_dim: int = 768
    text_dim: int = 768
    num_tokens: int = 4
    lora_rank: int = 128
    face_backend: str = "insightface"
    fe_depth: int = 4
    fe_heads: int = 12
    fe_dim_head: int = 64
    fe_ff_mult: int = 4
    imr_depth: int = 1
    imr_width: int = 1024
    imr_heads: int = 16
    imr_latents: int = 4
    imr_ff_mult: int = 4
    landmark_size: int = 96
    landmark_dim: int = 768

    @classmethod
    def sd15(cls) -> "ReleaseLayout":
        return cls(profile="sd15", unet=SD15_UNET)

    @classmethod
    def scaled(cls, profile: str, params: Any, id_dim: int, face_backend: str) -> "ReleaseLayout":
        """The release's structure at a profile's (smaller) sizes: ``params`` is ``model.tiny``. The tiny base is
        built with cross-attention in every block (model/backbone.py), so every level has SAA processors. Used by
        tests and the tiny profile; the released weights themselves are ``sd15()``."""
        levels = len(params.unet.block_out_channels)
        unet = {"block_out_channels": list(params.unet.block_out_channels),
                "down_block_types": ["CrossAttnDownBlock2D"] * levels,
                "up_block_types": ["CrossAttnUpBlock2D"] * levels,
                "layers_per_block": params.unet.layers_per_block, "mid_block_type": "UNetMidBlock2DCrossAttn"}
        fe, im = params.face_encoder, params.imr
        return cls(profile=profile, unet=unet, id_dim=id_dim, clip_dim=params.vision.hidden_size,
                   token_dim=params.cross_attention_dim, text_dim=params.text.hidden_size,
                   num_tokens=params.num_id_tokens, lora_rank=params.lora_rank, face_backend=face_backend,
                   fe_depth=fe.depth, fe_heads=fe.heads, fe_dim_head=fe.dim_head, fe_ff_mult=fe.ff_mult,
                   imr_depth=im.depth, imr_width=im.width, imr_heads=im.heads, imr_latents=im.num_latents,
                   imr_ff_mult=im.ff_mult, landmark_size=im.landmark_size, landmark_dim=im.landmark_feature_dim)

    @property
    def processors(self) -> list[tuple[str, int, bool]]:
        return processor_order(self.unet)

    # ------------------------------------------------------------------ key -> shape tables
    def face_encoder_shapes(self) -> dict[str, Shape]:
        """``proj_module`` (functions.ProjPlusModel): 56 tensors for SD1.5."""
        d, inner = self.token_dim, self.fe_heads * self.fe_dim_head
        t: dict[str, Shape] = {
            "proj.0.weight": (2 * self.id_dim, self.id_dim), "proj.0.bias": (2 * self.id_dim,),
            "proj.2.weight": (self.num_tokens * d, 2 * self.id_dim), "proj.2.bias": (self.num_tokens * d,),
            "norm.weight": (d,), "norm.bias": (d,),
            "perceiver_resampler.proj_in.weight": (d, self.clip_dim), "perceiver_resampler.proj_in.bias": (d,),
            "perceiver_resampler.proj_out.weight": (d, d), "perceiver_resampler.proj_out.bias": (d,),
            "perceiver_resampler.norm_out.weight": (d,), "perceiver_resampler.norm_out.bias": (d,),
        }
        for layer in range(self.fe_depth):
            p = f"perceiver_resampler.layers.{layer}"
            t.update(_perceiver_shapes(f"{p}.0", d, inner, with_context=True))
            t.update(_ff_shapes(f"{p}.1", d, self.fe_ff_mult))
        return t

    def saa_shapes(self) -> dict[str, Shape]:
        """``SAA_module``: LoRA of every processor, ID key/value projections of the cross-attentions (288 for SD1.5)."""
        t: dict[str, Shape] = {}
        r = self.lora_rank
        for i, (_, h, cross) in enumerate(self.processors):
            kv_in = self.token_dim if cross else h
            for name, fan_in in (("to_q", h), ("to_k", kv_in), ("to_v", kv_in), ("to_out", h)):
                t[f"{i}.{name}_lora.down.weight"] = (r, fan_in)
                t[f"{i}.{name}_lora.up.weight"] = (h, r)
            if cross:
                t[f"{i}.to_k_ip.weight"] = (h, self.token_dim)
                t[f"{i}.to_v_ip.weight"] = (h, self.token_dim)
        return t

    def imr_shapes(self) -> dict[str, Shape]:
        """``IMR.bin`` (model.IMR): 48 tensors for SD1.5 at depth 1."""
        w, d, fused = self.imr_width, self.token_dim, self.landmark_dim + self.text_dim
        inner = w  # dim_head = width // heads, heads * dim_head = width
        t: dict[str, Shape] = {
            "feature_fusion.0.weight": (fused,), "feature_fusion.0.bias": (fused,),
            "feature_fusion.1.weight": (w, fused), "feature_fusion.1.bias": (w,),
            "feature_fusion.3.weight": (w,), "feature_fusion.3.bias": (w,),
            "feature_fusion.4.weight": (self.imr_latents * w, w), "feature_fusion.4.bias": (self.imr_latents * w,),
            "norm_in.weight": (d,), "norm_in.bias": (d,),
            "proj_in.weight": (w, d), "proj_in.bias": (w,),
            "norm_out.weight": (w,), "norm_out.bias": (w,),
            "proj_out.weight": (d, w), "proj_out.bias": (d,),
        }
        for net in ("disentangleNet", "entangleNet"):
            for layer in range(self.imr_depth):
                p = f"{net}.{layer}"
                t.update(_perceiver_shapes(f"{p}.0", w, inner, with_context=True))
                t.update(_perceiver_shapes(f"{p}.1", w, inner, with_context=False))
                t.update(_ff_shapes(f"{p}.2", w, self.imr_ff_mult))
        return t

    def keypoint_shapes(self) -> dict[str, Shape]:
        """``key_point_encoder.bin`` (model.KeyPointEncoder): 126 entries, BatchNorm buffers included."""
        t: dict[str, Shape] = {}
        for b, block in enumerate(release_keypoint_units(self.landmark_dim)):
            for j, (cin, cout, k, _, _, _) in enumerate(block):
                p = f"blocks.{b}.{j}.conv_block"
                t[f"{p}.0.weight"], t[f"{p}.0.bias"] = (cout, cin, k, k), (cout,)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t[f"{p}.1.{name}"] = (cout,)
                t[f"{p}.1.num_batches_tracked"] = ()
        return t


def _perceiver_shapes(prefix: str, dim: int, inner: int, with_context: bool) -> dict[str, Shape]:
    """norm1 = the context's LayerNorm (absent in self-attention), norm2 = the latents'; q/kv/out without bias."""
    t: dict[str, Shape] = {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,)}
    if with_context:
        t.update({f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,)})
    t.update({f"{prefix}.to_q.weight": (inner, dim), f"{prefix}.to_kv.weight": (2 * inner, dim),
              f"{prefix}.to_out.weight": (dim, inner)})
    return t


def _ff_shapes(prefix: str, dim: int, mult: int) -> dict[str, Shape]:
    return {f"{prefix}.0.weight": (dim,), f"{prefix}.0.bias": (dim,), f"{prefix}.1.weight": (dim * mult, dim),
            f"{prefix}.3.weight": (dim, dim * mult)}

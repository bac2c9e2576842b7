"""Per-request ID state in fixed buffers: LayerIDState, GridIDState, StaticIDContext, level_grids.

The ID tokens are the same for every denoising step of a request, so their keys/values per
cross-attention (``LayerIDState``) and the region masks, routing bias and boost terms per query
grid (``GridIDState``) are computed once per request into these buffers, which graph replays
read through a ``StaticIDContext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.saa.context import IDContext
from model.saa.regions import RegionMasks


@dataclass


class LayerIDState:
    """ID-branch tensors of one cross-attention for one request (fixed buffers in graph mode)."""

    key: Tensor  # [B, heads, n_id, d]  ID keys as the SDPA sees them (mix_scale applied)
    value: Tensor  # [B, heads, n_id, d]  ID values with id_scale folded in (per sample and identity)
    key_mean: Tensor  # [B, inner, 1]  mean raw ID key: the gate's direction (a(q) ~ q . key_mean)


@dataclass


class GridIDState:
    """Region tensors of one query grid (UNet level) for one request."""

    masks: RegionMasks  # inside [B, HW, N], inside_any [B, HW], allowed [B, 1, HW, n_id] or None
    boost_add: Tensor  # [B, HW, 1] fp32: b inside any box, 0 outside
    boost_mul: Tensor  # [B, HW, 1] fp32: 1 inside any box, 1 / (b + 1) outside
    # [B, 1, HW, P] in the model dtype, P = n_id rounded up to 16: the routing as an additive SDPA
    # bias (0 allowed, -inf not). Precomputed and row-aligned, so the attention kernel neither
    # converts a boolean mask nor pads one on every call; None with one identity.
    bias: Tensor | None = None

    def routing_bias(self, n_id: int) -> Tensor | None:
        return None if self.bias is None else self.bias[..., :n_id]


@dataclass(eq=False)


class StaticIDContext(IDContext):
    """IDContext whose per-request tensors live in fixed buffers that graph replays read.

    ``precomputed=True``: the encoder states handed to the UNet hold the text tokens only and
    every cross-attention is a ``FastSAAProcessor`` reading its ID keys/values from ``layers``.
    ``precomputed=False``: the plain ``SAAAttnProcessor`` runs unchanged; only its region masks
    come from ``grids`` (so they are never rebuilt, nor cached stale, inside a captured graph).
    """

    precomputed: bool = False
    layers: dict[str, LayerIDState] = field(default_factory=dict)
    grids: dict[tuple[int, int], GridIDState] = field(default_factory=dict)

    def region_masks(self, q_h: int, q_w: int, device: torch.device | str) -> RegionMasks:
        return self.grids[(q_h, q_w)].masks


def level_grids(latent_hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Query grids of every UNet level: each stride-2 downsampling rounds up (as IDContext)."""
    h, w = latent_hw
    grids = []
    for _ in range(levels):
        grids.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return grids

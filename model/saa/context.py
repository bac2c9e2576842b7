"""IDContext: the per-call identity state every SAA processor reads (token layout, regions, scale, boost).

It travels through ``unet(..., cross_attention_kwargs={"id_context": ctx})`` and caches its
region masks per (query grid, device), so processors keep no per-call state of their own.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from model.saa.regions import RegionMasks, default_regions, masks_from_boxes, validate_regions


class MapRecorder(Protocol):
    """What the processors call while layout auto observes (``model.saa.layout_maps.ActivationRecorder``)."""

    def record(self, query: Tensor, key: Tensor, grid: tuple[int, int]) -> None:
        """query [B, heads, HW, d], raw ID keys [B, heads, N*K, d], the layer's query grid (h, w)."""

# Fields of IDContext that change which tokens exist or where they go: changing one after
# construction re-validates the context and drops its cached masks.
_LAYOUT_FIELDS = frozenset({"num_ids", "num_tokens", "regions", "latent_hw", "mix_scale", "box_rule", "routing"})
_MAX_LEVELS = 16


@dataclass(eq=False)


class IDContext:
    """Per-call state handed to every processor via ``unet(..., cross_attention_kwargs={"id_context": ctx})``.

    Encoder states are ``[text (T) ; id_1 (K) ; ... ; id_N (K)]``; with ``mix_scale`` set
    (one identity, two token sources) they are ``[text ; source_a (K) ; source_b (K)]``.
    ``latent_hw`` maps a query index to (y, x) at every UNet level: the level's grid is
    inferred from the sequence length, each downsampling rounding up (ceil).
    The context caches its region masks per (query grid, device); contexts compare by
    identity, so build one per request (or per batch) and reuse it for every step.
    """

    num_ids: int
    num_tokens: int = 4
    regions: Tensor | None = None  # [N, 4] or [B, N, 4], normalised (y0, x0, y1, x1); None = N vertical strips
    latent_hw: tuple[int, int] = (64, 64)
    # float, [B] per sample (CFG halves, batched requests) or [B, N] per sample and identity (each person's own
    # scale, applied to that identity's tokens only: split_id_scale); a Python 0.0 skips the branch
    id_scale: float | Tensor = 1.0
    gating: bool = True
    tau: float = 0.3
    boost: float = 4.0
    boost_active: bool = False  # set per denoising step by the sampler (step < boost_steps)
    mix_scale: float | None = None
    # "centre": a query is in a box when its cell centre is; "truncate": rows int(y0 * h) .. int(y1 * h) - 1 (and
    # columns alike), the research release's rule (model/release/compat.py). routing=False: every query may
    # attend to every identity (the release with gating off).
    box_rule: str = "centre"
    routing: bool = True
    # layout auto (model/saa/layout_maps.py): while set, the processors add each identity's gate map to it
    recorder: MapRecorder | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    _ready: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        self._ready = True

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _LAYOUT_FIELDS and self.__dict__.get("_ready", False):
            self._validate()
            self._cache.clear()

    def _validate(self) -> None:
        if int(self.num_ids) != self.num_ids or self.num_ids < 0:
            raise ValueError(f"num_ids must be a non-negative integer, got {self.num_ids!r}")
        if int(self.num_tokens) != self.num_tokens or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {self.num_tokens!r}")
        hw = tuple(self.latent_hw)
        if len(hw) != 2 or any(int(v) != v or v < 1 for v in hw):
            raise ValueError(f"latent_hw must be two positive integers (h, w), got {self.latent_hw!r}")
        if self.box_rule not in ("centre", "truncate"):
            raise ValueError(f"box_rule must be 'centre' or 'truncate', got {self.box_rule!r}")
        if self.mix_scale is not None:
            if self.num_ids != 1:
                raise ValueError(
                    f"mix_scale needs exactly one identity (two token sources), got num_ids={self.num_ids}"
                )
            if not 0.0 <= float(self.mix_scale) <= 1.0:
                raise ValueError(f"mix_scale must lie in [0, 1], got {self.mix_scale}")
        scale = self.id_scale
        if isinstance(scale, Tensor) and (scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != self.num_ids)):
            raise ValueError(f"id_scale must be a float, [B] or [B, num_ids={self.num_ids}], got {tuple(scale.shape)}")
        if self.regions is not None:
            if self.num_ids == 0:
                raise ValueError("regions given but num_ids is 0")
            object.__setattr__(self, "regions", validate_regions(self.regions, self.num_ids))

    # ------------------------------------------------------------------ token layout
    @property
    def num_id_tokens(self) -> int:
        """Number of ID tokens at the end of the encoder states."""
        sources = 2 if self.mix_scale is not None else 1
        return self.num_ids * self.num_tokens * sources

    def query_grid(self, seq_len: int) -> tuple[int, int]:
        """(q_h, q_w) of the level whose self/cross-attention has ``seq_len`` queries."""
        key = ("grid", seq_len)
        if key not in self._cache:
            h, w = (int(v) for v in self.latent_hw)
            for _ in range(_MAX_LEVELS):
                if h * w == seq_len:
                    break
                if h == w == 1:
                    h = 0
                    break
                h, w = -(-h // 2), -(-w // 2)  # a stride-2 conv with padding 1 rounds up
            if h * w != seq_len:
                raise ValueError(
                    f"{seq_len} queries match no UNet level of latent_hw={tuple(self.latent_hw)} "
                    "(set IDContext.latent_hw to the latent size of this call)"
                )
            self._cache[key] = (h, w)
        return self._cache[key]

    def region_masks(self, q_h: int, q_w: int, device: torch.device | str) -> RegionMasks:
        """Masks for one query grid, built on first use and cached (never rebuilt per call)."""
        device = torch.device(device)
        key = ("masks", q_h, q_w, device)
        if key not in self._cache:
            self._cache[key] = self._build_region_masks(q_h, q_w, device)
        return self._cache[key]

    def _build_region_masks(self, q_h: int, q_w: int, device: torch.device) -> RegionMasks:
        if self.num_ids < 1:
            raise ValueError("region masks need at least one identity")
        # built on the CPU in float64 (exact cell-centre comparisons, any backend), moved once
        regions = self.regions if self.regions is not None else default_regions(self.num_ids)
        boxes = regions.detach().to(device="cpu", dtype=torch.float64)
        boxes = boxes.unsqueeze(0) if boxes.dim() == 2 else boxes  # [R, N, 4]
        if self.box_rule == "truncate":  # boxes snapped to int(edge * grid) / grid: centres then test rows exactly
            # (+1e-4: an edge given in float32 that is meant to lie on a cell boundary, e.g. 0.7 * 10, stays on it)
            boxes = torch.cat([torch.floor(boxes[..., 0::2] * q_h + 1e-4) / q_h,
                               torch.floor(boxes[..., 1::2] * q_w + 1e-4) / q_w], dim=-1)[..., [0, 2, 1, 3]]
        masks = masks_from_boxes(boxes, q_h, q_w, self.num_id_tokens, self.routing)
        return RegionMasks(*(None if t is None else _to_device(t, device) for t in masks))


def split_id_scale(scale: Tensor, batch: int, num_ids: int) -> tuple[Tensor, Tensor]:
    """Per-identity scales [B or 1, N] -> (per-sample factor [B or 1], per-identity ratio [B or 1, N]), fp32.

    The ID branch is a(q) * sum_t p(q, t) V_t over every identity's tokens t (one softmax, routed by
    the regions), so multiplying identity i's values V_t by s_i scales exactly identity i's term:
    s_i = 0 removes that person's contribution and leaves every other person's term as it was.
    The scale is split as s_i = top * (s_i / top), top = max_i s_i: ``top`` multiplies the gate as
    the [B] form does and the ratio the values. When a sample's scales are equal the ratios are
    exactly 1.0, so [s, s] gives the [B] form's numbers bit for bit, with no read-back to the host
    (the same graph-capturable ops for any values). A sample whose scales are all 0 gets ratio 0.
    (``top`` is the largest magnitude, so a negative scale keeps its sign: s_i = top * ratio_i.)
    """
    if scale.dim() != 2 or scale.shape[1] != num_ids or scale.shape[0] not in (1, batch):
        raise ValueError(f"IDContext.id_scale has shape {tuple(scale.shape)}, expected [{batch}, {num_ids}]")
    scale = scale.float()
    top = scale.abs().amax(dim=1, keepdim=True)  # [B, 1]
    ratio = torch.where(top > 0, scale / top.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(scale))
    return top.squeeze(1), ratio


def request_id_scales(id_scale: float | Sequence[float | Sequence[float]] | None, default: float, batch: int,
                      num_ids: int, error: type[Exception] = ValueError) -> Tensor:
    """The pipeline's ``id_scale`` -> [b] fp32 (one per sample) or [b, N] (per sample and person), on the host.

    ``id_scale``: None (``default``), a float, or a list with one entry per sample, each a float or
    a list of N floats (one per identity of that sample). Samples whose people share one value fold
    back to the [b] form, so per-person lists only change the numbers where they differ.
    """
    if id_scale is None or isinstance(id_scale, numbers.Real):
        return torch.full((batch,), float(default if id_scale is None else id_scale), dtype=torch.float32)
    if len(id_scale) != batch:
        raise error(f"{batch} prompts but {len(id_scale)} id_scale values")
    if not any(isinstance(v, Sequence) for v in id_scale):
        return torch.tensor([float(v) for v in id_scale], dtype=torch.float32)
    rows = []
    for j, v in enumerate(id_scale):
        if isinstance(v, Sequence) and len(v) != num_ids:
            raise error(f"id_scale[{j}] has {len(v)} values, the sample has {num_ids} identities")
        rows.append([float(x) for x in v] if isinstance(v, Sequence) else [float(v)] * num_ids)
    if num_ids == 0:
        return torch.full((batch,), float(default), dtype=torch.float32)
    per_id = torch.tensor(rows, dtype=torch.float32)  # [b, N]
    return per_id[:, 0].clone() if bool((per_id == per_id[:, :1]).all()) else per_id


def context_id_scale(scale: Tensor, reps: int, device: torch.device | str) -> float | Tensor:
    """``request_id_scales``' [b] or [b, N] -> IDContext.id_scale for a UNet batch of ``reps`` x b
    (classifier-free guidance: both halves take the request's scales). One value for all: a float,
    the branch's cheapest form (and 0.0 skips it); otherwise the tensor repeated, on ``device``."""
    first = scale.flatten()[0]
    if bool((scale == first).all()):
        return float(first)
    return scale.repeat(reps, *([1] * (scale.dim() - 1))).to(device)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> ``device`` without a stream sync: a pageable host-to-GPU copy waits for
    the GPU's queue to drain (here: the request's encoders), a pinned one is queued."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

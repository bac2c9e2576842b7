"""Semantic-Activated Attention (method.md, Components 2) as diffusers attention processors.

Every cross-attention of the UNet gets an ``SAAAttnProcessor``: the base attention over the
text tokens plus an identity branch over the ID tokens appended after them, gated per query
by how strongly that query responds to the ID tokens, and routed so that a face region only
reads its own identity. Every self-attention gets a ``LoRAAttnProcessor`` (LoRA only).

Why this differs from the research release (method.md, "Where the release is wrong or slow"):

* text and self attention are one ``scaled_dot_product_attention`` call each; the release
  builds the full self-attention matrix and computes the text attention twice;
* the ID branch never materialises its score tensor outside SDPA: the gate only needs the
  sum of the scores over heads and ID tokens, which is exactly
  ``Q . (sum_t K_id[t]) / sqrt(d)`` (a dot product with one summed key), and the routing is
  a boolean SDPA mask;
* region masks are built once per (context, query grid, device) with broadcasting, never
  per call and never with a Python loop over boxes;
* LoRA can be folded into the base weights for inference (``merge_lora``).

The per-call state (number of identities, regions, scale, boost) travels in an
``IDContext`` through ``unet(..., cross_attention_kwargs={"id_context": ctx})``; processors
keep no per-call state of their own, so one UNet serves concurrent requests with different
layouts.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # diffusers is imported lazily: model/ imports must stay cheap for light users
    from diffusers.models.attention_processor import Attention

# Fields of IDContext that change which tokens exist or where they go: changing one after
# construction re-validates the context and drops its cached masks.
_LAYOUT_FIELDS = frozenset({"num_ids", "num_tokens", "regions", "latent_hw", "mix_scale"})
# Guards the min-max normalisation against a constant activation map (all queries equal).
_NORM_EPS = 1e-12
_MAX_LEVELS = 16


# --------------------------------------------------------------------------- regions


def default_regions(num_ids: int) -> Tensor:
    """[N, 4] equal vertical strips (y0, x0, y1, x1): the release's layout when the user gives none."""
    if num_ids < 1:
        raise ValueError(f"default_regions needs at least one identity, got num_ids={num_ids}")
    edges = torch.linspace(0.0, 1.0, num_ids + 1, dtype=torch.float32)  # [N + 1]
    zeros, ones = torch.zeros(num_ids), torch.ones(num_ids)
    return torch.stack([zeros, edges[:-1], ones, edges[1:]], dim=1)  # [N, 4]


def validate_regions(regions: Tensor, num_ids: int) -> Tensor:
    """Check shape and box sanity; returns the regions as a float tensor ([N, 4] or [B, N, 4]).

    Errors name the identity (and the sample for per-sample regions) so that an API caller
    knows which box to fix.
    """
    regions = torch.as_tensor(regions)
    if not regions.is_floating_point():
        regions = regions.float()
    if regions.dim() not in (2, 3) or regions.shape[-1] != 4 or regions.shape[-2] != num_ids:
        raise ValueError(
            f"regions must have shape [N, 4] or [B, N, 4] with N = num_ids = {num_ids}, got {tuple(regions.shape)}"
        )
    boxes = regions.detach().to("cpu", torch.float64)
    boxes = boxes.unsqueeze(0) if boxes.dim() == 2 else boxes  # [B', N, 4]
    finite = torch.isfinite(boxes).all(-1)  # [B', N]
    in_range = ((boxes >= 0.0) & (boxes <= 1.0)).all(-1)
    ordered = (boxes[..., 0] < boxes[..., 2]) & (boxes[..., 1] < boxes[..., 3])
    bad = ~(finite & in_range & ordered)
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        where = f"identity {i}" + (f" of sample {b}" if regions.dim() == 3 else "")
        y0, x0, y1, x1 = boxes[b, i].tolist()
        raise ValueError(
            f"region of {where} is invalid: (y0, x0, y1, x1) = ({y0:g}, {x0:g}, {y1:g}, {x1:g}); "
            "values must lie in [0, 1] with y0 < y1 and x0 < x1"
        )
    return regions


class RegionMasks(NamedTuple):
    """Masks of one query grid, cached on the IDContext. R = 1 (shared layout) or the batch size."""

    inside: Tensor  # [R, HW, N] bool: query cell centre lies in identity n's box
    inside_any: Tensor  # [R, HW] bool: union of all boxes (where the early-step boost adds)
    allowed: Tensor | None  # [R, 1, HW, n_id_tokens] bool for SDPA (True = may attend); None = all allowed


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
    id_scale: float | Tensor = 1.0  # float or [B] per sample (CFG halves, batched requests); 0.0 skips the branch
    gating: bool = True
    tau: float = 0.3
    boost: float = 4.0
    boost_active: bool = False  # set per denoising step by the sampler (step < boost_steps)
    mix_scale: float | None = None
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
        if self.mix_scale is not None:
            if self.num_ids != 1:
                raise ValueError(
                    f"mix_scale needs exactly one identity (two token sources), got num_ids={self.num_ids}"
                )
            if not 0.0 <= float(self.mix_scale) <= 1.0:
                raise ValueError(f"mix_scale must lie in [0, 1], got {self.mix_scale}")
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
        ys = (torch.arange(q_h, dtype=torch.float64) + 0.5) / q_h  # [q_h] cell centres
        xs = (torch.arange(q_w, dtype=torch.float64) + 0.5) / q_w  # [q_w]
        y0, x0, y1, x1 = (boxes[..., i, None, None] for i in range(4))  # each [R, N, 1, 1]
        in_y = (ys[:, None] >= y0) & (ys[:, None] < y1)  # [R, N, q_h, 1]
        in_x = (xs[None, :] >= x0) & (xs[None, :] < x1)  # [R, N, 1, q_w]
        inside = (in_y & in_x).flatten(2).transpose(1, 2).contiguous()  # [R, HW, N]
        inside_any = inside.any(-1)  # [R, HW]
        allowed = None
        if self.num_ids > 1:
            # inside some boxes: only the containing identities; outside every box: all of them
            per_id = inside | ~inside_any[..., None]  # [R, HW, N]
            per_token = self.num_id_tokens // self.num_ids
            allowed = per_id.repeat_interleave(per_token, dim=-1).unsqueeze(1)  # [R, 1, HW, N*K]
        return RegionMasks(inside=_to_device(inside, device), inside_any=_to_device(inside_any, device),
                           allowed=None if allowed is None else _to_device(allowed, device))


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> ``device`` without a stream sync: a pageable host-to-GPU copy waits for
    the GPU's queue to drain (here: the request's encoders), a pinned one is queued."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """Low-rank adapter ``x -> scale * up(down(x))`` added to a frozen base projection.

    ``up`` starts at zero so that installing LoRA leaves the model's output unchanged bit for
    bit; ``scale = alpha / rank`` decouples the learning rate from the rank. The adapter runs
    in its own dtype (e.g. fp32 LoRA on an fp16 UNet) and returns the caller's dtype.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        dtype = self.down.weight.dtype
        return (self.up(self.down(x.to(dtype))) * self.scale).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """[out, in] fp32: the dense update this adapter adds to its base weight."""
        return (self.up.weight.float() @ self.down.weight.float()) * self.scale


_LORA_TARGETS = (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out"))


class _LoRAHost(nn.Module):
    """Holds the four LoRA adapters of one attention (q, k, v, out) and the shared SDPA plumbing."""

    def __init__(self, hidden_size: int, kv_dim: int, query_dim: int, lora_rank: int, lora_alpha: float | None):
        super().__init__()
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_merged = False
        make = (lambda i, o: LoRALinear(i, o, lora_rank, lora_alpha)) if lora_rank > 0 else (lambda i, o: None)
        self.to_q_lora: LoRALinear | None = make(query_dim, hidden_size)
        self.to_k_lora: LoRALinear | None = make(kv_dim, hidden_size)
        self.to_v_lora: LoRALinear | None = make(kv_dim, hidden_size)
        self.to_out_lora: LoRALinear | None = make(hidden_size, query_dim)

    @property
    def has_lora(self) -> bool:
        return self.to_q_lora is not None

    @staticmethod
    def _proj(base: nn.Module, lora: LoRALinear | None, x: Tensor) -> Tensor:
        return base(x) if lora is None else base(x) + lora(x)

    @torch.no_grad()
    def merge_into(self, attn: Attention) -> None:
        """Fold the adapters into ``attn``'s base weights and drop them (idempotent)."""
        if not self.has_lora:
            return
        for lora_name, base_name in _LORA_TARGETS:
            base = getattr(attn, base_name)
            base = base[0] if base_name == "to_out" else base
            lora = getattr(self, lora_name)
            base.weight.add_(lora.delta_weight().to(device=base.weight.device, dtype=base.weight.dtype))
            setattr(self, lora_name, None)
        self.lora_merged = True

    # -------------------------------------------------------------- shared plumbing
    @staticmethod
    def _enter(attn: Attention, hidden_states: Tensor, temb: Tensor | None):
        """AttnProcessor2_0's prologue: spatial norm and 4-D -> [B, HW, C]; returns (x, residual, 4-D shape or None)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            shape4 = hidden_states.shape
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        return hidden_states, residual, shape4

    def _leave(self, attn: Attention, hidden_states: Tensor, residual: Tensor, shape4) -> Tensor:
        """Output projection (+ LoRA), dropout, 4-D restore, residual and rescale, as AttnProcessor2_0."""
        hidden_states = self._proj(attn.to_out[0], self.to_out_lora, hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape4 is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(
        self, attn: Attention, hidden_states: Tensor, context: Tensor | None, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One SDPA of ``hidden_states`` over ``context`` (None: over itself), base + LoRA projections.

        Self-attention keys come from the group-normed input, as in AttnProcessor2_0.

        Returns (attention output [B, L, inner], query in head layout [B, heads, L, d]) so the
        ID branch can reuse the query instead of projecting it again.
        """
        batch = hidden_states.shape[0]
        kv_len = (hidden_states if context is None else context).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            # [B * heads, 1 or L, S] -> [B, heads, 1 or L, S]; only the context's own columns
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            if attention_mask.shape[-1] != kv_len:
                attention_mask = attention_mask[..., :kv_len]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self._proj(attn.to_q, self.to_q_lora, hidden_states)
        if context is None:
            context = hidden_states
        key = self._proj(attn.to_k, self.to_k_lora, context)
        value = self._proj(attn.to_v, self.to_v_lora, context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, S, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, L, inner]
        return out, query


class LoRAAttnProcessor(_LoRAHost):
    """Self-attention: diffusers' AttnProcessor2_0 (one SDPA call) plus LoRA on q, k, v, out."""

    def __init__(
        self,
        hidden_size: int,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        cross_attention_dim: int | None = None,
        *,
        query_dim: int | None = None,
    ):
        super().__init__(hidden_size, cross_attention_dim or query_dim or hidden_size, query_dim or hidden_size,
                         lora_rank, lora_alpha)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        id_context: IDContext | None = None,  # accepted (and ignored) so diffusers does not warn about it
    ) -> Tensor:
        x, residual, shape4 = self._enter(attn, hidden_states, temb)
        if encoder_hidden_states is None:
            context = None
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        out, _ = self._attend(attn, x, context, attention_mask)
        return self._leave(attn, out, residual, shape4)


class SAAAttnProcessor(_LoRAHost):
    """Cross-attention: text branch (base + LoRA) + gated, region-routed ID branch.

    ``to_k_id`` / ``to_v_id`` start as copies of the layer's base ``to_k`` / ``to_v`` so that
    at step 0 ID tokens are read like text tokens; they are fully trainable (no LoRA).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        base_to_k: nn.Linear | None = None,
        base_to_v: nn.Linear | None = None,
        *,
        query_dim: int | None = None,
    ):
        super().__init__(hidden_size, cross_attention_dim, query_dim or hidden_size, lora_rank, lora_alpha)
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        with torch.no_grad():
            for mine, base in ((self.to_k_id, base_to_k), (self.to_v_id, base_to_v)):
                if base is None:
                    continue
                if tuple(base.weight.shape) != tuple(mine.weight.shape):
                    raise ValueError(
                        f"base projection has shape {tuple(base.weight.shape)}, expected {tuple(mine.weight.shape)}"
                    )
                mine.weight.copy_(base.weight)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        id_context: IDContext | None = None,
    ) -> Tensor:
        x, residual, shape4 = self._enter(attn, hidden_states, temb)
        if encoder_hidden_states is None:  # used as self-attention: plain LoRA attention
            out, _ = self._attend(attn, x, None, attention_mask)
            return self._leave(attn, out, residual, shape4)

        n_id = id_context.num_id_tokens if id_context is not None else 0
        text_len = encoder_hidden_states.shape[1] - n_id
        if text_len < 1:
            raise ValueError(
                f"encoder states have {encoder_hidden_states.shape[1]} tokens but the IDContext expects "
                f"{n_id} ID tokens after at least one text token"
            )
        text = encoder_hidden_states if n_id == 0 else encoder_hidden_states[:, :text_len].contiguous()
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        out, query = self._attend(attn, x, text, attention_mask)  # out [B, HW, inner], query [B, heads, HW, d]

        if n_id > 0 and not _is_zero_scale(id_context.id_scale):
            grid = shape4[2:] if shape4 is not None else None
            ids = encoder_hidden_states[:, text_len:]  # [B, n_id, cross_dim]
            out = self._add_id_branch(out, attn, query, ids, id_context, grid)
        return self._leave(attn, out, residual, shape4)

    def _add_id_branch(
        self, out: Tensor, attn: Attention, query: Tensor, ids: Tensor, ctx: IDContext, grid: tuple[int, int] | None
    ) -> Tensor:
        """out + id_scale * a(q) * softmax(S_masked) V_id, all [B, HW, inner].

        Written for few kernel launches: at inference the UNet step is launch-bound, and this
        branch runs in every cross-attention of every step.
        """
        batch, heads, seq_len, head_dim = query.shape
        w_dtype = self.to_k_id.weight.dtype
        key = self.to_k_id(ids.to(w_dtype)).to(query.dtype)  # [B, n_id, inner]
        value = self.to_v_id(ids.to(w_dtype)).to(query.dtype)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, heads, n_id, d]
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        masks = None
        if ctx.num_ids > 1 or ctx.boost_active:
            q_h, q_w = grid if grid is not None else ctx.query_grid(seq_len)
            masks = ctx.region_masks(q_h, q_w, query.device)
            if masks.inside_any.shape[0] not in (1, batch):
                raise ValueError(
                    f"IDContext.regions are given for {masks.inside_any.shape[0]} samples, batch is {batch}"
                )

        gate = self._gate(query, key, ctx, masks)  # [B, HW] fp32
        scale = ctx.id_scale
        if isinstance(scale, Tensor):
            scale = scale.to(device=gate.device, dtype=gate.dtype).reshape(-1)
            if scale.numel() not in (1, batch):
                raise ValueError(f"IDContext.id_scale has {scale.numel()} values, batch is {batch}")
            gate = gate * scale[:, None]
        elif float(scale) != 1.0:
            gate = gate * float(scale)

        if ctx.mix_scale is not None:
            m, k = float(ctx.mix_scale), ctx.num_tokens
            # scaling a token's key scales its scores: S[..., :K] * m and S[..., K:] * (1 - m)
            key = key * key.new_tensor([m] * k + [1.0 - m] * k).view(1, 1, -1, 1)
        allowed = masks.allowed if masks is not None else None
        id_out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=0.0, is_causal=False)
        # [B, heads, HW, d] read as [B, HW, heads, d] (a view): no copy before the fused add
        id_out = id_out.transpose(1, 2)
        out = out.view(batch, seq_len, heads, head_dim)
        gate = gate.to(out.dtype).view(batch, seq_len, 1, 1)
        return torch.addcmul(out, gate, id_out).view(batch, seq_len, heads * head_dim)

    @staticmethod
    def _gate(query: Tensor, key: Tensor, ctx: IDContext, masks: RegionMasks | None) -> Tensor:
        """a(q) of method.md: [B, HW] fp32, from raw scores (before routing and mixing).

        sum_{h,t} S[h, q, t] = Q[q] . sum_t K[t] / sqrt(d) over the full inner width. The
        min-max normalisation ignores positive factors, so the mean over tokens (and no
        1/sqrt(d)) gives the same a(q) without overflow risk in fp16: one small matmul, no
        [B, heads, HW, N*K] score tensor.
        """
        batch, heads, seq_len, head_dim = query.shape
        if ctx.gating:
            q_flat = query.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)  # a view for the usual layout
            k_mean = key.mean(dim=2).reshape(batch, heads * head_dim, 1)  # [B, inner, 1]
            act = torch.bmm(q_flat, k_mean).view(batch, seq_len).float()  # [B, HW]
            lo = act.amin(dim=1, keepdim=True)  # not aminmax: it has no derivative, and training needs one
            hi = act.amax(dim=1, keepdim=True)
            act = (act - lo) / (hi - lo).clamp_min(_NORM_EPS)
            act = act.masked_fill(act < ctx.tau, 0.0)
        else:
            act = query.new_ones((batch, seq_len), dtype=torch.float32)
        if ctx.boost_active:
            b = float(ctx.boost)
            act = torch.where(masks.inside_any, act + b, act / (b + 1.0))
        return act


def _is_zero_scale(scale: float | Tensor) -> bool:
    """A Python 0 skips the branch; a tensor never does (checking it would sync the device)."""
    return isinstance(scale, numbers.Real) and float(scale) == 0.0


# --------------------------------------------------------------------------- UNet-level API


def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def _installed(unet: nn.Module) -> Iterator[tuple[str, Attention, _LoRAHost]]:
    for name, attn in _attention_modules(unet):
        if isinstance(attn.processor, _LoRAHost):
            yield name, attn, attn.processor


def install_saa(unet: nn.Module, lora_rank: int, lora_alpha: float | None = None) -> nn.ModuleDict:
    """Replace every attention processor of a UNet2DConditionModel with SAA / LoRA processors.

    The new modules are created on the device and dtype of each layer's base weights. The
    returned ModuleDict holds exactly the new (trainable) parts; its keys are the processor
    paths with "." written as "__" (ModuleDict keys may not contain dots), so its state_dict
    loads with ``load_saa_state_dict`` too. Freezing the base UNet is the caller's job
    (``unet.requires_grad_(False)`` *before* this call, or the new parts get frozen too).
    """
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    procs: dict[str, nn.Module] = {}
    found = False
    for name, attn in _attention_modules(unet):
        found = True
        if isinstance(attn.processor, _LoRAHost):
            raise ValueError(f"SAA is already installed in this UNet ({name})")
        if attn.added_kv_proj_dim is not None or attn.to_k is None or getattr(attn, "fused_projections", False):
            raise ValueError(
                f"attention {name} has a layout SAA does not support (added/fused/missing k-v projections)"
            )
        weight = attn.to_q.weight
        hidden = attn.to_q.out_features
        if attn.to_k.out_features != hidden:
            raise ValueError(f"attention {name}: key width {attn.to_k.out_features} != query width {hidden}")
        if attn.is_cross_attention:
            proc: _LoRAHost = SAAAttnProcessor(
                hidden, attn.to_k.in_features, lora_rank, lora_alpha, base_to_k=attn.to_k, base_to_v=attn.to_v,
                query_dim=attn.to_q.in_features,
            )
        else:
            proc = LoRAAttnProcessor(hidden, lora_rank, lora_alpha, query_dim=attn.to_q.in_features)
        proc.to(device=weight.device, dtype=weight.dtype)
        attn.set_processor(proc)
        procs[f"{name}.processor".replace(".", "__")] = proc
    if not found:
        raise ValueError("no diffusers Attention modules found: is this a UNet2DConditionModel?")
    return nn.ModuleDict(procs)


def saa_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """Trainable SAA + LoRA tensors only, keyed as in ``unet.state_dict()`` (for safetensors export)."""
    installed = list(_installed(unet))
    if not installed:
        raise ValueError("SAA is not installed in this UNet (call install_saa first)")
    return {
        f"{name}.processor.{key}": tensor for name, _, proc in installed for key, tensor in proc.state_dict().items()
    }


def load_saa_state_dict(unet: nn.Module, state: dict[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Load tensors from ``saa_state_dict`` (or the install_saa ModuleDict's state_dict).

    Every problem is a ValueError naming the key: a shape mismatch always, a missing or
    unexpected key when ``strict``. Nothing is written unless every check passes, so a bad
    file never leaves the model half-loaded. Returns (missing, unexpected) key lists.
    """
    installed = list(_installed(unet))
    if not installed:
        raise ValueError("SAA is not installed in this UNet (call install_saa first)")
    targets = {
        f"{name}.processor.{key}": tensor
        for name, _, proc in installed
        for key, tensor in proc.state_dict(keep_vars=True).items()
    }
    given = {key.replace("__", "."): value for key, value in state.items()}
    missing = sorted(set(targets) - set(given))
    unexpected = sorted(set(given) - set(targets))
    if strict and missing:
        raise ValueError(f"SAA state dict is missing {len(missing)} key(s), first: {missing[0]}")
    if strict and unexpected:
        raise ValueError(f"SAA state dict has {len(unexpected)} unexpected key(s), first: {unexpected[0]}")
    for key in sorted(set(targets) & set(given)):
        want, got = tuple(targets[key].shape), tuple(given[key].shape)
        if want != got:
            raise ValueError(f"SAA state dict key {key}: shape {got} does not match the model's {want}")
    with torch.no_grad():
        for key in set(targets) & set(given):
            targets[key].copy_(given[key])
    return missing, unexpected


def merge_lora(unet: nn.Module) -> None:
    """Fold every LoRA delta into the base to_q/to_k/to_v/to_out[0] weights (idempotent).

    The adapters are removed afterwards, so inference pays nothing for them and
    ``saa_state_dict`` then holds only the ID projections.
    """
    for _, attn, proc in _installed(unet):
        proc.merge_into(attn)

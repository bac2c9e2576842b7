"""The fast inference path: identity injection at (almost) no cost over the base model.

Why each piece exists (numbers in docs/benchmarks.md, measured by ``benchmarks/``):

* **LoRA merged at load** (``merge_lora``): no extra matmuls per attention.
* **Per-request ID work hoisted out of the step.** The ID tokens are the same for every
  denoising step of a request, so the ID keys/values of all 16 cross-attentions, the gate's
  key direction, the routing mask (as an additive SDPA bias) and the boost terms are computed
  once per request into fixed buffers, and ``id_scale`` is folded into the ID values. A step
  runs the text attention exactly as the base model does plus four kernels per
  cross-attention: gate product, ID attention, and the gate (min-max, threshold, boost) fused
  with the gated add by ``torch.compile`` (eager fallback).
* **CUDA graphs per static-shape bucket.** At 512 px the SD1.5 step is launch-bound in eager
  mode (~3x its GPU time), so each (batch, latent size, identity count) bucket is captured
  once, warmed at load time, and replayed. The boost of the first steps changes the math, so a
  bucket holds two graphs (boost on / off). Everything that differs between requests of one
  bucket (latents, timestep, text states, ID tokens -> keys/values, masks, scale) lives in the
  bucket's static buffers and is refilled before a replay (the per-request key/value work is
  itself one captured graph), so a replay with another layout never reads stale masks.
* **Channels-last UNet weights** (CUDA): 14% faster base step at 512 px; the VAE decoder was
  measured slower channels-last and stays as it is.
* **Identity encoders as graphs** (``GraphedForward``): CLIP ViT-H/14, the face encoder and
  the text encoder run once per request but are launch-bound at request batch sizes.
* ``mode="compile"`` (torch.compile the UNet, then capture) is available but not the default:
  measured ~11% faster base step at 512 px, at ~1 min of compilation per bucket at load time
  and recompile-limit trouble with 16 distinct processors (docs/benchmarks.md).

On a CPU (tests, tiny profile) the same bucket machinery runs eagerly (``mode="eager"``):
nothing is captured, but the data flow through static buffers is the one the graphs use, so
the CPU tests cover the staleness logic.

Usage::

    fast = enable_fast_path(pipe)            # auto: CUDA graphs on CUDA, eager buckets on CPU
    out = pipe("a photo of a person", [IdentityInput(...)])
    fast.disable()                           # back to the plain path
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.dynamicid import clip_image_features
from model.saa import IDContext, RegionMasks, SAAAttnProcessor, merge_lora

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

log = logging.getLogger(__name__)

Mode = Literal["auto", "cuda_graphs", "compile", "eager", "off"]
GateImpl = Literal["auto", "eager", "compiled"]
# Same guard as model/saa.py's min-max normalisation (a constant activation map).
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------- per-request state


@dataclass
class LayerIDState:
    """ID-branch tensors of one cross-attention for one request (fixed buffers in graph mode)."""

    key: Tensor  # [B, heads, n_id, d]  ID keys as the SDPA sees them (mix_scale applied)
    value: Tensor  # [B, heads, n_id, d]  ID values with id_scale folded in per sample
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


# --------------------------------------------------------------------------- gate


@functools.lru_cache(maxsize=64)
def _tau_below(tau: float) -> float:
    """Largest fp32 below fp32(tau): ``threshold(a, t, 0)`` zeroes a <= t, i.e. exactly a < tau."""
    t = torch.tensor(tau, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-math.inf)))


def gate_add_eager(out: Tensor, act: Tensor, id_out: Tensor, tau_below: float, gating: bool,
                   boost: tuple[Tensor, Tensor] | None) -> Tensor:
    """out += a(q) * id_out in place; a(q) of method.md from the raw activation ``act``.

    out [B, L, heads, d] (contiguous), act [B, L, 1] (q dtype), id_out [B, L, heads, d] (any
    strides), boost = (add [B, L, 1], mul [B, L, 1]) fp32 or None. Written for few kernels: the
    statistics come from one aminmax, the threshold is one ``threshold`` call.
    """
    gate: Tensor | None = None
    if gating:
        lo, hi = torch.aminmax(act, dim=1, keepdim=True)  # [B, 1, 1]
        lo = lo.float()
        span = torch.sub(hi, lo).clamp_min_(_NORM_EPS)
        gate = F.threshold(torch.sub(act, lo).div_(span), tau_below, 0.0)  # [B, L, 1] fp32
    if boost is not None:
        add, mul = boost
        gate = torch.addcmul(add, gate, mul) if gate is not None else add + mul
    if gate is None:
        return out.add_(id_out)
    return out.addcmul_(gate.unsqueeze(-1), id_out)


def _gate_add_functional(out: Tensor, act: Tensor, id_out: Tensor, boost_add: Tensor | None,
                         boost_mul: Tensor | None, tau_below: float, gating: bool) -> Tensor:
    """The same math without in-place ops (what torch.compile fuses into two kernels)."""
    gate = None
    if gating:
        a = act.float()
        lo = a.amin(dim=1, keepdim=True)
        hi = a.amax(dim=1, keepdim=True)
        a = (a - lo) / (hi - lo).clamp_min(_NORM_EPS)
        gate = torch.where(a <= tau_below, torch.zeros_like(a), a)
    if boost_add is not None:
        gate = boost_add + gate * boost_mul if gate is not None else boost_add + boost_mul
    if gate is None:
        return out + id_out
    return (out.float() + gate.unsqueeze(-1) * id_out.float()).to(out.dtype)


_COMPILED: dict[str, Callable] = {}


def compiled_gate_add() -> Callable:
    """torch.compile'd gate + add, shared by all layers (dynamic shapes: one compile per variant)."""
    if "gate_add" not in _COMPILED:
        _COMPILED["gate_add"] = torch.compile(_gate_add_functional, dynamic=True, fullgraph=True)
    return _COMPILED["gate_add"]


# --------------------------------------------------------------------------- processor


def _plain_layout(attn: Attention) -> bool:
    """The fast processor covers SD1.5's cross-attention layout; anything else keeps the plain one."""
    return (
        attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
        and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
        and float(attn.rescale_output_factor) == 1.0 and attn.added_kv_proj_dim is None
    )


class FastSAAProcessor(SAAAttnProcessor):
    """SAA for inference with the request's ID work precomputed (see ``StaticIDContext``).

    Shares ``to_k_id`` / ``to_v_id`` with the processor it replaces (same state-dict keys).
    With any context other than a precomputed ``StaticIDContext`` it is the plain
    ``SAAAttnProcessor`` (training, CPU tests, callers that build their own IDContext).
    """

    def __init__(self, plain: SAAAttnProcessor, attn: Attention, name: str, gate: GateImpl = "eager"):
        if plain.has_lora:
            raise ValueError(f"{name}: merge LoRA (model.saa.merge_lora) before installing the fast processor")
        with torch.device("meta"):  # the ID projections are shared below: build no throwaway weights
            super().__init__(plain.hidden_size, plain.cross_attention_dim, 0, query_dim=attn.to_q.in_features)
        self.to_k_id = plain.to_k_id
        self.to_v_id = plain.to_v_id
        self.lora_merged = plain.lora_merged
        self.name = name
        self.fast_ok = _plain_layout(attn)
        self.gate_impl = gate

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        id_context: IDContext | None = None,
    ) -> Tensor:
        ctx = id_context
        if not (isinstance(ctx, StaticIDContext) and ctx.precomputed):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, id_context)
        if not self.fast_ok or attention_mask is not None or hidden_states.ndim != 3 or encoder_hidden_states is None:
            raise RuntimeError(f"{self.name}: precomputed ID context used on a layout the fast processor does not cover")
        batch, seq_len, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)  # [B, L, inner]
        key = attn.to_k(encoder_hidden_states)  # [B, T, inner]: text tokens only
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // heads
        q4 = query.view(batch, seq_len, heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        k4 = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v4 = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q4, k4, v4)  # [B, heads, L, d]
        out = out.transpose(1, 2).reshape(batch, seq_len, heads, head_dim)  # a view for the fused kernels

        layer = ctx.layers[self.name]
        grid = ctx.grids[ctx.query_grid(seq_len)] if (ctx.num_ids > 1 or ctx.boost_active) else None
        bias = grid.routing_bias(layer.key.shape[2]) if grid is not None else None
        id_out = F.scaled_dot_product_attention(q4, layer.key, layer.value, attn_mask=bias)  # [B, heads, L, d]
        id_out = id_out.transpose(1, 2)  # [B, L, heads, d]
        act = torch.bmm(query, layer.key_mean)  # [B, L, 1]: sum of raw ID scores up to a positive factor
        boost = (grid.boost_add, grid.boost_mul) if ctx.boost_active else None
        tau = _tau_below(ctx.tau)
        if self.gate_impl == "compiled":
            out = compiled_gate_add()(out, act, id_out, boost[0] if boost else None, boost[1] if boost else None,
                                      tau, bool(ctx.gating))
        else:
            out = gate_add_eager(out, act, id_out, tau, bool(ctx.gating), boost)
        out = attn.to_out[0](out.reshape(batch, seq_len, heads * head_dim))
        return attn.to_out[1](out)


def _attention_modules(unet: nn.Module):
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def install_fast_processors(unet: nn.Module, gate: GateImpl = "eager") -> dict[str, object]:
    """Swap every plain SAAAttnProcessor for a FastSAAProcessor; returns the replaced ones by name."""
    replaced: dict[str, object] = {}
    for name, attn in _attention_modules(unet):
        proc = attn.processor
        if isinstance(proc, FastSAAProcessor):
            proc.gate_impl = gate
        elif isinstance(proc, SAAAttnProcessor):
            replaced[name] = proc
            attn.set_processor(FastSAAProcessor(proc, attn, name, gate).to(proc.to_k_id.weight.device))
    return replaced


def fast_processors(unet: nn.Module) -> list[tuple[str, Attention, FastSAAProcessor]]:
    return [(n, a, a.processor) for n, a in _attention_modules(unet) if isinstance(a.processor, FastSAAProcessor)]


# --------------------------------------------------------------------------- the step runner


@dataclass
class _Slot:
    """One bucket: static inputs, the static IDContext and its captured graphs."""

    key: tuple
    latents: Tensor  # [B, C, h, w]
    t: Tensor  # [] or [B]
    states: Tensor  # [B, T (+ n_id), D]
    ctx: StaticIDContext | None
    scale: Tensor | None  # [B] fp32
    ids: Tensor | None = None  # [B, n_id, D] the request's ID tokens (precomputed mode)
    mix: Tensor | None = None  # [1, 1, n_id, 1] per-token key factor of mix_scale, or None
    graphs: dict[bool, tuple[torch.cuda.CUDAGraph, Tensor]] = field(default_factory=dict)
    prepare_graph: torch.cuda.CUDAGraph | None = None  # the per-request ID keys/values, replayed
    request: tuple | None = None  # what the per-request buffers were filled from


class BucketStepRunner:
    """``pipe.step_runner``: UNet steps through static-shape buckets, replayed as CUDA graphs.

    A bucket is (latent shape, dtype, device, timestep shape, encoder-state shape, identity
    settings); its graphs are captured on first use (or by ``warm``) and the buffers of all
    buckets share one graph memory pool. Not thread-safe (neither is the pipeline).
    """

    def __init__(self, unet: nn.Module, *, capture: bool, precomputed: bool, max_buckets: int = 16,
                 warmup_runs: int = 2, compile_unet: bool = False):
        self.unet = unet
        self.capture = capture
        self.precomputed = precomputed
        self.max_buckets = max_buckets
        self.warmup_runs = warmup_runs
        self.levels = len(unet.config.block_out_channels)
        self._forward_fn = torch.compile(unet) if compile_unet else unet
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self._pool = None
        self.captures = 0
        self.capture_seconds = 0.0

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def __call__(self, latents: Tensor, t: Tensor | int | float, states: Tensor, ctx: IDContext | None) -> Tensor:
        if ctx is not None and ctx.num_ids == 0:
            ctx = None
        t = t if isinstance(t, Tensor) else torch.tensor(t)
        slot = self._slot(latents, t, states, ctx)
        slot.latents.copy_(latents)
        if t.device != latents.device and t.numel() == 1:
            slot.t.fill_(t.item())  # a scheduler stepping on the host: a kernel argument, no transfer or sync
        else:
            slot.t.copy_(t)
        self._load_request(slot, states, ctx)
        boost = bool(ctx is not None and ctx.boost_active)
        if slot.ctx is not None:
            slot.ctx.boost_active = boost
        if not self.capture:
            return self._forward(slot)
        graph = slot.graphs.get(boost)
        if graph is None:
            graph = slot.graphs[boost] = self._capture(slot)
        graph[0].replay()
        return graph[1].clone()

    @torch.no_grad()
    def warm(self, batch: int, latent_hw: tuple[int, int], num_ids: int, *, channels: int, text_len: int,
             cross_dim: int, dtype: torch.dtype, device: torch.device, num_tokens: int = 4, gating: bool = True,
             tau: float = 0.3, boost: float = 4.0) -> None:
        """Capture (or, eagerly, build) one bucket's graphs with made-up inputs of its shapes."""
        g = torch.Generator(device="cpu").manual_seed(0)
        latents = torch.randn(batch, channels, *latent_hw, generator=g).to(device, dtype)
        states = torch.randn(batch, text_len + num_ids * num_tokens, cross_dim, generator=g).to(device, dtype)
        t = torch.tensor(500, device=device)
        ctx = None
        if num_ids:
            ctx = IDContext(num_ids=num_ids, num_tokens=num_tokens, latent_hw=latent_hw, gating=gating, tau=tau,
                            boost=boost)
        for boost_active in ((False, True) if ctx is not None else (False,)):
            if ctx is not None:
                ctx.boost_active = boost_active
            self(latents, t, states, ctx)

    def clear(self) -> None:
        self._slots.clear()

    def static_bytes(self) -> int:
        """Bytes held by the buckets' static buffers (inputs, ID keys/values, masks), graphs excluded."""
        seen: dict[int, int] = {}

        def add(t: Tensor | None) -> None:
            if t is not None:
                seen[t.data_ptr()] = t.numel() * t.element_size()

        for slot in self._slots.values():
            for t in (slot.latents, slot.t, slot.states, slot.scale, slot.ids, slot.mix):
                add(t)
            if slot.ctx is not None:
                for st in slot.ctx.layers.values():
                    add(st.key), add(st.value), add(st.key_mean)
                for g in slot.ctx.grids.values():
                    for t in (*g.masks, g.boost_add, g.boost_mul, g.bias):
                        add(t)
        return sum(seen.values())

    @property
    def num_buckets(self) -> int:
        return len(self._slots)

    # ------------------------------------------------------------------ buckets
    def _key(self, latents: Tensor, t: Tensor, states: Tensor, ctx: IDContext | None) -> tuple:
        key: tuple = (tuple(latents.shape), latents.dtype, latents.device, tuple(t.shape), t.dtype,
                      tuple(states.shape), states.dtype)
        if ctx is None:
            return key + (0,)
        mix = None if ctx.mix_scale is None else float(ctx.mix_scale)
        return key + (ctx.num_ids, ctx.num_tokens, mix, bool(ctx.gating), float(ctx.tau), float(ctx.boost))

    def _slot(self, latents: Tensor, t: Tensor, states: Tensor, ctx: IDContext | None) -> _Slot:
        key = self._key(latents, t, states, ctx)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        if len(self._slots) >= self.max_buckets:
            old_key, _ = self._slots.popitem(last=False)
            log.info("fast path: dropping least recently used bucket %s", old_key[:1])
        slot = self._new_slot(key, latents, t, states, ctx)
        self._slots[key] = slot
        return slot

    def _new_slot(self, key: tuple, latents: Tensor, t: Tensor, states: Tensor, ctx: IDContext | None) -> _Slot:
        batch, device = latents.shape[0], latents.device
        n_id = ctx.num_id_tokens if ctx is not None else 0
        text_len = states.shape[1] - n_id
        if text_len < 1:
            raise ValueError(f"encoder states have {states.shape[1]} tokens, the IDContext expects {n_id} ID tokens")
        keep = text_len if (ctx is not None and self.precomputed) else states.shape[1]
        slot_states = torch.zeros(batch, keep, states.shape[2], device=device, dtype=states.dtype)
        t_buf = torch.zeros(t.shape, dtype=t.dtype, device=device)
        if ctx is None:
            return _Slot(key, torch.zeros_like(latents), t_buf, slot_states, None, None)
        scale = torch.ones(batch, device=device, dtype=torch.float32)
        sctx = StaticIDContext(
            num_ids=ctx.num_ids, num_tokens=ctx.num_tokens, latent_hw=tuple(latents.shape[-2:]), id_scale=scale,
            gating=ctx.gating, tau=ctx.tau, boost=ctx.boost, mix_scale=ctx.mix_scale, precomputed=self.precomputed,
        )
        for q_h, q_w in level_grids(tuple(latents.shape[-2:]), self.levels):
            hw = q_h * q_w
            allowed = (torch.ones(batch, 1, hw, n_id, device=device, dtype=torch.bool) if ctx.num_ids > 1 else None)
            masks = RegionMasks(inside=torch.zeros(batch, hw, ctx.num_ids, device=device, dtype=torch.bool),
                                inside_any=torch.zeros(batch, hw, device=device, dtype=torch.bool), allowed=allowed)
            bias = None
            if ctx.num_ids > 1 and self.precomputed:
                bias = torch.zeros(batch, 1, hw, -(-n_id // 16) * 16, device=device, dtype=states.dtype)
            sctx.grids[(q_h, q_w)] = GridIDState(masks, torch.zeros(batch, hw, 1, device=device),
                                                 torch.ones(batch, hw, 1, device=device), bias)
        if self.precomputed:
            for name, attn, proc in fast_processors(self.unet):
                inner = proc.to_k_id.out_features
                heads = attn.heads
                shape = (batch, heads, n_id, inner // heads)
                sctx.layers[name] = LayerIDState(
                    key=torch.zeros(shape, device=device, dtype=states.dtype),
                    value=torch.zeros(shape, device=device, dtype=states.dtype),
                    key_mean=torch.zeros(batch, inner, 1, device=device, dtype=states.dtype),
                )
        slot = _Slot(key, torch.zeros_like(latents), t_buf, slot_states, sctx, scale)
        if self.precomputed:
            slot.ids = torch.zeros(batch, n_id, states.shape[2], device=device, dtype=states.dtype)
            if ctx.mix_scale is not None:
                m, k = float(ctx.mix_scale), ctx.num_tokens
                slot.mix = torch.tensor([m] * k + [1.0 - m] * k, device=device, dtype=states.dtype).view(1, 1, -1, 1)
        return slot

    # ------------------------------------------------------------------ per-request buffers
    @torch.no_grad()
    def _load_request(self, slot: _Slot, states: Tensor, ctx: IDContext | None) -> None:
        """Fill the slot's request buffers when the request changed (new context or states)."""
        request = (ctx, None if ctx is None else ctx.regions, None if ctx is None else ctx.id_scale,
                   states, states._version)
        if slot.request is not None and all(a is b for a, b in zip(slot.request[:4], request[:4])) \
                and slot.request[4] == request[4]:
            return
        with torch.profiler.record_function("dynamicid.load_request"):
            if ctx is None or not self.precomputed:
                slot.states.copy_(states)
            else:
                slot.states.copy_(states[:, : slot.states.shape[1]])
            if ctx is not None:
                self._load_ids(slot, states, ctx)
        slot.request = request

    def _load_ids(self, slot: _Slot, states: Tensor, ctx: IDContext) -> None:
        sctx = slot.ctx
        batch = states.shape[0]
        scale = ctx.id_scale
        if isinstance(scale, Tensor):
            scale = scale.to(device=slot.scale.device, dtype=torch.float32).reshape(-1)
            if scale.numel() not in (1, batch):
                raise ValueError(f"IDContext.id_scale has {scale.numel()} values, batch is {batch}")
            slot.scale.copy_(scale.expand(batch))
        else:
            slot.scale.fill_(float(scale))
        b = float(ctx.boost)
        for (q_h, q_w), grid in sctx.grids.items():
            masks = ctx.region_masks(q_h, q_w, states.device)  # cached on the request's context
            if masks.inside_any.shape[0] not in (1, batch):
                raise ValueError(f"IDContext.regions are given for {masks.inside_any.shape[0]} samples, batch is {batch}")
            grid.masks.inside.copy_(masks.inside.expand_as(grid.masks.inside))
            grid.masks.inside_any.copy_(masks.inside_any.expand_as(grid.masks.inside_any))
            if grid.masks.allowed is not None:
                grid.masks.allowed.copy_(masks.allowed.expand_as(grid.masks.allowed))
            if grid.bias is not None:
                n_id = grid.masks.allowed.shape[-1]
                grid.bias[..., :n_id].copy_(torch.where(grid.masks.allowed, 0.0, -math.inf))
            inside = grid.masks.inside_any.unsqueeze(-1)  # [B, HW, 1]
            grid.boost_add.copy_(inside.float() * b)
            grid.boost_mul.copy_(torch.where(inside, 1.0, 1.0 / (b + 1.0)))
        if not self.precomputed:
            return
        slot.ids.copy_(states[:, slot.states.shape[1]:])
        if not self.capture:
            self._layer_states(slot)
            return
        if slot.prepare_graph is None:  # ~10 launches per layer: one replay instead (per request)
            slot.prepare_graph = self._capture_fn(lambda: self._layer_states(slot), slot.latents.device)[0]
        slot.prepare_graph.replay()

    def _layer_states(self, slot: _Slot) -> None:
        """ID keys / values / gate direction of every layer from ``slot.ids`` and ``slot.scale``."""
        batch, n_id, _ = slot.ids.shape
        dtype = slot.ids.dtype
        for name, attn, proc in fast_processors(self.unet):
            st = slot.ctx.layers[name]
            w_dtype = proc.to_k_id.weight.dtype
            key = proc.to_k_id(slot.ids.to(w_dtype)).to(dtype)  # [B, n_id, inner]
            value = proc.to_v_id(slot.ids.to(w_dtype)).to(dtype)
            heads = attn.heads
            st.key_mean.copy_(key.mean(dim=1).unsqueeze(-1))
            key4 = key.view(batch, n_id, heads, -1).transpose(1, 2)  # [B, heads, n_id, d]
            st.key.copy_(key4 * slot.mix if slot.mix is not None else key4)
            value4 = value.view(batch, n_id, heads, -1).transpose(1, 2)
            st.value.copy_(value4 * slot.scale.to(dtype).view(batch, 1, 1, 1))

    # ------------------------------------------------------------------ running
    def _forward(self, slot: _Slot) -> Tensor:
        kwargs = {"cross_attention_kwargs": {"id_context": slot.ctx}} if slot.ctx is not None else {}
        return self._forward_fn(slot.latents, slot.t, encoder_hidden_states=slot.states, **kwargs).sample

    def _capture_fn(self, fn: Callable[[], Tensor | None], device: torch.device):
        """Warm ``fn`` on a side stream (lazy init, autotuning, compilation never happen inside a
        capture), then capture it into the runner's shared graph pool; -> (graph, fn's output)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup_runs):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            out = fn()
        return graph, out

    def _capture(self, slot: _Slot) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        start = time.perf_counter()
        graph, out = self._capture_fn(lambda: self._forward(slot), slot.latents.device)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        log.info("fast path: captured bucket %s in %.2f s", slot.key[0], time.perf_counter() - start)
        return graph, out


# --------------------------------------------------------------------------- identity encoding


def _clone_output(out):
    """Copy a graph's static output (tensor, tuple, or a transformers ModelOutput) for the caller."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_output(v) for v in out)
    if hasattr(out, "items") and hasattr(out, "keys"):
        return type(out)(**{k: _clone_output(v) for k, v in out.items()})
    return out


class GraphedForward:
    """A module's ``forward`` replayed as a CUDA graph per input signature.

    Installed as an instance attribute (``module.forward = GraphedForward(module)``), so the
    module object, its parameters, state-dict keys and attributes stay exactly as they were;
    ``uninstall()`` removes it. Used for the identity encoders: they run once per request, but
    ViT-H/14 on one crop is ~400 small kernels and the face encoder ~80, i.e. mostly launch
    overhead. Calls with CPU tensors, or inputs it has not seen, are run by the original
    forward (a new CUDA signature is captured on first use). Outputs are cloned, so a result
    stays valid after the next call.
    """

    def __init__(self, module: nn.Module, pool=None, warmup_runs: int = 2):
        self.module = module
        self.original = module.forward
        self.pool = pool
        self.warmup_runs = warmup_runs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], object]] = {}

    def install(self) -> "GraphedForward":
        self.module.forward = self
        return self

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    @staticmethod
    def _signature(args: tuple, kwargs: dict) -> tuple | None:
        key = []
        for name, v in [(i, a) for i, a in enumerate(args)] + sorted(kwargs.items()):
            if isinstance(v, Tensor):
                if v.device.type != "cuda":
                    return None
                key.append((name, tuple(v.shape), v.dtype, v.device))
            elif v is None or isinstance(v, (bool, int, float, str)):
                key.append((name, v))
            else:
                return None
        return tuple(key)

    def __call__(self, *args, **kwargs):
        key = self._signature(args, kwargs)
        if key is None or torch.is_grad_enabled():  # training through it: the plain forward
            return self.original(*args, **kwargs)
        with torch.no_grad():
            return self._replay(key, args, kwargs)

    def _replay(self, key: tuple, args: tuple, kwargs: dict):
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args, kwargs)
        graph, inputs, out = entry
        live = [v for v in list(args) + [kwargs[k] for k in sorted(kwargs)] if isinstance(v, Tensor)]
        for static, new in zip(inputs, live):
            static.copy_(new)
        graph.replay()
        return _clone_output(out)

    def _capture(self, args: tuple, kwargs: dict):
        s_args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
        s_kwargs = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        inputs = [v for v in list(s_args) + [s_kwargs[k] for k in sorted(s_kwargs)] if isinstance(v, Tensor)]
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self.original(*s_args, **s_kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.original(*s_args, **s_kwargs)
        return graph, inputs, out


# --------------------------------------------------------------------------- pipeline API


@dataclass
class FastPath:
    """Handle returned by ``enable_fast_path``: the runner, what was chosen, and ``disable()``."""

    pipe: object
    mode: str
    gate: str
    runner: BucketStepRunner | None
    replaced: dict[str, object]
    channels_last: bool
    load_seconds: float = 0.0
    graphed: list[GraphedForward] = field(default_factory=list)  # identity encoders replayed as graphs

    @property
    def graph_pool(self):
        return None if self.runner is None else self.runner._pool

    def disable(self) -> None:
        """Back to the plain path: original processors, no runner (merged LoRA stays merged)."""
        unet = self.pipe.unet
        for name, attn in _attention_modules(unet):
            if name in self.replaced:
                attn.set_processor(self.replaced[name])
        if self.channels_last:
            unet.to(memory_format=torch.contiguous_format)
        for g in self.graphed:
            g.uninstall()
        self.graphed = []
        self.pipe.step_runner = None
        if self.runner is not None:
            self.runner.clear()


def resolve_mode(mode: Mode, device: torch.device) -> str:
    if mode == "auto":
        return "cuda_graphs" if device.type == "cuda" else "eager"
    if mode in ("cuda_graphs", "compile") and device.type != "cuda":
        raise ValueError(f"fast path mode {mode!r} needs a CUDA device, the pipeline is on {device}")
    if mode not in ("cuda_graphs", "compile", "eager", "off"):
        raise ValueError(f"unknown fast path mode {mode!r} (auto | cuda_graphs | compile | eager | off)")
    return mode


def enable_fast_path(
    pipe,
    mode: Mode = "auto",
    buckets: Sequence[tuple[int, int, int]] | None = None,
    *,
    gate: GateImpl = "auto",
    images_per_request: int = 1,
    cfg: bool = True,
    channels_last: bool | None = None,
    graph_encoders: bool | None = None,
    max_buckets: int = 16,
) -> FastPath:
    """Switch a DynamicIDPipeline to the fast path and warm its buckets.

    ``buckets``: (height px, width px, num_ids) to capture at load time, each for
    ``images_per_request`` images with (``cfg=True``) or without classifier-free guidance;
    default: the profile's resolution with 0, 1 and 2 identities. Other shapes are captured on
    first use. Defaults chosen by measurement (docs/benchmarks.md), on CUDA: ``gate`` "compiled"
    (torch.compile'd gate, eager fallback if compiling fails), ``channels_last`` UNet weights,
    CLIP image, face and text encoders replayed as graphs (``graph_encoders``). On a CPU: eager gate, no layout change, no graphs.
    Returns a ``FastPath`` handle (``disable()`` restores the plain path).
    """
    start = time.perf_counter()
    unet = pipe.unet
    device = torch.device(pipe.device)
    chosen = resolve_mode(mode, device)
    merge_lora(unet)
    if chosen == "off":
        pipe.step_runner = None
        return FastPath(pipe, chosen, "none", None, {}, False, time.perf_counter() - start)
    cuda = device.type == "cuda"
    gate_impl = ("compiled" if cuda else "eager") if gate == "auto" else gate
    if gate_impl == "compiled" and not cuda:
        raise ValueError("gate='compiled' needs a CUDA device")
    channels_last = cuda if channels_last is None else channels_last
    replaced = install_fast_processors(unet, gate_impl)
    precomputed = all(p.fast_ok for _, _, p in fast_processors(unet))
    if channels_last:  # the UNet only: the VAE decoder measured slower channels-last (docs/benchmarks.md)
        unet.to(memory_format=torch.channels_last)
    capture = chosen in ("cuda_graphs", "compile")
    runner = BucketStepRunner(unet, capture=capture, precomputed=precomputed, max_buckets=max_buckets,
                              compile_unet=chosen == "compile")
    pipe.step_runner = runner
    handle = FastPath(pipe, chosen, gate_impl, runner, replaced, channels_last)
    params = pipe.model_params
    res = params.active.resolution
    specs = list(buckets) if buckets is not None else [(res, res, n) for n in (0, 1, 2)]
    try:
        _warm(pipe, runner, specs, images_per_request * (2 if cfg else 1))
    except Exception as err:  # noqa: BLE001 - a failed compile must not take the service down
        if gate_impl != "compiled":
            raise
        log.warning("fast path: compiled gate failed (%s); falling back to the eager gate", err)
        handle.gate = gate_impl = "eager"
        install_fast_processors(unet, "eager")
        runner.clear()
        _warm(pipe, runner, specs, images_per_request * (2 if cfg else 1))
    if (cuda and capture) if graph_encoders is None else graph_encoders:
        _graph_encoders(pipe, handle, specs, images_per_request, device)
    handle.load_seconds = time.perf_counter() - start
    log.info("fast path %s (gate %s, channels_last %s): %d bucket(s) ready in %.1f s", chosen, gate_impl,
             channels_last, runner.num_buckets, handle.load_seconds)
    return handle


def _graph_encoders(pipe, handle: FastPath, specs, images: int, device: torch.device) -> None:
    """Replay the per-request encoders as graphs: CLIP image encoder + face encoder, text encoder.

    All are launch-bound at request batch sizes (ViT-H/14 on one crop, 12 text layers for the
    prompt and the negative prompt); warmed here for the buckets' identity counts and prompt
    batch. A module whose capture fails keeps running eagerly (logged), the rest stay graphed.
    """
    from model.dynamicid import text_embeddings

    fe = pipe.dynamicid.face_encoder
    size = pipe.backbone.image_size
    fe_dtype = next(fe.parameters()).dtype

    def identity_warm() -> None:
        for n in sorted({max(1, n) for _, _, n in specs} | {1}):  # requests with n faces, and the CFG branch
            feats = clip_image_features(pipe.backbone, torch.rand(n, 3, size, size, device=device))
            fe(torch.zeros(n, pipe.dims.id_dim, device=device, dtype=fe_dtype), feats.to(fe_dtype))

    def text_warm() -> None:
        text_embeddings(pipe.backbone, ["a photo"] * images)

    groups = (((pipe.backbone.image_encoder, fe), identity_warm), ((pipe.backbone.text_encoder,), text_warm))
    for modules, warm in groups:
        graphed = [GraphedForward(m, pool=handle.graph_pool).install() for m in modules]
        try:
            with torch.no_grad():
                warm()
        except Exception as err:  # noqa: BLE001 - these modules then simply run eagerly
            log.warning("fast path: no graph for %s (%s); it runs eagerly",
                        ", ".join(type(m).__name__ for m in modules), err)
            for g in graphed:
                g.uninstall()
            continue
        handle.graphed.extend(graphed)


def _warm(pipe, runner: BucketStepRunner, specs: Sequence[tuple[int, int, int]], batch: int) -> None:
    unet = pipe.unet
    vsf = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    saa = pipe.model_params.saa
    for height, width, num_ids in specs:
        if height % vsf or width % vsf:
            raise ValueError(f"bucket {height}x{width}: sides must be multiples of {vsf}")
        runner.warm(batch, (height // vsf, width // vsf), num_ids, channels=unet.config.in_channels,
                    text_len=pipe.tokenizer.model_max_length, cross_dim=unet.config.cross_attention_dim,
                    dtype=unet.dtype, device=torch.device(pipe.device), num_tokens=pipe.dims.num_tokens,
                    gating=saa.gating, tau=saa.tau, boost=saa.boost)


__all__ = [
    "enable_fast_path", "FastPath", "BucketStepRunner", "FastSAAProcessor", "StaticIDContext", "LayerIDState",
    "GridIDState", "GraphedForward", "install_fast_processors", "fast_processors", "gate_add_eager", "level_grids", "resolve_mode",
]

"""BucketStepRunner: the UNet steps of ``pipe.step_runner`` through static-shape buckets, replayed as CUDA graphs.

Each bucket (``_Slot``) holds static inputs, a ``StaticIDContext`` and its captured graphs (boost
on / off); before a replay the request's inputs, masks and ID keys/values (``_layer_states``,
itself one captured graph) are copied into the bucket's buffers, so a replay never reads stale
state. Without capture the same buffers run eagerly (CPU tests).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from model.fast.id_state import GridIDState, LayerIDState, StaticIDContext, level_grids
from model.fast.processor import fast_processors
from model.saa.context import IDContext
from model.saa.layout_maps import ActivationRecorder
from model.saa.regions import RegionMasks

log = logging.getLogger(__name__)


@dataclass


class _Slot:
    """One bucket: static inputs, the static IDContext and its captured graphs."""

    key: tuple
    latents: Tensor  # [B, C, h, w]
    t: Tensor  # [] or [B]
    states: Tensor  # [B, T (+ n_id), D]
    ctx: StaticIDContext | None
    scale: Tensor | None  # [B, N] fp32: each sample's scale per identity (a float or [B] id_scale, broadcast)
    ids: Tensor | None = None  # [B, n_id, D] the request's ID tokens (precomputed mode)
    mix: Tensor | None = None  # [1, 1, n_id, 1] per-token key factor of mix_scale, or None
    # (boost on, recording activation maps) -> captured graph and its static output
    graphs: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, Tensor]] = field(default_factory=dict)
    prepare_graph: torch.cuda.CUDAGraph | None = None  # the per-request ID keys/values, replayed
    request: tuple | None = None  # what the per-request buffers were filled from
    recorder: ActivationRecorder | None = None  # layout auto: static per-step activation maps


class BucketStepRunner:
    """``pipe.step_runner``: UNet steps through static-shape buckets, replayed as CUDA graphs.

    A bucket is (latent shape, dtype, device, timestep shape, encoder-state shape, identity
    settings); its graphs are captured on first use (or by ``warm``) and the buffers of all
    buckets share one graph memory pool. Not thread-safe (neither is the pipeline).

    ``capture_lock`` is held while a graph is being captured. CUDA forbids other host threads' work
    during a capture (torch's default "global" capture mode makes their calls fail, and the capture
    with them), so a thread that uses the GPU beside the one stepping the UNet (a server's encode
    thread) takes the lock around that work.
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
        self.capture_lock = threading.Lock()
        # called with no arguments before every step: a graph replay runs no module hooks, so whoever
        # times steps or stops a batch between them (serving's engine) registers here
        self.step_hooks: list[Callable[[], None]] = []
        self.captures = 0
        self.capture_seconds = 0.0

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def __call__(self, latents: Tensor, t: Tensor | int | float, states: Tensor, ctx: IDContext | None) -> Tensor:
        for hook in self.step_hooks:
            hook()
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
        record = ctx is not None and ctx.recorder is not None  # layout auto's observation steps
        if slot.ctx is not None:
            slot.ctx.boost_active = boost
            slot.ctx.recorder = self._slot_recorder(slot, ctx.recorder) if record else None
        if not self.capture:
            out = self._forward(slot)
        else:
            graph = slot.graphs.get((boost, record))
            if graph is None:
                graph = slot.graphs[(boost, record)] = self._capture(slot)
            graph[0].replay()
            out = graph[1].clone()
        if record:  # this step's maps, from the bucket's static buffer into the request's recorder
            ctx.recorder.maps.add_(slot.ctx.recorder.maps)
        return out

    @torch.no_grad()
    def warm(self, batch: int, latent_hw: tuple[int, int], num_ids: int, *, channels: int, text_len: int,
             cross_dim: int, dtype: torch.dtype, device: torch.device, num_tokens: int = 4, gating: bool = True,
             tau: float = 0.3, boost: float = 4.0, record_level: int | None = None) -> None:
        """Capture (or, eagerly, build) one bucket's graphs with made-up inputs of its shapes.

        ``record_level``: with two or more identities, also the graph of layout auto's observation
        steps (boost off, activation maps recorded at that UNet level's query grid)."""
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
        if ctx is not None and num_ids > 1 and record_level is not None:
            grid = level_grids(latent_hw, self.levels)[min(record_level, self.levels - 1)]
            ctx.boost_active = False
            ctx.recorder = ActivationRecorder(batch, num_ids, num_tokens, grid, tau, device)
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
            for t in (slot.latents, slot.t, slot.states, slot.scale, slot.ids, slot.mix,
                      None if slot.recorder is None else slot.recorder.maps):
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
        scale = torch.ones(batch, ctx.num_ids, device=device, dtype=torch.float32)
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
            scale = scale.to(device=slot.scale.device, dtype=torch.float32)
            if scale.dim() == 2:  # [B or 1, N] per identity
                if scale.shape[1] != ctx.num_ids or scale.shape[0] not in (1, batch):
                    raise ValueError(f"IDContext.id_scale has shape {tuple(scale.shape)}, "
                                     f"expected [{batch}, {ctx.num_ids}]")
            else:  # [B] or [1] per sample: the same for every identity
                scale = scale.reshape(-1, 1)
                if scale.shape[0] not in (1, batch):
                    raise ValueError(f"IDContext.id_scale has {scale.shape[0]} values, batch is {batch}")
            slot.scale.copy_(scale.expand_as(slot.scale))
        else:
            slot.scale.fill_(float(scale))
        b = float(ctx.boost)
        for (q_h, q_w), grid in sctx.grids.items():
            masks = ctx.region_masks(q_h, q_w, states.device)  # cached on the request's context
            if masks.inside_any.shape[0] not in (1, batch):
                raise ValueError(f"IDContext.regions are given for {masks.inside_any.shape[0]} samples, "
                                 f"batch is {batch}")
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
            # each identity's scale on its own tokens (K, or 2K with mix_scale): [B, N] -> [B, 1, n_id, 1]
            per_token = slot.scale.to(dtype).repeat_interleave(n_id // slot.scale.shape[1], dim=1)
            st.value.copy_(value4 * per_token.view(batch, 1, n_id, 1))

    # ------------------------------------------------------------------ running
    def _slot_recorder(self, slot: _Slot, request: ActivationRecorder) -> ActivationRecorder:
        """The bucket's static recorder for ``request``'s configuration (graphs read its buffer)."""
        if slot.recorder is None or not slot.recorder.same_config(request):
            slot.recorder = request.like()
            for key in [k for k in slot.graphs if k[1]]:  # captured with the previous buffer
                del slot.graphs[key]
        return slot.recorder

    def _forward(self, slot: _Slot) -> Tensor:
        if slot.ctx is not None and slot.ctx.recorder is not None:
            slot.ctx.recorder.reset()  # inside the captured graph: each replay records one step
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
        with self.capture_lock, torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            out = fn()
        return graph, out

    def _capture(self, slot: _Slot) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        start = time.perf_counter()
        graph, out = self._capture_fn(lambda: self._forward(slot), slot.latents.device)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        log.info("fast path: captured bucket %s in %.2f s", slot.key[0], time.perf_counter() - start)
        return graph, out

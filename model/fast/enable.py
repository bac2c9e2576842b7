"""enable_fast_path: switch a DynamicIDPipeline to the fast path and warm its buckets; FastPath undoes it.

Usage::

    fast = enable_fast_path(pipe)            # auto: CUDA graphs on CUDA, eager buckets on CPU
    out = pipe("a photo of a person", [IdentityInput(...)])
    fast.disable()                           # back to the plain path
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from model.dynamicid import clip_image_features
from model.fast.buckets import BucketStepRunner
from model.fast.graphed import GraphedForward
from model.fast.processor import (
    GateImpl,
    _attention_modules,
    fast_processors,
    install_fast_processors,
)
from model.saa.install import merge_lora

log = logging.getLogger(__name__)

Mode = Literal["auto", "cuda_graphs", "compile", "eager", "off"]


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
                    gating=saa.gating, tau=saa.tau, boost=saa.boost, record_level=saa.auto.map_level)

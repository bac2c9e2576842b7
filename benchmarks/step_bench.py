"""UNet step time and peak memory: base vs the project's SAA vs the release design vs decoupled.

CFG batch 2, fp16, every variant replayed as a CUDA graph of one step (static inputs; a call
copies the latents in, replays and clones the output). Peak memory = weights (+ the fast
path's static buffers) + the transient peak of one eager step. Variants marked "[cl]" run
with channels-last UNet weights (the fast path's default on CUDA) and are compared with the
base model in the same layout. The fast path's correctness checks run here too.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from benchmarks import checks
from benchmarks.decoupled import install_decoupled
from benchmarks.release_design import ReleaseContext, install_release
from benchmarks.sd15 import build_unet, param_bytes
from benchmarks.timing import GIB, GraphStep, eager_peak_bytes, free, time_calls
from model.fast.buckets import BucketStepRunner
from model.fast.id_state import level_grids
from model.fast.processor import install_fast_processors
from model.saa.context import IDContext
from model.saa.auto_layout import AutoLayoutRule
from model.saa.auto_run import DEFAULT_MAP_LEVEL
from model.saa.install import install_saa, load_saa_state_dict, merge_lora
from model.saa.layout_maps import ActivationRecorder, RoutedIDContext

TEXT_LEN = 77
PRODUCT = "saa fast [cl]"  # the fast path as enable_fast_path configures it on CUDA


class StepBench:
    def __init__(self, size: str, device: torch.device, reps: int, warmup: int, lora_rank: int, log: Callable,
                 saa_weights: dict[str, Tensor] | None = None):
        self.device = device
        self.saa_weights = saa_weights  # a checkpoint's SAA part (e.g. imported release weights), or random
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.unet = build_unet(size, device, self.dtype)
        self.reps, self.warmup, self.lora_rank, self.log = reps, warmup, lora_rank, log
        self.rows: list[dict] = []
        self.checks: dict = {}

    # ------------------------------------------------------------------ processors
    def reset(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())

    def layout(self, channels_last: bool) -> None:
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def inputs(self, res: int, max_ids: int):
        h = res // 8
        g = torch.Generator().manual_seed(res)
        cross = self.unet.config.cross_attention_dim
        latents = torch.randn(2, 4, h, h, generator=g).to(self.device, self.dtype)
        text = torch.randn(2, TEXT_LEN, cross, generator=g).to(self.device, self.dtype)
        ids = torch.randn(2, 4 * max_ids, cross, generator=g).to(self.device, self.dtype)
        return latents, torch.tensor(500, device=self.device), text, ids

    # ------------------------------------------------------------------ measuring
    def record(self, variant: str, res: int, ids: int, step: Callable[[Tensor], Tensor], eager: Callable[[], Tensor],
               latents: Tensor, resident: Callable[[], int]) -> dict:
        peak = eager_peak_bytes(eager, self.device, resident)
        stats = time_calls(lambda: step(latents), self.device, self.reps, self.warmup)
        out = step(latents)
        row = {"section": "step", "variant": variant, "res": res, "ids": ids, **stats.as_dict(),
               "peak_gib": None if peak is None else round(peak / GIB, 4),
               "finite": bool(torch.isfinite(out).all())}
        self.rows.append(row)
        self.log(f"step {variant:<28} {res} px ids={ids}: {stats.median_ms:8.3f} ms"
                 + ("" if peak is None else f"  peak {peak / GIB:6.3f} GiB"))
        return row

    def runner_variant(self, variant: str, res: int, n: int, latents, t, states, precomputed: bool,
                       boost: bool = False, record: bool = False) -> dict:
        """``record``: layout auto's observation step (per-identity maps recorded, copied to the request)."""
        h = latents.shape[-1]
        ctx = None
        if n:
            ctx = IDContext(num_ids=n, latent_hw=(h, h))
            ctx.boost_active = boost
            if record:
                grid = level_grids((h, h), len(self.unet.config.block_out_channels))[DEFAULT_MAP_LEVEL]
                ctx.recorder = ActivationRecorder(latents.shape[0], n, 4, grid, ctx.tau, self.device)
        graph_runner = BucketStepRunner(self.unet, capture=self.device.type == "cuda", precomputed=precomputed)
        eager_runner = BucketStepRunner(self.unet, capture=False, precomputed=precomputed)
        row = self.record(variant, res, n, lambda x: graph_runner(x, t, states, ctx),
                          lambda: eager_runner(latents, t, states, ctx), latents,
                          lambda: param_bytes(self.unet) + eager_runner.static_bytes())
        del graph_runner, eager_runner
        free(self.device)
        return row

    def auto_switch(self, res: int, n: int, latents, t, states) -> None:
        """Layout auto's one-off switch: the rule on recorded maps, then the first step with the new regions
        (masks built on the device and copied into the bucket's buffers, no capture); vs a plain step."""
        h = latents.shape[-1]
        grid = level_grids((h, h), len(self.unet.config.block_out_channels))[DEFAULT_MAP_LEVEL]
        maps = torch.rand(1, n, *grid, generator=torch.Generator().manual_seed(n)).to(self.device)
        rule = AutoLayoutRule()
        runner = BucketStepRunner(self.unet, capture=self.device.type == "cuda", precomputed=True)
        runner(latents, t, states, IDContext(num_ids=n, latent_hw=(h, h)))  # capture outside the timing

        def switch_step() -> Tensor:
            boxes = rule(maps)  # [1, N, 4] on the device
            ctx = RoutedIDContext(num_ids=n, latent_hw=(h, h), device_regions=boxes.repeat(latents.shape[0], 1, 1))
            return runner(latents, t, states, ctx)

        for variant, fn in (("auto rule only", lambda: rule(maps)), ("auto switch step", switch_step)):
            stats = time_calls(fn, self.device, self.reps, self.warmup)
            self.rows.append({"section": "step", "variant": f"{PRODUCT}, {variant}", "res": res, "ids": n,
                              **stats.as_dict()})
            self.log(f"step {PRODUCT + ', ' + variant:<28} {res} px ids={n}: {stats.median_ms:8.3f} ms")
        runner.clear()
        free(self.device)

    def eager_time(self, variant: str, res: int, n: int, latents, t, states, precomputed: bool) -> None:
        """Eager step (no graph): the launch-bound number the graphs remove."""
        h = latents.shape[-1]
        ctx = IDContext(num_ids=n, latent_hw=(h, h)) if n else None
        runner = BucketStepRunner(self.unet, capture=False, precomputed=precomputed)
        stats = time_calls(lambda: runner(latents, t, states, ctx), self.device, max(10, self.reps // 3), 3)
        self.rows.append({"section": "step_eager", "variant": variant, "res": res, "ids": n, **stats.as_dict()})
        self.log(f"eager {variant:<27} {res} px ids={n}: {stats.median_ms:8.3f} ms")

    def graph_variant(self, variant: str, res: int, n: int, latents, t, states, ctx) -> dict:
        def fn(x: Tensor) -> Tensor:
            return self.unet(x, t, encoder_hidden_states=states, cross_attention_kwargs={"id_context": ctx}).sample

        step = GraphStep(fn, latents)
        row = self.record(variant, res, n, step, lambda: fn(latents), latents, lambda: param_bytes(self.unet))
        del step
        free(self.device)
        return row

    # ------------------------------------------------------------------ the section
    def run(self, resolutions: list[int], id_counts: list[int], do_checks: bool, ablations: bool = True) -> None:
        max_ids = max(max(id_counts), 2)
        cuda = self.device.type == "cuda"
        for index, res in enumerate(resolutions):
            latents, t, text, ids = self.inputs(res, max_ids)
            states = {n: torch.cat([text, ids[:, : 4 * n]], dim=1) for n in sorted(set(id_counts) | {1, 2})}
            check_here = do_checks and index == 0
            self.reset()
            self.runner_variant("base", res, 0, latents, t, text, precomputed=True)
            self.layout(True)
            self.runner_variant("base [cl]", res, 0, latents, t, text, precomputed=True)
            self.layout(False)
            if index == 0:
                self.eager_time("base", res, 0, latents, t, text, precomputed=True)

            install_saa(self.unet, lora_rank=self.lora_rank)
            if self.saa_weights is not None:
                load_saa_state_dict(self.unet, self.saa_weights)
            merge_lora(self.unet)
            for n in id_counts:
                self.runner_variant("saa plain", res, n, latents, t, states[n], precomputed=False)
            refs = checks.plain_references(self.unet, latents, t, states, id_counts) if check_here else None

            if ablations:
                install_fast_processors(self.unet, "eager")
                for n in id_counts:
                    self.runner_variant("saa fast, eager gate", res, n, latents, t, states[n], precomputed=True)
                if check_here:
                    self.checks["fast_eager_gate_vs_plain"] = checks.fast_vs_plain(self.unet, latents, t, states, refs)
            t0 = time.perf_counter()
            install_fast_processors(self.unet, "compiled" if cuda else "eager")
            for i, n in enumerate(id_counts):
                row = self.runner_variant("saa fast", res, n, latents, t, states[n], precomputed=True)
                if i == 0:
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)
            if index == 0:
                self.eager_time("saa fast", res, 1, latents, t, states[1], precomputed=True)
            if check_here:
                self.checks["fast_vs_plain"] = checks.fast_vs_plain(self.unet, latents, t, states, refs)
                self.checks["layout_swap_replay"] = checks.layout_swap(self.unet, latents, t, states[2])
            self.layout(True)
            for n in id_counts:
                self.runner_variant(PRODUCT, res, n, latents, t, states[n], precomputed=True)
            self.runner_variant(PRODUCT + ", boost step", res, 2, latents, t, states[2], precomputed=True, boost=True)
            for n in sorted({2, max_ids}):  # layout auto: its observation steps, and the switch (issue 20)
                self.runner_variant(PRODUCT + ", auto observe", res, n, latents, t, states[n], precomputed=True,
                                    record=True)
                self.auto_switch(res, n, latents, t, states[n])
            if check_here:
                self.checks["fast_channels_last_vs_plain"] = checks.fast_vs_plain(self.unet, latents, t, states, refs)
            self.layout(False)

            self.reset()
            install_decoupled(self.unet)
            h = latents.shape[-1]
            self.graph_variant("decoupled (no gating)", res, 1, latents, t, states[1], IDContext(num_ids=1))

            self.reset()
            install_release(self.unet, lora_rank=self.lora_rank)
            for n in (1, 2):
                self.graph_variant("release design", res, n, latents, t, states[n], ReleaseContext(num_ids=n,
                                                                                                    latent_hw=(h, h)))
            if check_here:
                self.checks["release_vs_project"] = checks.release_vs_plain(self.unet, latents, t, states, refs)
            self.reset()
            self.runner_variant("base (again)", res, 0, latents, t, text, precomputed=True)
            self.layout(True)
            self.runner_variant("base [cl] (again)", res, 0, latents, t, text, precomputed=True)
            self.layout(False)
            free(self.device)

    def compile_probe(self, res: int) -> None:
        """torch.compile'd UNet captured as a graph (fast processors, 1 identity; and the base)."""
        latents, t, text, ids = self.inputs(res, 1)
        states = torch.cat([text, ids[:, :4]], dim=1)
        h = latents.shape[-1]
        for variant, n in (("base, torch.compile + graph", 0), ("saa fast, torch.compile + graph", 1)):
            self.reset()
            if n:
                install_saa(self.unet, lora_rank=self.lora_rank)
                merge_lora(self.unet)
                install_fast_processors(self.unet, "eager")
            ctx = IDContext(num_ids=1, latent_hw=(h, h)) if n else None
            runner = BucketStepRunner(self.unet, capture=True, precomputed=True, compile_unet=True)
            st = states if n else text
            t0 = time.perf_counter()
            runner(latents, t, st, ctx)
            compile_s = time.perf_counter() - t0
            stats = time_calls(lambda: runner(latents, t, st, ctx), self.device, self.reps, self.warmup)
            self.rows.append({"section": "step", "variant": variant, "res": res, "ids": n, **stats.as_dict(),
                              "compile_s": round(compile_s, 1)})
            self.log(f"step {variant} {res} px: {stats.median_ms:.3f} ms (compile + capture {compile_s:.0f} s)")

"""Stage-1 training throughput and peak memory: the project's trainer vs the release design.

The project's rows ("project SAA...") run the trainer itself: ``components.train.loop.fit`` with
the real DeepSpeed engine (ZeRO-2, bf16, FusedAdam on a GPU) around ``AnchorTask``, fed by the slot
sampler and ``AnchorSamples``, on SD1.5-size random-weight models, batch 8, 512 px
(benchmarks/train_engine.py; issue 17: the earlier rows used a stand-in optimizer and overstated
the speed). They report the loop's steady-state rate (``images_per_s``; warm-up and compile
windows excluded), the all-in rate, warm-up and compile time with the compile cache's hits, and the
peak memory; "..., resumed" rows continue from the first run's checkpoint with a warm compile
cache. ``engine_rows=False`` (``--train-stand-in``) times the old way instead. The release-design
rows (the baseline) keep the stand-in bf16 optimizer (fp32 master weights and AdamW moments, what
DeepSpeed's bf16 mode keeps; the release did not train with DeepSpeed's ZeRO); their timed steps
keep the losses on the device and read them in one transfer at the end, as the loop does.

* "project SAA" is the trainer as shipped on a GPU (``train.cache_features: true``,
  ``train.compile_unet: auto``): the frozen-feature cache is built by the trainer's own pre-pass
  (``feature_cache.build_feature_cache``, timed per image) over synthetic 512 px images, the
  frozen encoders are offloaded to the host with the trainer's ``feature_cache.offload``, steps
  read the cache through ``AnchorSamples``, and the UNet is torch.compile'd by ``AnchorTask``
  (compilation time reported as ``compile_s``); "eager UNet" = ``train.compile_unet: off``;
  "gradient checkpointing" = ``train.gradient_checkpointing: true`` (every UNet block), "high_res
  checkpointing" = ``train.gradient_checkpointing: high_res`` (only the latent-resolution blocks),
  both applied with the trainer's ``AnchorTask.set_gradient_checkpointing``;
* "encoders every step" = ``train.cache_features: false`` (VAE, CLIP ViT-H/14, text encoder
  run in every step, what the release does);
* the release design runs the very same task with the release's processors put into the UNet
  (unmerged rank-128 LoRA, full attention matrices, ...); only the attention processors differ.
  "(autocast)" = fp32 trainable weights + bf16 autocast, the recipe that reproduces the issue's
  53 GiB.

Before timing, one step of each project variant runs under ``torch.cuda.set_sync_debug_mode``
and the number of host<->device synchronisations it makes is reported (``syncs_per_step``).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.release_design import install_release
from benchmarks.sd15 import build_backbone, model_params
from benchmarks.timing import GIB, free
class PlainAdamW:
    """fp32 parameters and AdamW (the autocast recipe: accelerate-style mixed precision)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, fused: bool):
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class MasterAdamW:
    """bf16 parameters, fp32 master copies and moments (DeepSpeed bf16 mode's memory layout)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, fused: bool):
        self.params = params
        self.master = [p.detach().float().clone().requires_grad_(True) for p in params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay, fused=fused)

    @torch.no_grad()
    def step(self) -> None:
        live = [(p, m) for p, m in zip(self.params, self.master) if p.grad is not None]
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                m.grad.zero_()
        # multi-tensor copies (a few kernels, as DeepSpeed's flat buffers), not one launch per tensor
        torch._foreach_copy_([m.grad for _, m in live], [p.grad for p, _ in live])
        self.opt.step()
        torch._foreach_copy_(self.params, self.master)
        for p in self.params:
            p.grad = None


def _raw_samples(backbone, n: int, res: int):
    """n synthetic training images (the trainer's RawSample: pixels, face crop, caption, embedding)."""
    from components.train.feature_cache import RawSample

    g = torch.Generator().manual_seed(0)
    crop = backbone.image_size
    words = ["a photo of a person", "a portrait of a woman in a park", "a man with glasses, studio"]
    return [RawSample(i, torch.rand(3, res, res, generator=g), torch.rand(3, crop, crop, generator=g),
                      words[i % len(words)], F.normalize(torch.randn(512, generator=g), dim=-1)) for i in range(n)]


class TrainerBatches:
    """The trainer's data path: SlotBatches -> AnchorSamples -> collate in a pinned DataLoader -> to_device."""

    def __init__(self, samples, batch: int, res: int, device: torch.device, cache=None, workers: int = 2):
        from components.train.data import AnchorSamples, SlotBatches, collate

        self.samples = {s.position: s for s in samples}
        self.device = device
        ds = AnchorSamples("unused", sorted(self.samples), seed=0, resolution=res, drop_text=0.05, drop_id=0.05,
                           drop_both=0.05, cache=cache)
        if cache is None:  # no prepared shards here: the same items from the in-memory images
            ds.item = self._raw_item.__get__(ds)
            ds.raw = self.samples
        self.loader = torch.utils.data.DataLoader(
            ds, batch_sampler=SlotBatches(0, 1 << 20, rank=0, world=1, micro_batch=batch, accum=1),
            collate_fn=collate, num_workers=workers if device.type == "cuda" else 0,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0 and device.type == "cuda")
        self.it = iter(self.loader)

    @staticmethod
    def _raw_item(ds, position, rng):
        s = ds.raw[position]
        drop_text, drop_id = ds.drops(rng)
        return {"pixels": s.pixels, "caption": s.caption, "face_crop": s.face_crop, "embedding": s.embedding,
                "drop_text": drop_text, "drop_id": drop_id}

    def __call__(self) -> dict:
        from components.train.data import to_device

        return to_device(next(self.it), self.device)


def count_syncs(fn: Callable[[], object]) -> int:
    """Host<->device synchronisations during ``fn`` (torch.cuda.set_sync_debug_mode warnings)."""
    if not torch.cuda.is_available():
        return -1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def profile_steps(step: Callable[[], torch.Tensor], path, steps: int = 3) -> dict:
    """torch.profiler over a few steps: host time vs GPU kernel time (is the step launch-bound?)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    kernel_rows = [e for e in events if e.device_type.name == "CUDA"]  # kernels only: ops would count twice
    gpu_ms = sum(e.self_device_time_total for e in kernel_rows) / 1e3 / steps
    cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    kernels = sum(e.count for e in kernel_rows) / steps
    path.write_text(events.table(sort_by="self_device_time_total", row_limit=30) + "\n\n"
                    + events.table(sort_by="self_cpu_time_total", row_limit=20))
    return {"wall_ms_profiled": round(wall_ms, 2), "gpu_kernel_ms": round(gpu_ms, 2), "host_cpu_ms": round(cpu_ms, 2),
            "kernels_per_step": int(kernels)}


def run_training(size: str, device: torch.device, batch: int, res: int, steps: int, warmup: int,
                 log: Callable, profile_dir=None, compile_unet: bool = True,
                 compiled_checkpointing: tuple[str, ...] = ("high_res",),
                 engine_rows: bool = True) -> tuple[list[dict], dict]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from components.train.distributed import DistInfo
    from components.train.feature_cache import FeatureCache, build_feature_cache, encode_batch, offload
    from components.train.tasks import AnchorTask
    from model.dynamicid import build_dynamicid
    from model.saa.install import install_saa

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    backbone = build_backbone(size, device, dtype)
    params = model_params(size)
    rank = params.active.lora_rank
    dyn = build_dynamicid(backbone, params, "insightface").to(device=device, dtype=dtype)  # installs SAA
    unet = backbone.unet
    samples = _raw_samples(backbone, 4 * batch, res)
    info: dict = {"step_function": "components.train.tasks.AnchorTask fed by components.train.data "
                                   "(SlotBatches, AnchorSamples, collate, pinned DataLoader, to_device)",
                  "engine": ("project rows: components.train.loop.fit with DeepSpeed (steady-state images/s); "
                             "release rows: stand-in bf16 AdamW") if engine_rows else "stand-in bf16 AdamW"}
    rows: list[dict] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # what the frozen encoders alone cost per step (paid by every design that does not cache)
    for _ in range(2):
        encode_batch(backbone, samples[:batch])
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        encode_batch(backbone, samples[:batch])
    sync()
    info["frozen_encoders_ms_per_step"] = round((time.perf_counter() - t0) * 200, 2)

    def measure(design: str, step: Callable[[], torch.Tensor], trainable, extra: dict) -> dict:
        for _ in range(warmup):
            float(step())
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]
        last = float(torch.stack(losses).cpu()[-1])  # the loop's one host read per burst of steps
        sync()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
        row = {"section": "train", "variant": design, "res": res, "batch": batch, "step_ms": round(ms, 3),
               "images_per_s": round(batch * 1e3 / ms, 3), "peak_gib": None if peak is None else round(peak, 3),
               "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
               "loss_finite": bool(torch.isfinite(torch.tensor(last))), **extra}
        rows.append(row)
        log(f"train {design:<44}: {row['images_per_s']:8.2f} img/s, step {ms:8.1f} ms, peak {row['peak_gib']} GiB"
            + (f", {extra['syncs_per_step']} syncs/step" if "syncs_per_step" in extra else ""))
        return row

    def run_design(design: str, kind: str, precision: str, cache=None, checkpointing: bool | str = False,
                   compiled: bool = False, resume_row: bool = False) -> None:
        if kind == "project" and engine_rows:
            run_engine(design, cache, checkpointing, compiled, resume_row)
            return
        unet.set_attn_processor(AttnProcessor2_0())
        free(device)
        procs = install_release(unet, lora_rank=rank) if kind == "release" else install_saa(unet, lora_rank=rank)
        train_dtype = torch.float32 if precision == "autocast" else dtype
        procs.to(device=device, dtype=train_dtype).requires_grad_(True)
        dyn.face_encoder.to(dtype=train_dtype)
        task = AnchorTask(backbone, dyn, params, seed=0, compile_unet=compiled)  # the trainer's train.compile_unet
        if cache is not None:
            task.use_cached_features(cache.constants(device))
        dyn.face_encoder.requires_grad_(True)
        trainable = list(procs.parameters()) + list(dyn.face_encoder.parameters())
        opt = (PlainAdamW if precision == "autocast" else MasterAdamW)(trainable, 1e-4, 1e-2, cuda)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast" and cuda)
        batches = TrainerBatches(samples, batch, res, device, cache=cache)
        extra: dict = {"precision": precision, "cached_features": cache is not None, "engine": "stand-in AdamW",
                       "gradient_checkpointing": checkpointing, "compiled_unet": compiled,
                       "checkpointed_modules": len(task.set_gradient_checkpointing(checkpointing))}
        t0 = time.perf_counter()
        try:
            def step() -> torch.Tensor:
                data = batches()
                with amp:
                    loss, _ = task(data)
                loss.backward()
                opt.step()
                return loss.detach()

            if compiled:
                float(step())
                extra["compile_s"] = round(time.perf_counter() - t0, 1)
            if kind == "project" and cuda:
                float(step())  # warm: the SAA context builds its masks once, the allocator settles
                extra["syncs_per_step"] = count_syncs(step)
            measure(design, step, trainable, extra)
            if profile_dir is not None and cuda and kind == "project" and not checkpointing and not compiled:
                name = design.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                rows[-1].update(profile_steps(step, Path(profile_dir) / f"profile_train_{name}.txt"))
        finally:
            task.set_gradient_checkpointing(False)
            if compiled:
                torch._dynamo.reset()  # the next compiled design traces its own flags
            opt = procs = trainable = task = batches = None  # (step() above closes over these names)
            unet.set_attn_processor(AttnProcessor2_0())
            dyn.face_encoder.to(dtype=dtype)
            free(device)

    def run_engine(design: str, cache, checkpointing: bool | str, compiled: bool, resume_row: bool) -> None:
        from benchmarks.train_engine import engine_row

        unet.set_attn_processor(AttnProcessor2_0())
        free(device)
        dataset = TrainerBatches(samples, batch, res, device, cache=cache, workers=0).loader.dataset
        with tempfile.TemporaryDirectory() as out:
            rows.extend(engine_row(design, backbone=backbone, dyn=dyn, model_params=params, dataset=dataset,
                                   cache=cache, device=device, batch=batch, res=res, steps=steps, out=Path(out),
                                   checkpointing=checkpointing, compiled=compiled, log=log, resume_row=resume_row))
        unet.set_attn_processor(AttnProcessor2_0())
        dyn.face_encoder.to(dtype=dtype)
        free(device)

    # frozen encoders in every step (encoders resident on the device)
    run_design("release design (autocast)", "release", "autocast")
    run_design("release design", "release", "bf16")
    run_design("project SAA, encoders every step", "project", "bf16")

    # the trainer as shipped: pre-pass into the cache, encoders off the device
    with tempfile.TemporaryDirectory() as tmp:
        dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
        positions = [s.position for s in samples]
        chunks = [samples[i:i + 2 * batch] for i in range(0, len(samples), 2 * batch)]
        for _ in range(1 if cuda else 0):  # warm the encoders' kernels: the pre-pass is timed warm
            encode_batch(backbone, chunks[0])
        sync()
        t0 = time.perf_counter()
        path = build_feature_cache(Path(tmp), "bench", positions, iter(chunks), backbone, dist)
        sync()
        info["cache_prepass_ms_per_image"] = round((time.perf_counter() - t0) * 1e3 / len(samples), 2)
        cache = FeatureCache(path)
        info["cache_bytes_per_image"] = sum(a.nbytes // max(1, a.shape[0]) for a in cache._maps(0).values())
        offload(backbone)
        free(device)
        run_design("release design, frozen features cached", "release", "bf16", cache=cache)
        run_design("project SAA, eager UNet", "project", "bf16", cache=cache)
        run_design("project SAA, eager UNet, gradient checkpointing", "project", "bf16", cache=cache,
                   checkpointing=True)
        run_design("project SAA, eager UNet, high_res checkpointing", "project", "bf16", cache=cache,
                   checkpointing="high_res")
        # the trainer as shipped on a GPU: cached features + train.compile_unet (auto = on for CUDA)
        # the last compiled row also resumes from its checkpoint (a warm compile cache): see train_engine.py
        run_design("project SAA", "project", "bf16", cache=cache, compiled=compile_unet and cuda,
                   resume_row=not compiled_checkpointing)
        for mode in compiled_checkpointing:  # compiled UNet + train.gradient_checkpointing
            mode_value: bool | str = {"true": True, "false": False}.get(mode, mode)
            label = "gradient checkpointing" if mode_value is True else f"{mode} checkpointing"
            run_design(f"project SAA, {label}" + ("" if compile_unet and cuda else " (eager)"), "project", "bf16",
                       cache=cache, checkpointing=mode_value, compiled=compile_unet and cuda,
                       resume_row=mode == compiled_checkpointing[-1])
    backbone = unet = dyn = None  # release the models (closures above refer to these names)
    free(device)
    return rows, info

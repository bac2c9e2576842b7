"""Stage-1 training throughput and peak memory: the project's SAA vs the release design.

The step is the project's own stage-1 objective, ``components.train.tasks.AnchorTask``
(frozen encoders every step: VAE posterior sample, CLIP ViT-H/14 face features, text
encoder; face encoder -> ID tokens; epsilon MSE through the UNet with SAA), on SD1.5-size
random-weight models, batch 8, 512 px, bf16 as the trainer runs it (frozen base and trainable
parts in bf16, fp32 master weights and AdamW moments: what DeepSpeed's bf16 mode keeps;
DeepSpeed itself is not installed on the benchmark machine, so a small equivalent optimizer
stands in). The release design runs the very same task with the release's processors put
into the UNet (unmerged rank-128 LoRA, full attention matrices, ...); only the attention
processors differ. If components.train is not importable, an equivalent step built from
model/ pieces is used and the JSON says so.
"""

from __future__ import annotations

import time
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


def _batch(backbone, batch: int, res: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    crop = backbone.image_size
    words = ["a photo of a person", "a portrait of a woman in a park", "a man with glasses, studio"]
    return {
        "slot": torch.arange(batch),
        "pixels": torch.rand(batch, 3, res, res, generator=g).to(device),
        "caption": [words[i % len(words)] for i in range(batch)],
        "face_crop": torch.rand(batch, 3, crop, crop, generator=g).to(device),
        "embedding": F.normalize(torch.randn(batch, 512, generator=g), dim=-1).to(device),
        "drop_text": torch.zeros(batch, dtype=torch.bool, device=device),
        "drop_id": torch.zeros(batch, dtype=torch.bool, device=device),
    }


def _task(backbone, dyn, params):
    """The trainer's stage-1 task, or (if components.train is unavailable) an equivalent one."""
    try:
        from components.train.tasks import AnchorTask

        return AnchorTask(backbone, dyn, params, seed=0), "components.train.tasks.AnchorTask"
    except ImportError:
        return _FallbackAnchor(backbone, dyn, params), "benchmarks.train_bench fallback step"


class _FallbackAnchor(torch.nn.Module):
    def __init__(self, backbone, dyn, params):
        super().__init__()
        self.backbone, self.dyn, self.saa = backbone, dyn, params.saa

    def forward(self, batch):
        from model.dynamicid import clip_image_features, text_embeddings
        from model.saa import IDContext

        bb = self.backbone
        with torch.no_grad():
            x = (batch["pixels"] * 2 - 1).to(bb.vae.dtype)
            latents = bb.vae.encode(x).latent_dist.sample() * bb.vae.config.scaling_factor
            text, _ = text_embeddings(bb, batch["caption"])
            clip = clip_image_features(bb, batch["face_crop"])
        fe = self.dyn.face_encoder
        tokens = fe(batch["embedding"].to(fe.id_norm.weight.dtype), clip.to(fe.id_norm.weight.dtype))
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        noisy = bb.scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(self.predict(noisy, t, text, tokens).float(), noise.float())
        return loss, {"loss": loss.detach()}

    def predict(self, noisy, t, text, tokens):
        from model.saa import IDContext

        unet = self.backbone.unet
        ctx = IDContext(num_ids=1, latent_hw=tuple(noisy.shape[-2:]), gating=self.saa.gating, tau=self.saa.tau)
        states = torch.cat([text.to(unet.dtype), tokens.to(unet.dtype)], dim=1)
        return unet(noisy, t, encoder_hidden_states=states, cross_attention_kwargs={"id_context": ctx}).sample


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
                 log: Callable, profile_dir=None) -> tuple[list[dict], dict]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from model.dynamicid import build_dynamicid, clip_image_features, text_embeddings
    from model.saa import install_saa

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = build_backbone(size, device, dtype)
    params = model_params(size)
    rank = params.active.lora_rank
    dyn = build_dynamicid(backbone, params, "insightface").to(device=device, dtype=dtype)  # installs SAA
    unet = backbone.unet
    data = _batch(backbone, batch, res, device)
    info: dict = {}
    rows = []

    with torch.no_grad():  # what the frozen encoders alone cost per step (the same in every design)
        def encoders():
            x = (data["pixels"] * 2 - 1).to(dtype)
            backbone.vae.encode(x).latent_dist.sample()
            text_embeddings(backbone, data["caption"])
            clip_image_features(backbone, data["face_crop"])
        for _ in range(2):
            encoders()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5):
            encoders()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        info["frozen_encoders_ms_per_step"] = round((time.perf_counter() - t0) * 200, 2)

    with torch.no_grad():  # frozen features once, for the "frozen features cached" variants
        cached_latents = backbone.vae.encode((data["pixels"] * 2 - 1).to(dtype)).latent_dist.sample()
        cached_latents = cached_latents * backbone.vae.config.scaling_factor
        cached_text, _ = text_embeddings(backbone, data["caption"])
        cached_clip = clip_image_features(backbone, data["face_crop"])

    def measure(design: str, step: Callable[[], torch.Tensor], trainable) -> dict:
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                loss = step()
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end) / steps
            peak = torch.cuda.max_memory_allocated(device) / GIB
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            ms, peak = (time.perf_counter() - t0) * 1e3 / steps, None
        row = {"section": "train", "variant": design, "res": res, "batch": batch, "step_ms": round(ms, 3),
               "images_per_s": round(batch * 1e3 / ms, 3), "peak_gib": None if peak is None else round(peak, 3),
               "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
               "loss_finite": bool(torch.isfinite(loss))}
        rows.append(row)
        log(f"train {design:<40}: {row['images_per_s']:8.2f} img/s, step {ms:8.1f} ms, peak {row['peak_gib']} GiB")
        return row

    # (row name, processors, precision, channels-last UNet, also the cached-features variant)
    designs = [
        ("release design (autocast)", "release", "autocast", False, False),
        ("release design", "release", "bf16", False, True),
        ("project SAA", "project", "bf16", False, True),
        ("project SAA [cl]", "project", "bf16", True, False),
    ]
    for design, kind, precision, cl, cached in designs:
        unet.set_attn_processor(AttnProcessor2_0())
        free(device)
        procs = install_release(unet, lora_rank=rank) if kind == "release" else install_saa(unet, lora_rank=rank)
        train_dtype = torch.float32 if precision == "autocast" else dtype
        procs.to(device=device, dtype=train_dtype).requires_grad_(True)
        dyn.face_encoder.to(dtype=train_dtype)
        if cl:
            unet.to(memory_format=torch.channels_last)
        task, source = _task(backbone, dyn, params)
        info["step_function"] = source
        dyn.face_encoder.requires_grad_(True)
        trainable = list(procs.parameters()) + list(dyn.face_encoder.parameters())
        fused = device.type == "cuda"
        opt = (PlainAdamW if precision == "autocast" else MasterAdamW)(trainable, 1e-4, 1e-2, fused)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast" and device.type == "cuda")

        def full_step() -> torch.Tensor:
            with amp:
                loss, _ = task(data)
            loss.backward()
            opt.step()
            return loss.detach()

        def cached_step() -> torch.Tensor:
            fe = dyn.face_encoder
            w = fe.id_norm.weight.dtype
            tokens = fe(data["embedding"].to(w), cached_clip.to(w))
            noise = torch.randn_like(cached_latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            noisy = backbone.scheduler.add_noise(cached_latents, noise, t)
            loss = F.mse_loss(task.predict(noisy, t, cached_text, tokens).float(), noise.float())
            loss.backward()
            opt.step()
            return loss.detach()

        row = measure(design, full_step, trainable)
        row["precision"] = precision
        if device.type == "cuda":  # the optimizer's share of the step
            with amp:
                loss, _ = task(data)
            loss.backward()
            torch.cuda.synchronize(device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            torch.cuda.synchronize(device)
            row["optimizer_ms"] = round(a.elapsed_time(b), 3)
        if profile_dir is not None and device.type == "cuda" and not cl:
            from pathlib import Path

            name = design.replace(" ", "_").replace("(", "").replace(")", "")
            row.update(profile_steps(full_step, Path(profile_dir) / f"profile_train_{name}.txt"))
        if cached:
            measure(design + ", frozen features cached", cached_step, trainable)["precision"] = precision
        del opt, procs, trainable, task
        unet.to(memory_format=torch.contiguous_format)
        unet.set_attn_processor(AttnProcessor2_0())
        dyn.face_encoder.to(dtype=dtype)
        free(device)
    del backbone, unet, dyn
    free(device)
    return rows, info

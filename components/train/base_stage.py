"""The base stage runner (tiny profile only): the VAE, then the UNet of the tiny text-to-image base.

Base starts from the seeded random tiny base; with the sd15 profile the base is the SD1.5
checkpoint and the stage only writes a marker (skip_base).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from components.train.checkpoints import CheckpointStore
from components.train.stage_run import (
    StageRun,
    _atomic_dir,
    _finish,
    _first_local,
    frozen_dtype,
    loss_summary,
    open_data,
    place,
    place_backbone,
    spread,
    train_dtype,
)

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)


def skip_base(params: "Params") -> int:
    """sd15: the base is the SD1.5 checkpoint. Writes a marker so the stage's outputs exist for DVC."""
    out = Path(params.train.base.output)
    (out / "export").mkdir(parents=True, exist_ok=True)
    reason = {"skipped": True, "reason": f"model.profile={params.model.profile}: the base is {params.model.sd15.base}"}
    (out / "export" / "skipped.json").write_text(json.dumps(reason, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps({"skipped": 1}, indent=2) + "\n")
    (out / "loss.tsv").write_text("step\tloss\n")
    log.warning("train --stage base: skipped (%s)", reason["reason"])
    return 0


def run_base(run: StageRun) -> dict[str, float]:
    from components.train.base_tasks import BaseUNetTask, VAETask, latent_scale
    from components.train.data import CaptionedImages
    from components.train.images import image_tensor
    from components.train.loop import FitSpec, fit
    from components.train.samples import base_grid, vae_grid
    from components.train.track import StageTracker
    from model.backbone import load_backbone, save_base, tiny_base_dir
    from model.loading import quiet_hf_progress

    params = run.params
    sp, dist, out, train = run.sp, run.dist, run.out, run.params.train
    quiet_hf_progress()
    root, data, split = open_data(params)
    tiny = params.model.tiny.model_copy(update={"base": None})
    seeded = _first_local(dist, lambda: tiny_base_dir(tiny, params.storage.cache_dir))
    bb = load_backbone(seeded)
    place_backbone(bb, dist.device, frozen_dtype(params, dist.device))
    place(bb.unet, dist.device, train_dtype(params))
    place(bb.vae, dist.device, train_dtype(params))
    res = tiny.resolution
    stores = {p: CheckpointStore(out / "checkpoints" / p, train.keep_checkpoints) for p in ("vae", "unet")}
    tracker = StageTracker(params, "base", out, dist.is_main)
    resuming = run.resume and any(s.latest() for s in stores.values()) or (run.resume and (out / "vae").is_dir())
    tracker.start(resume=resuming, extra_params={"world_size": dist.world_size})
    shown = [data.sample(p) for p in spread(data, split.heldout or split.train, train.sample_count)]
    metrics: dict[str, float] = {}
    with tracker.running():
        vae_dir = out / "vae"
        if sp.vae_steps > 0 and not (run.resume and (vae_dir / "config.json").exists()):
            task = VAETask(bb.vae, sp.vae_kl_weight, train.seed)
            spec = FitSpec(stage=sp, steps=sp.vae_steps, lr=sp.vae_lr, store=stores["vae"],
                           export=lambda d: bb.vae.save_pretrained(d), table="vae_loss.tsv", prefix="vae/",
                           sample=lambda step: vae_grid(bb.vae, shown, res), state={"stage": "base", "phase": "vae"})
            result = fit(task, CaptionedImages(root, split.train, train.seed, res), spec, params=params, dist=dist,
                         resume=run.resume, max_steps=run.max_steps, tracker=tracker)
            if not result.finished:
                tracker.finish()
                return {}
            scale = torch.zeros(1)
            if dist.is_main:
                pixels = torch.stack([image_tensor(data.sample(p).pixels, res) for p in split.train[:64]])
                scale[0] = latent_scale(bb.vae, pixels)
            if dist.world_size > 1:
                torch.distributed.broadcast(scale, src=0)
            bb.vae.register_to_config(scaling_factor=float(scale[0]))
            if dist.is_main:
                _atomic_dir(vae_dir, lambda d: bb.vae.save_pretrained(d))
            dist.barrier()
            metrics.update({"latent_scale": float(scale[0]), "vae_samples_per_s": result.samples_per_s})
            del result
        elif sp.vae_steps > 0:
            from diffusers import AutoencoderKL

            log.info("VAE phase already complete: %s", vae_dir)
            bb.vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True,
                                                   low_cpu_mem_usage=False).to(dist.device)
            metrics["latent_scale"] = float(bb.vae.config.scaling_factor)
        bb.vae.requires_grad_(False).eval()
        place(bb.vae, dist.device, frozen_dtype(params, dist.device))

        task = BaseUNetTask(bb, train.seed)

        def write_base(d: Path) -> None:
            save_base(d, unet=bb.unet, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                      image_encoder=bb.image_encoder, scheduler=bb.scheduler)

        spec = FitSpec(stage=sp, steps=sp.steps, lr=sp.lr, store=stores["unet"], export=write_base,
                       sample=lambda step: base_grid(bb, shown, params), state={"stage": "base", "phase": "unet"})
        result = fit(task, CaptionedImages(root, split.train, train.seed, res, sp.drop_caption), spec, params=params,
                     dist=dist, resume=run.resume, max_steps=run.max_steps, tracker=tracker)
        if result.finished and dist.is_main:
            export = _atomic_dir(out / "export", write_base)
            metrics.update(loss_summary(out / "loss.tsv"))
            metrics.update(loss_summary(out / "vae_loss.tsv", "vae_"))
            metrics.update({**result.speed_metrics(), "world_size": float(dist.world_size)})
            _finish(run, tracker, metrics, export)
        dist.barrier()
    return metrics

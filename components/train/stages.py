"""The three stages end to end: inputs -> task -> loop -> export, checks, metrics, MLflow.

Stage outputs (``train.<stage>.output``)::

    export/          base: the tiny base in diffusers layout (model.backbone.save_base);
                     anchor / reconfigure: the model package's checkpoint (model.checkpoint)
    checkpoints/     resumable DeepSpeed checkpoints (checkpoints.py); not a DVC output
    metrics.json     loss summary, throughput, learning-check numbers
    loss.tsv         one row per optimizer step (``dvc plots``); base also vae_loss.tsv
    samples/         sample grids (also in the MLflow run)
    mlflow_run.json  the run id (a resumed stage continues that run)

Where a stage starts from: base from the seeded random tiny base; anchor from
``model.tiny.base`` if set, else ``<train.base.output>/export`` if the base stage ran, else the
seeded random base (sd15: ``model.sd15``); reconfigure from ``<train.anchor.output>/export``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from components.core.errors import UserError
from components.train.checkpoints import CheckpointStore
from components.train.distributed import DistInfo

if TYPE_CHECKING:
    from components.core.config import Params
    from components.core.shards import PreparedData
    from components.train.data import Split

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StageRun:
    params: "Params"
    stage: str
    dist: DistInfo
    resume: bool = False
    max_steps: int | None = None

    @property
    def sp(self):
        return self.params.train.stage(self.stage)

    @property
    def out(self) -> Path:
        return Path(self.sp.output)


# --------------------------------------------------------------------------- shared helpers


def train_dtype(params: "Params") -> torch.dtype:
    return DTYPES[params.train.precision]


def frozen_dtype(params: "Params", device: torch.device) -> torch.dtype:
    """Frozen base models: half precision on GPU (bf16 next to bf16 training), fp32 on CPU."""
    name = params.train.frozen_dtype
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if params.train.precision == "bf16" else torch.float16


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move (and cast only when needed: diffusers warns on every dtype-carrying .to())."""
    if getattr(module, "dtype", None) == dtype:
        module.to(device)
    else:
        module.to(device=device, dtype=dtype)


def place_backbone(bb, device: torch.device, dtype: torch.dtype) -> None:
    for m in (bb.unet, bb.vae, bb.text_encoder, bb.image_encoder):
        place(m, device, dtype)


def _first_local(dist: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on local rank 0 first (downloads into a shared cache), then on the others."""
    if dist.local_rank == 0:
        value = fn()
        dist.barrier()
    else:
        dist.barrier()
        value = fn()
    return value


def resolved_params(run: StageRun) -> "Params":
    """s3:// model and data locations made local (downloaded once per machine)."""
    from components.core.runtime import resolve_model_paths
    from components.core.storage import is_s3, resolve_local

    def resolve() -> "Params":
        p = resolve_model_paths(run.params)
        if is_s3(p.data.prepared):
            p = p.model_copy(deep=True)
            p.data.prepared = str(resolve_local(p.data.prepared, p.storage.cache_dir, p.storage))
        return p

    return _first_local(run.dist, resolve)


def open_data(params: "Params") -> tuple[Path, "PreparedData", "Split"]:
    from components.core.shards import PreparedData
    from components.train.data import holdout_split

    root = Path(params.data.prepared)
    try:
        data = PreparedData(root)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data.prepared: {err}") from None
    split = holdout_split(data, params.train.holdout_per_identity)
    if not split.train:
        raise UserError(f"data.prepared = {root}: no samples in split 'train'")
    return root, data, split


def spread(data: "PreparedData", positions: list[int], count: int) -> list[int]:
    """Up to ``count`` positions from distinct identities first (sample grids show several people)."""
    seen: set[str] = set()
    first, rest = [], []
    for p in positions:
        (rest if data.index[p]["identity"] in seen else first).append(p)
        seen.add(data.index[p]["identity"])
    return (first + rest)[:count]


def loss_summary(path: Path, prefix: str = "") -> dict[str, float]:
    """First and final loss (means over 10% of the steps, 1..20) of a loss.tsv, and their ratio."""
    if not path.exists():
        return {}
    with open(path) as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh, delimiter="\t") if r.get("loss")]
    if not losses:
        return {}
    w = min(20, max(1, len(losses) // 10))
    first, final = sum(losses[:w]) / w, sum(losses[-w:]) / w
    return {f"{prefix}loss_first": first, f"{prefix}loss_final": final,
            f"{prefix}loss_ratio": final / first if first else 0.0, f"{prefix}steps": float(len(losses))}


def fp32_parts(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Exports are fp32 whatever the training precision (the loader casts to the serving dtype)."""
    return {name: {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
            for name, state in parts.items()}


def _finish(run: StageRun, tracker, metrics: dict[str, float], export_dir: Path | None) -> None:
    if export_dir is not None:
        tracker.log_artifacts(export_dir, "export")
    tracker.write_metrics(metrics)


def _atomic_dir(final: Path, write: Callable[[Path], Any]) -> Path:
    """Write a directory next to ``final`` and rename it into place (readers never see half of it)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- base (tiny only)


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
            bb.vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).to(dist.device)
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
            metrics.update({"samples_per_s": result.samples_per_s, "world_size": float(dist.world_size)})
            _finish(run, tracker, metrics, export)
        dist.barrier()
    return metrics


# --------------------------------------------------------------------------- anchor / reconfigure


def anchor_base(params: "Params") -> tuple[Path, Path | None]:
    """(base dir, image encoder dir or None) stage 1 starts from (see the module docstring)."""
    from model.loading import base_location

    if params.model.profile == "tiny" and not params.model.tiny.base:
        trained = Path(params.train.base.output) / "export"
        if (trained / "unet" / "config.json").exists():
            return trained, None
        log.warning("no trained tiny base at %s: stage 1 starts from the seeded random base "
                    "(run `dynamicid train --stage base` first for a base that draws faces)", trained)
    try:
        return base_location(params.model, params.storage.cache_dir)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None


def _check_embeddings(data: "PreparedData", dims, params: "Params") -> None:
    got = int(data.manifest.get("embedding_dim", 0))
    if got and got != dims.id_dim:
        raise UserError(f"data.prepared has {got}-d identity embeddings but face backend {dims.face_backend!r} "
                        f"gives {dims.id_dim}-d (face.backend={params.face.backend}): prepare and train must use "
                        "the same face backend")


def anchor_feature_cache(run: StageRun, bb, base: Path, enc: Path | None, root: Path, data: "PreparedData",
                         positions: list[int], resolution: int):
    """The stage-1 feature cache under ``<output>/feature_cache`` (built now, or reused), see
    components/train/feature_cache.py. Batches of ``micro_batch`` x 2 images per encoder call."""
    from components.train.feature_cache import cache_key, open_or_build, prepared_samples

    params, dist = run.params, run.dist
    image_encoder = (enc, [""]) if enc is not None else (base, ["image_encoder"])
    key = cache_key(encoders=[(base, ["vae", "text_encoder", "tokenizer"]), image_encoder],
                    data_hash=str(data.manifest.get("data_hash", "")), positions=positions, resolution=resolution,
                    dtype=bb.vae.dtype)
    size = max(1, 2 * run.sp.micro_batch)
    cache, _ = open_or_build(
        run.out / "feature_cache", key, positions,
        lambda mine: prepared_samples(root, mine, resolution, size, params.train.num_workers), bb, dist)
    return cache


def _with_encoders(bb, device: torch.device, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` wrapped so that the frozen encoders are on ``device`` while it runs (they live on the
    host while stage-1 steps train from cached features)."""
    from components.train.feature_cache import encoders_on

    def call(*args):
        with encoders_on(bb, device):
            return fn(*args)

    return call


def run_dynamicid_stage(run: StageRun) -> dict[str, float]:
    from components.train.checks import id_token_check, imr_check, motion_pairs
    from components.train.data import AnchorSamples, MotionPairs
    from components.train.loop import FitSpec, fit
    from components.train.samples import anchor_grid, reconfigure_grid
    from components.train.tasks import AnchorTask, ReconfigureTask
    from components.train.track import StageTracker
    from model.backbone import load_backbone
    from model.checkpoint import CheckpointError, load_parts, read_manifest, save_checkpoint
    from model.dynamicid import build_dynamicid
    from model.loading import quiet_hf_progress

    params = resolved_params(run)
    sp, dist, out, train = run.sp, run.dist, run.out, params.train
    quiet_hf_progress()
    root, data, split = open_data(params)
    backend = params.face.resolved_backend(params.model.profile)
    res = params.model.active.resolution

    if run.stage == "anchor":
        base, enc = _first_local(dist, lambda: anchor_base(params))  # may build the seeded base in the cache
        bb = load_backbone(base, enc)
        init = None
    else:
        init = Path(params.train.anchor.output) / "export"
        try:
            manifest = read_manifest(init)
        except CheckpointError as err:
            raise UserError(f"reconfigure starts from the stage-1 export: {err} (run `dynamicid train --stage anchor` "
                            "first, or point train.anchor.output at a stage-1 output)") from None
        if manifest["dims"].get("profile") != params.model.profile:
            raise UserError(f"{init} was trained for profile {manifest['dims'].get('profile')!r}, "
                            f"model.profile is {params.model.profile!r}")
        from model.loading import load_backbone_for

        bb = load_backbone_for(params.model, params.storage.cache_dir, checkpoint=init)
        base = bb.base_dir
    torch.manual_seed(train.seed)  # identical initial weights on every rank
    dyn = build_dynamicid(bb, params.model, backend)
    _check_embeddings(data, dyn.dims, params)
    if init is not None:
        manifest, parts = load_parts(init)
        missing = {"saa", "face_encoder"} - set(parts)
        if missing:
            raise UserError(f"{init}: the stage-1 export lacks {sorted(missing)}")
        dyn.load_parts(bb.unet, manifest, parts)
    place_backbone(bb, dist.device, frozen_dtype(params, dist.device))  # also casts the SAA processors in the UNet...
    dyn.to(dist.device, train_dtype(params))                             # ...which the trainable dtype overrides
    bundle = base if params.model.profile == "tiny" else None

    cached = run.stage == "anchor" and train.cache_features
    if run.stage == "anchor":
        compile_unet = train.compile_unet == "on" or (train.compile_unet == "auto" and dist.device.type == "cuda")
        task = AnchorTask(bb, dyn, params.model, train.seed, compile_unet=compile_unet)
        cache = None
        if cached:
            cache = anchor_feature_cache(run, bb, base, enc, root, data, split.train, res)
            task.use_cached_features(cache.constants(dist.device))
            from components.train.feature_cache import offload

            offload(bb)  # no frozen encoder runs in a step now
        dataset = AnchorSamples(root, split.train, train.seed, res, train.drop_text, train.drop_id, train.drop_both,
                                cache=cache)
        shown = spread(data, split.heldout or split.train, train.sample_count)
        sample = lambda step: anchor_grid(task, data, shown, params)  # noqa: E731
        if cached:
            sample = _with_encoders(bb, dist.device, sample)
        columns = ("loss", "lr", "samples_per_s")
    else:
        rp = params.train.reconfigure
        task = ReconfigureTask(bb, dyn, params.model, train.seed, prompt=rp.prompt, feature_weight=train.feature_weight,
                               denoise_weight=train.denoise_weight, contrastive_weight=train.contrastive_weight,
                               temperature=train.contrastive_temperature)
        try:
            dataset = MotionPairs(root, split.train, train.seed, res, dyn.dims.imr["landmark_size"],
                                  rp.targets_per_source, {p: data.index[p]["face_prompt"] for p in split.train},
                                  {p: data.index[p]["identity"] for p in split.train})
        except ValueError as err:
            raise UserError(f"data.prepared: {err}") from None
        pairs = motion_pairs(data, split, train.check_images)
        shown_pairs: list[tuple[int, int]] = []
        for pair in pairs:  # one pair per person in the grid
            if all(data.index[pair[1]]["identity"] != data.index[q[1]]["identity"] for q in shown_pairs):
                shown_pairs.append(pair)
        shown_pairs = shown_pairs[:train.sample_count]
        sample = (lambda step: reconfigure_grid(task, data, shown_pairs, params)) if shown_pairs else None
        columns = ("loss", "feature", "denoise", "contrastive", "lr", "samples_per_s")

    def export(d: Path) -> None:
        save_checkpoint(d, dyn.dims, fp32_parts(dyn.state_parts(bb.unet, task.export_parts)), base_dir=bundle,
                        extra={"stage": run.stage, "trained_from": str(init or base)})

    store = CheckpointStore(out / "checkpoints", train.keep_checkpoints)
    tracker = StageTracker(params, run.stage, out, dist.is_main)
    tracker.start(resume=run.resume and store.latest() is not None,
                  extra_params={"world_size": dist.world_size, "trained_from": str(init or base),
                                "trainable_parameters": sum(p.numel() for p in task.trainable_parameters())})
    metrics: dict[str, float] = {}
    with tracker.running():
        spec = FitSpec(stage=sp, steps=sp.steps, lr=sp.lr, store=store, export=export, columns=columns,
                       sample=sample, state={"stage": run.stage})
        result = fit(task, dataset, spec, params=params, dist=dist, resume=run.resume, max_steps=run.max_steps,
                     tracker=tracker)
        if result.finished and dist.is_main:
            final = out / "export"
            export(final)
            metrics.update(loss_summary(out / "loss.tsv"))
            metrics.update({"samples_per_s": result.samples_per_s, "world_size": float(dist.world_size)})
            n_check = train.check_images
            if n_check:
                task.eval()
                if run.stage == "anchor":
                    check = lambda: id_token_check(task, data, split.heldout[:n_check], resolution=res,  # noqa: E731
                                                   repeats=train.check_repeats, seed=train.seed)
                    metrics.update(_with_encoders(bb, dist.device, check)() if cached else check())
                else:
                    metrics.update(imr_check(task, data, pairs))
            _finish(run, tracker, metrics, final)
        dist.barrier()
    return metrics

"""The anchor (stage 1) and reconfigure (stage 2) stage runners: inputs -> task -> loop -> export, checks, metrics.

Where a stage starts from: anchor from ``model.tiny.base`` if set, else
``<train.base.output>/export`` if the base stage ran, else the seeded random base (sd15:
``model.sd15``); reconfigure from ``<train.anchor.output>/export``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from components.core.errors import UserError
from components.train.checkpoints import CheckpointStore
from components.train.stage_run import (
    StageRun,
    _finish,
    _first_local,
    fp32_parts,
    frozen_dtype,
    loss_summary,
    open_data,
    place_backbone,
    resolved_params,
    spread,
    train_dtype,
)

if TYPE_CHECKING:
    from components.core.config import Params
    from components.core.shards import PreparedData

log = logging.getLogger(__name__)


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
    from components.train.feature_cache import (
        cache_key,
        open_or_build,
        prepared_samples,
    )

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
    from components.train.checks import (
        CHECK_PARTS,
        check_record,
        heldout_people,
        id_token_check,
        imr_check,
        motion_pairs,
    )
    from components.train.data import AnchorSamples, MotionPairs
    from components.train.loop import FitSpec, fit
    from components.train.samples import anchor_grid, reconfigure_grid
    from components.train.tasks import AnchorTask, ReconfigureTask
    from components.train.track import StageTracker
    from model.backbone import load_backbone
    from model.checkpoint import (
        CheckpointError,
        load_parts,
        read_manifest,
        save_checkpoint,
    )
    from model.dynamicid import build_dynamicid
    from model.loading import quiet_hf_progress

    params = resolved_params(run)
    sp, dist, out, train = run.sp, run.dist, run.out, params.train
    quiet_hf_progress()
    root, data, split = open_data(params)
    backend = params.face.resolved_backend(params.model.profile)
    res = params.model.active.resolution

    def stage1_export(path: Path, what: str) -> Path:
        try:
            manifest = read_manifest(path)
        except CheckpointError as err:
            raise UserError(f"{what}: {err}") from None
        if manifest["dims"].get("profile") != params.model.profile:
            raise UserError(f"{path} was trained for profile {manifest['dims'].get('profile')!r}, "
                            f"model.profile is {params.model.profile!r}")
        return path

    if run.stage == "anchor":
        base, enc = _first_local(dist, lambda: anchor_base(params))  # may build the seeded base in the cache
        bb = load_backbone(base, enc)
        start = params.train.anchor.init_from
        init = None if start is None else stage1_export(Path(start), "train.anchor.init_from")
    else:
        init = stage1_export(Path(params.train.anchor.output) / "export",
                             "reconfigure starts from the stage-1 export (run `dynamicid train --stage anchor` first, "
                             "or point train.anchor.output at a stage-1 output)")
        from model.loading import load_backbone_for

        bb = load_backbone_for(params.model, params.storage.cache_dir, checkpoint=init)
        base = bb.base_dir
    torch.manual_seed(train.seed)  # identical initial weights on every rank
    dyn = build_dynamicid(bb, params.model, backend)
    _check_embeddings(data, dyn.dims, params)
    place_backbone(bb, dist.device, frozen_dtype(params, dist.device))  # also casts the SAA processors in the UNet...
    dyn.to(dist.device, train_dtype(params))                             # ...which the trainable dtype overrides
    if init is not None:  # loaded after the casts: through the frozen half precision they would come back rounded
        manifest, parts = load_parts(init)
        missing = {"saa", "face_encoder"} - set(parts)
        if missing:
            raise UserError(f"{init}: the stage-1 export lacks {sorted(missing)}")
        dyn.load_parts(bb.unet, manifest, parts)
    bundle = base if params.model.profile == "tiny" else None

    cached = run.stage == "anchor" and train.cache_features
    if run.stage == "anchor":
        compile_unet = train.compile_unet == "on" or (train.compile_unet == "auto" and dist.device.type == "cuda")
        if compile_unet:  # every rank, before its first compile: compilation is paid once per volume, not per start
            from components.train.compile_cache import use_compile_cache

            use_compile_cache(out)
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
        pairs = motion_pairs(data, heldout_people(data)[1], train.check_images)  # people never trained on
        shown_pairs: list[tuple[int, int]] = []
        for pair in pairs:  # one pair per person in the grid
            if all(data.index[pair[1]]["identity"] != data.index[q[1]]["identity"] for q in shown_pairs):
                shown_pairs.append(pair)
        shown_pairs = shown_pairs[:train.sample_count]
        sample = (lambda step: reconfigure_grid(task, data, shown_pairs, params)) if shown_pairs else None
        columns = ("loss", "feature", "denoise", "contrastive", "lr", "samples_per_s")

    # Learning-check verdicts travel with the weights: the reconfigure export carries the anchor's too, and the
    # gate is to read them from the evaluated checkpoint (issue 15, item 5).
    learning_checks: dict[str, dict] = dict(manifest.get("learning_checks") or {}) if init else {}

    def export(d: Path) -> None:
        save_checkpoint(d, dyn.dims, fp32_parts(dyn.state_parts(bb.unet, task.export_parts)), base_dir=bundle,
                        extra={"stage": run.stage, "trained_from": str(init or base),
                               "learning_checks": learning_checks})

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
            metrics.update(loss_summary(out / "loss.tsv"))
            metrics.update({**result.speed_metrics(), "world_size": float(dist.world_size)})
            n_check = train.check_images
            if n_check:
                task.eval()
                if run.stage == "anchor":
                    check = lambda: id_token_check(task, data, limit=n_check, resolution=res,  # noqa: E731
                                                   repeats=train.check_repeats, seed=train.seed)
                    found = _with_encoders(bb, dist.device, check)() if cached else check()
                else:
                    found = imr_check(task, data, limit=n_check)
                metrics.update(found)
                parts = fp32_parts(dyn.state_parts(bb.unet, CHECK_PARTS[run.stage]))
                learning_checks[run.stage] = check_record(run.stage, found, parts)
            export(final)
            _finish(run, tracker, metrics, final)
        dist.barrier()
    return metrics

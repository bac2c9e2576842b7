"""Stage-1 benchmark rows through the real trainer: ``components.train.loop.fit`` with the DeepSpeed engine.

Issue 17: the earlier rows timed ``AnchorTask`` with a stand-in bf16 AdamW; on an H200 the real
engine ran at 29-36 images/s against the 50 those rows claimed. Each row here is one call of the
trainer's own loop (DeepSpeed ZeRO-2 from ``deepspeed_config``, bf16 on a GPU, FusedAdam; the
slot sampler, a pinned DataLoader, the loop's burst reads of the losses, a checkpoint at the end),
and reports what the loop itself measures (components/train/throughput.py,
components/train/compile_cache.py):

* ``images_per_s``: the steady-state rate (windows after the first ``WARMUP_STEPS`` steps and without
  compilation), ``images_per_s_overall``: every step, compilation included, ``warmup_s``;
* ``compile_s``: time inside torch.compile during the run, with the FX-graph / AOTAutograd cache
  hits and misses (the cache lives under the row's output directory, as in the trainer);
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` over the whole run (the checkpoint save included).

``resume=True`` rows start a second run from the first one's checkpoint in the same output
directory after ``torch._dynamo.reset()`` (what a new process has: no traced frames), so their
``compile_s`` is the warm-cache cost a ``--resume`` pays. Inductor's in-process module cache
survives the reset, so a real new process can be somewhat slower to start than this row says.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from benchmarks.timing import GIB, free


def ensure_process_group(device: torch.device):
    """A one-process group as ``dynamicid train`` creates it (DeepSpeed needs one); returns the DistInfo."""
    import torch.distributed as dist

    from components.train.distributed import DistInfo, accelerator_env, init_distributed, quiet_other_ranks

    if dist.is_initialized():
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    accelerator_env()  # DS_ACCELERATOR=cpu before DeepSpeed is imported, on a CPU
    info = init_distributed(device.type)
    quiet_other_ranks(info)  # DeepSpeed's banners and start-up warnings, as `dynamicid train` keeps them out
    return DistInfo(rank=0, local_rank=0, world_size=1, device=device if device.type == "cpu" else info.device)


def engine_row(design: str, *, backbone, dyn, model_params, dataset, cache, device: torch.device, batch: int,
               res: int, steps: int, out: Path, checkpointing: bool | str, compiled: bool, log: Callable,
               resume_row: bool = False) -> list[dict]:
    """One trainer run (and optionally a resumed second run) of ``design``; returns its rows."""
    from components.core.config.train import AnchorStageParams, TrainParams
    from components.train.checkpoints import CheckpointStore
    from components.train.compile_cache import use_compile_cache
    from components.train.loop import FitSpec, fit
    from components.train.tasks import AnchorTask
    from components.train.throughput import WARMUP_STEPS
    from components.train.track import StageTracker
    from model.saa.install import install_saa

    cuda = device.type == "cuda"
    dist = ensure_process_group(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    run_steps = WARMUP_STEPS + steps                       # per run; a resume row runs as many again
    total = run_steps * (2 if resume_row else 1)
    train = TrainParams(precision="bf16" if cuda else "fp32", gradient_checkpointing=checkpointing,
                        compile_unet="on" if compiled else "off", log_every=steps, checkpoint_every=1 << 30,
                        sample_every=1 << 30, keep_checkpoints=1, num_workers=2 if cuda else 0,
                        anchor=AnchorStageParams(steps=total, micro_batch=batch, lr=1e-4, warmup_steps=2,
                                                 output=str(out)))
    params = SimpleNamespace(train=train)
    if compiled:
        use_compile_cache(out)
    dyn.saa = install_saa(backbone.unet, lora_rank=model_params.active.lora_rank).to(device=device, dtype=dtype)
    task = AnchorTask(backbone, dyn, model_params, seed=0, compile_unet=compiled)
    if cache is not None:
        task.use_cached_features(cache.constants(device))
    store = CheckpointStore(out / "checkpoints", keep=1)
    tracker = StageTracker(params, "anchor", out, enabled=False)
    spec = FitSpec(stage=train.anchor, steps=total, lr=train.anchor.lr, store=store, export=lambda d: None)
    rows: list[dict] = []
    trainable_m = round(sum(p.numel() for p in task.trainable_parameters()) / 1e6, 2)
    try:
        for resume in ([False, True] if resume_row else [False]):
            if resume:
                torch._dynamo.reset()  # a new process traces again; inductor/triton come from the cache
            free(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            result = fit(task, dataset, spec, params=params, dist=dist, resume=resume,
                         max_steps=run_steps * (2 if resume else 1), tracker=tracker)
            wall = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
            m = result.speed_metrics()
            steady = m.get("samples_per_s_steady") or m["samples_per_s_overall"]
            row = {"section": "train", "variant": design + (", resumed" if resume else ""), "res": res,
                   "batch": batch, "engine": "deepspeed", "zero_stage": train.zero_stage,
                   "step_ms": round(batch * 1e3 / steady, 3), "images_per_s": round(steady, 3),
                   "images_per_s_overall": round(m["samples_per_s_overall"], 3),
                   "steady_steps": int(m["steady_steps"]), "warmup_s": round(m["warmup_s"], 2),
                   "compile_s": round(m.get("compile_s", 0.0), 1),
                   "compile_cache": {k[len("compile_"):]: int(v) for k, v in m.items()
                                     if k.startswith("compile_") and k != "compile_s"},
                   "run_wall_s": round(wall, 1), "peak_gib": None if peak is None else round(peak, 3),
                   "trainable_params_m": trainable_m, "gradient_checkpointing": checkpointing,
                   "compiled_unet": compiled, "cached_features": cache is not None,
                   "loss_finite": bool(all(torch.isfinite(torch.tensor(result.losses)))),
                   "precision": train.precision}
            rows.append(row)
            log(f"train {row['variant']:<44}: {row['images_per_s']:8.2f} img/s steady "
                f"({row['images_per_s_overall']:.2f} overall), warm-up {row['warmup_s']} s, compile "
                f"{row['compile_s']} s {row['compile_cache'] or ''}, peak {row['peak_gib']} GiB")
            engine = result.engine
            if hasattr(engine, "destroy"):
                engine.destroy()
            del result, engine
    finally:
        task.set_gradient_checkpointing(False)
        if compiled:
            torch._dynamo.reset()
        del task
        free(device)
    return rows


def main(argv: list[str] | None = None) -> int:
    """One shipped-configuration row and its resume, without the rest of the train section:
    ``python -m benchmarks.train_engine [--size sd15] [--device cuda] [--eager] [--checkpointing high_res]``.
    Prints the rows as JSON (and writes them to ``--out``/train_engine.json when given)."""
    import argparse
    import json
    import tempfile

    from diffusers.models.attention_processor import AttnProcessor2_0

    from benchmarks.sd15 import build_backbone, model_params
    from benchmarks.train_bench import TrainerBatches, _raw_samples
    from components.train.distributed import DistInfo
    from components.train.feature_cache import FeatureCache, build_feature_cache, offload
    from model.dynamicid import build_dynamicid

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--size", default="smoke", choices=["smoke", "sd15"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 8 (sd15), 2 (smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the 3 warm-up steps (default 20 / 2)")
    p.add_argument("--checkpointing", default="auto", help="train.gradient_checkpointing: auto, high_res, true, false")
    p.add_argument("--eager", action="store_true", help="train.compile_unet: off")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sd15 = args.size == "sd15"
    batch, steps, res = args.batch or (8 if sd15 else 2), args.steps or (20 if sd15 else 2), 512 if sd15 else 64
    mode = {"true": True, "false": False}.get(args.checkpointing, args.checkpointing)
    if mode == "auto":
        mode = "high_res" if device.type == "cuda" else False
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = build_backbone(args.size, device, dtype)
    params = model_params(args.size)
    dyn = build_dynamicid(backbone, params, "insightface").to(device=device, dtype=dtype)
    samples = _raw_samples(backbone, 4 * batch, res)
    with tempfile.TemporaryDirectory() as tmp:
        dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
        chunks = iter([samples[i:i + 2 * batch] for i in range(0, len(samples), 2 * batch)])
        cache = FeatureCache(build_feature_cache(Path(tmp), "bench", [s.position for s in samples], chunks,
                                                 backbone, dist))
        offload(backbone)
        backbone.unet.set_attn_processor(AttnProcessor2_0())  # engine_row installs fresh SAA processors
        dataset = TrainerBatches(samples, batch, res, device, cache=cache, workers=0).loader.dataset
        rows = engine_row(f"project SAA ({args.size}, {'eager' if args.eager else 'compiled'}, checkpointing {mode})",
                          backbone=backbone, dyn=dyn, model_params=params, dataset=dataset, cache=cache,
                          device=device, batch=batch, res=res, steps=steps, out=Path(tmp) / "out",
                          checkpointing=mode, compiled=not args.eager, log=print, resume_row=True)
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_engine.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

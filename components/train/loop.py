"""The one training loop: a DeepSpeed engine around a Task, resumable step for step.

Step numbers are optimizer steps, 1-based in logs and checkpoints (``step-000050`` holds the
state after 50 updates). The data order and all randomness are functions of (seed, step)
(see ``data``), and the DeepSpeed checkpoint restores weights, optimizer moments and the
scheduler, so a run resumed at step s reproduces the uninterrupted run from step s on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from components.core.errors import UserError
from components.train.checkpoints import DS_TAG, CheckpointRef, CheckpointStore
from components.train.compile_cache import CompileWatch
from components.train.data import SlotBatches, collate, to_device
from components.train.deepspeed_config import deepspeed_config
from components.train.distributed import DistInfo
from components.train.throughput import Throughput

if TYPE_CHECKING:
    from PIL import Image

    from components.core.config import Params
    from components.core.config.train import StageParams
    from components.train.tasks import Task
    from components.train.track import StageTracker

log = logging.getLogger(__name__)


@dataclass
class FitSpec:
    """What one run of the loop trains and where its checkpoints go."""

    stage: "StageParams"
    steps: int
    lr: float
    store: CheckpointStore
    export: Callable[[Path], None]          # writes the trainable parts' export into a directory (rank 0)
    table: str = "loss.tsv"                 # per-step rows in <output>/<table>
    columns: tuple[str, ...] = ("loss", "lr", "samples_per_s")
    prefix: str = ""                        # MLflow metric prefix (the base stage's VAE phase: "vae/")
    sample: Callable[[int], "Image.Image | None"] | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    start: int                               # step the run (re)started from
    step: int                                # last completed step
    finished: bool                           # reached spec.steps (not stopped by --max-steps)
    losses: list[float]                      # mean loss of every step run now (all ranks averaged)
    samples_per_s: float                     # all-in: every step run now, warm-up and compilation included
    wall_s: float
    engine: Any = None
    throughput: Throughput | None = None     # overall and steady-state rates (components/train/throughput.py)
    compile: dict[str, float] = field(default_factory=dict)  # compile_s, events, cache hits (compile_cache.py)

    def speed_metrics(self, prefix: str = "") -> dict[str, float]:
        """What metrics.json and MLflow get: overall / steady images per second, warm-up and compile time."""
        out = self.throughput.metrics(prefix) if self.throughput is not None else {
            f"{prefix}samples_per_s": self.samples_per_s}
        return {**out, **{f"{prefix}{k}": v for k, v in self.compile.items()}}


def global_batch(stage: "StageParams", world: int) -> int:
    return stage.micro_batch * stage.grad_accum * world


@contextlib.contextmanager
def gathered(engine) -> Iterator[None]:
    """Full parameters on every rank while exporting (only ZeRO-3 partitions them)."""
    if engine is not None and engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def _check_resume(state: dict[str, Any], want: dict[str, Any], where: Path) -> None:
    """The data order and the schedule are functions of these: a resume with other values would not continue
    the same run."""
    bad = [f"{k}: checkpoint {state.get(k)}, now {v}" for k, v in want.items() if state.get(k) != v]
    if bad:
        raise UserError(f"cannot resume from {where}: " + "; ".join(bad) + " (resume with the same steps, lr, "
                        "micro_batch, grad_accum, seed and number of processes, or start fresh without --resume)")


def resume_point(store: CheckpointStore, dist: DistInfo, resume: bool) -> CheckpointRef | None:
    """The checkpoint every process resumes from (collective). Each process picks the newest complete one
    itself; if they disagree (several machines, each with its own disk) they would train different runs, so
    all of them stop with the same error instead."""
    ref = store.latest() if resume else None
    lo, hi = dist.min_max(ref.step if ref is not None else 0)
    if lo != hi:
        raise UserError(f"the processes see different checkpoints in {store.root} (steps {lo} to {hi}): "
                        "the stage's output must be on storage every process sees (a ReadWriteMany volume)")
    return ref


def fit(task: "Task", dataset, spec: FitSpec, *, params: "Params", dist: DistInfo, resume: bool,
        max_steps: int | None, tracker: "StageTracker") -> FitResult:
    import deepspeed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    train = params.train
    mode = train.checkpointing_for(dist.device.type)
    ckpt = task.set_gradient_checkpointing(mode)  # the one place the mode is applied (resets earlier flags)
    if ckpt:
        log.info("gradient checkpointing (%s): %d UNet modules recompute activations in backward", mode, len(ckpt))
    cfg = deepspeed_config(train, spec.stage, device_type=dist.device.type, lr=spec.lr, steps=spec.steps)
    engine, _, _, scheduler = deepspeed.initialize(model=task, model_parameters=task.trainable_parameters(),
                                                   config=cfg, dist_init_required=False)
    start = 0
    identity = {"steps": spec.steps, "lr": spec.lr, "seed": train.seed, "world_size": dist.world_size,
                "global_batch": global_batch(spec.stage, dist.world_size)}
    ref = resume_point(spec.store, dist, resume)
    if ref is not None:
        _check_resume(ref.state(), identity, ref.path)
        path, _ = engine.load_checkpoint(str(ref.deepspeed_dir), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise UserError(f"DeepSpeed could not load {ref.deepspeed_dir}")
        start = ref.step
        if engine.global_steps != start:
            raise UserError(f"{ref.path}: DeepSpeed state is at step {engine.global_steps}, state.json says {start}")
        log.info("resumed %s at step %d from %s", task.name, start, ref.path)
        if dist.is_main:  # after the collective above no process is still choosing a checkpoint
            spec.store.remove_leftovers()
    else:
        # DeepSpeed's WarmupCosineLR gives 0 before its first step(); advance it once so that
        # optimizer step s uses the schedule's value s (the checkpoint keeps this alignment).
        scheduler.step()
        if dist.is_main:
            spec.store.clear()
        dist.barrier()
    stop = spec.steps if max_steps is None else max(start, min(spec.steps, max_steps))
    mb, accum = spec.stage.micro_batch, spec.stage.grad_accum
    sampler = SlotBatches(start, stop, rank=dist.rank, world=dist.world_size, micro_batch=mb, accum=accum)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=train.num_workers,
                        pin_memory=dist.device.type == "cuda")
    tracker.loss_table(spec.table, list(spec.columns), start)
    state = {**spec.state, **identity, "mlflow_run_id": tracker.run_id}
    n_global = global_batch(spec.stage, dist.world_size)
    losses: list[float] = []
    meter = Throughput(images_per_step=n_global, start=start)
    watch = CompileWatch().start()  # tells compile windows from steady ones; stopped in the finally below
    t_start = time.perf_counter()
    bar = tqdm(total=stop, initial=start, desc=f"train {task.name}", disable=not dist.is_main, dynamic_ncols=True,
               mininterval=1.0)
    # Per-step values stay on the device until a flush (every log_every steps, before a checkpoint
    # or a sample grid, at the end): one transfer for the whole burst instead of a host wait every
    # step, so the host keeps queueing steps ahead of the GPU. Every step's row is still written.
    pending: list[tuple[int, float, list[str], torch.Tensor]] = []  # (step, lr, keys, values [len(keys)])
    t_mark = time.perf_counter()
    events_mark = watch.events

    def flush() -> dict[str, float]:
        flat = torch.cat([v for *_, v in pending]).cpu().tolist()  # the burst's one host read (waits for the device)
        seconds = time.perf_counter() - t_mark
        window = meter.add(first=pending[0][0], steps=len(pending), seconds=seconds,
                           compiled=watch.events != events_mark)
        if window.compiled:  # the first compile, or a recompilation mid-run (left out of the steady rate)
            log.info("steps %d-%d: %s", window.first, window.first + window.steps - 1, watch.describe())
        dt = seconds / len(pending)  # mean wall time per step of the burst
        at = 0
        for done, lr, keys, _ in pending:
            record = dict(zip(keys, flat[at:at + len(keys)]))
            at += len(keys)
            record.update(lr=lr, samples_per_s=n_global / dt)
            losses.append(record["loss"])
            tracker.log_step(done, record, spec.table, spec.prefix)
        bar.update(len(pending))
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        pending.clear()
        return record

    try:
        batches = iter(loader)
        for step in range(start, stop):
            lr = float(engine.get_lr()[0])
            sums: dict[str, torch.Tensor] = {}
            for _ in range(accum):
                batch = to_device(next(batches), dist.device)
                loss, parts = engine(batch)
                engine.backward(loss)
                engine.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
            keys = sorted(sums)
            values = torch.stack([sums[k] for k in keys]) / accum  # [len(keys)], on the device
            if dist.world_size > 1:
                torch.distributed.all_reduce(values)
                values = values / dist.world_size
            done = step + 1
            pending.append((done, lr, keys, values))
            save = done % train.checkpoint_every == 0 or done == stop
            draw = dist.is_main and spec.sample is not None and done % train.sample_every == 0
            # the end of the warm-up is flushed too, so that no timing window straddles it (throughput.py)
            if not (save or draw or done % train.log_every == 0 or done == meter.warmup_end):
                continue
            flush()
            if done % train.log_every == 0:
                tracker.flush()
            if save:
                with gathered(engine):
                    spec.store.save(engine, done, state, spec.export, dist)
            if draw:
                image = spec.sample(done)
                if image is not None:
                    tracker.log_image(image, f"{spec.prefix.strip('/') or task.name}_step{done:06d}.png")
            t_mark = time.perf_counter()  # checkpoints and sample grids do not count as step time
            events_mark = watch.events
    finally:
        watch.stop()
    bar.close()
    compiled = watch.metrics() if watch.events else {}
    if stop > start:
        log.info("%s: %s%s", task.name, meter.describe(), f"; {watch.describe()}" if watch.events else "")
        # every start (resume included) leaves its own numbers in the run's history; metrics.json has the last
        tracker.log_metrics({f"{spec.prefix}throughput/{k}": v for k, v in {**meter.metrics(), **compiled}.items()},
                            step=stop)
    tracker.flush()
    return FitResult(start=start, step=stop, finished=stop == spec.steps, losses=losses,
                     samples_per_s=meter.overall, wall_s=time.perf_counter() - t_start, engine=engine,
                     throughput=meter, compile=compiled)

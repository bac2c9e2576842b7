"""``dynamicid train``: decide how to run (here, or re-launched under torchrun), set up the
process group, run the stage, tear down."""

from __future__ import annotations

import argparse
import logging

from components.core.errors import UserError

log = logging.getLogger(__name__)


def preflight(params, stage: str) -> None:
    """Fail before any process group exists when an input is plainly missing (local paths only;
    s3:// inputs are resolved, and checked, by the stage itself)."""
    from pathlib import Path

    from components.core.storage import is_s3

    prepared = params.data.prepared
    if not is_s3(prepared) and not (Path(prepared) / "manifest.json").exists():
        raise UserError(f"data.prepared = {prepared}: no prepared data there (run `dynamicid prepare`)")
    if stage == "reconfigure":
        export = Path(params.train.anchor.output) / "export"
        if not (export / "manifest.json").exists():
            raise UserError(f"reconfigure starts from the stage-1 export, but {export} has none "
                            "(run `dynamicid train --stage anchor` first, or point train.anchor.output at one)")


def run_stage_command(args: argparse.Namespace, params) -> int:
    from components.train import distributed

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.nproc > 1 and not distributed.under_torchrun():
        return distributed.relaunch(args, args.nproc)
    if args.stage == "base" and params.model.profile != "tiny":
        from components.train.stages import skip_base

        return skip_base(params)

    preflight(params, args.stage)
    device_type = distributed.accelerator_env()
    if params.train.precision == "fp16" and device_type != "cuda":
        raise UserError("train.precision: fp16 needs a GPU (no loss scaling on CPU); use bf16 or fp32")
    info = distributed.init_distributed(device_type)
    distributed.quiet_other_ranks(info, getattr(args, "verbose", 0) or 0)
    from components.train.stages import StageRun, run_base, run_dynamicid_stage

    run = StageRun(params=params, stage=args.stage, dist=info, resume=args.resume, max_steps=args.max_steps)
    try:
        metrics = run_base(run) if args.stage == "base" else run_dynamicid_stage(run)
    finally:
        distributed.shutdown()
    if info.is_main and metrics:
        shown = {k: round(v, 5) for k, v in metrics.items() if "loss" in k or "gain" in k or "win_rate" in k}
        print(f"train {args.stage}: {shown}", flush=True)
    return 0

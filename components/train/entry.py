"""``dynamicid train``: the CLI hook and the stage command (here or under torchrun, process group, run, tear down).

Only argument parsing happens at import: torch, deepspeed and mlflow are imported inside the
functions of the stage runners (components.train.base_stage, components.train.dynamicid_stage),
so ``dynamicid --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging

from components.core.errors import UserError

log = logging.getLogger(__name__)

STAGES = ("base", "anchor", "reconfigure")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a stage: base (tiny only), anchor (stage 1) or reconfigure (stage 2)",
        description=(
            "Train one stage with DeepSpeed on the prepared data (data.prepared). base: the tiny text-to-image "
            "base (VAE, then UNet; the sd15 profile skips it). anchor: face encoder + SAA + LoRA on a frozen base. "
            "reconfigure: IMR + keypoint encoder on the frozen anchor export. Writes <train.STAGE.output>/export "
            "(the model package's checkpoint), checkpoints/ (for --resume), metrics.json and loss.tsv, and logs "
            "an MLflow run. Without torchrun it runs as one process; --nproc N starts N processes under torchrun; "
            "for several nodes run it under torchrun yourself (docs/training.md)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint (starts fresh when there is none)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine; > 1 re-launches under torchrun (ignored inside torchrun)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this optimizer step (checkpointed; the schedule still spans "
                        "train.STAGE.steps, so --resume continues the same run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, params) -> int:
    return run_stage_command(args, params)


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
    from components.core.config.weights import check_stage_weights

    check_stage_weights(params, "train", stage=args.stage)  # before torchrun, a process group or any data
    if args.nproc > 1 and not distributed.under_torchrun():
        return distributed.relaunch(args, args.nproc)
    if args.stage == "base" and params.model.profile != "tiny":
        from components.train.base_stage import skip_base

        return skip_base(params)
    if args.stage == "base" and params.train.base.pretrained:
        from components.train.pretrained_base import install_pretrained_base

        return install_pretrained_base(params)

    preflight(params, args.stage)
    device_type = distributed.accelerator_env()
    if params.train.precision == "fp16" and device_type != "cuda":
        raise UserError("train.precision: fp16 needs a GPU (no loss scaling on CPU); use bf16 or fp32")
    info = distributed.init_distributed(device_type)
    distributed.quiet_other_ranks(info, getattr(args, "verbose", 0) or 0)
    from components.train.base_stage import run_base
    from components.train.dynamicid_stage import run_dynamicid_stage
    from components.train.stage_run import StageRun

    run = StageRun(params=params, stage=args.stage, dist=info, resume=args.resume, max_steps=args.max_steps)
    try:
        metrics = run_base(run) if args.stage == "base" else run_dynamicid_stage(run)
    finally:
        distributed.shutdown()
    if info.is_main and metrics:
        shown = {k: round(v, 5) for k, v in metrics.items() if "loss" in k or "gain" in k or "win_rate" in k}
        print(f"train {args.stage}: {shown}", flush=True)
    return 0

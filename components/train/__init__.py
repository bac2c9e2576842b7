"""``dynamicid train --stage base|anchor|reconfigure``: the training stages (DeepSpeed).

Only argument parsing lives here: torch, deepspeed and mlflow are imported inside the
functions of the submodules, so ``dynamicid --help`` stays fast.
"""

from __future__ import annotations

import argparse

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
    from components.train.entry import run_stage_command

    return run_stage_command(args, params)

"""Process-group setup for every way a training stage is started.

* plain ``dynamicid train`` (no ``WORLD_SIZE`` in the environment): one process; we write the
  torchrun-style variables ourselves, because DeepSpeed insists on ``LOCAL_RANK``;
* ``dynamicid train --nproc N``: re-executes itself under ``torch.distributed.run`` (torchrun)
  with N processes on this machine;
* ``torchrun --nnodes ... -m components.cli train ...`` (a Kubernetes PyTorchJob): torchrun has
  set the variables; we only join.

DeepSpeed picks its accelerator when it is first imported, so ``DS_ACCELERATOR=cpu`` must be
in the environment before that import on a machine without CUDA (``accelerator_env``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    import torch

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: "torch.device"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def min_max(self, value: int) -> tuple[int, int]:
        """The smallest and largest ``value`` over all processes (collective), to check that they agree."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or self.world_size == 1:
            return value, value
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -int(both[1]), int(both[0])


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def accelerator_env() -> str:
    """'cuda' or 'cpu'; on a machine without CUDA sets DS_ACCELERATOR=cpu (before deepspeed is imported)."""
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda":
        arch = deepspeed_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        if arch is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        return "cuda"
    if "deepspeed" in sys.modules and os.environ.get("DS_ACCELERATOR") != "cpu":
        # Something imported deepspeed already: its accelerator choice is fixed now.
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError("deepspeed was imported before DS_ACCELERATOR=cpu could be set on a CPU-only machine")
    os.environ["DS_ACCELERATOR"] = "cpu"
    return "cpu"


def deepspeed_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT op builder can read it, or None when it already can.

    CUDA images set architecture-specific targets such as ``9.0a`` (sm_90a); DeepSpeed 0.19 parses every part of
    an entry as an integer and stops FusedAdam's build with "invalid literal for int() with base 10: '0a'" (seen
    on an H200). The plain ``9.0`` target runs on the same GPU; ``+PTX`` is kept.
    """
    if not value:
        return None
    entries = [e for e in value.replace(" ", ";").split(";") if e]
    fixed = []
    for e in entries:
        cc, ptx = (e.split("+", 1) + [""])[:2]
        cc = ".".join(part.rstrip("abcdefghijklmnopqrstuvwxyz") for part in cc.split("."))
        fixed.append(cc + ("+" + ptx if ptx else ""))
    fixed = list(dict.fromkeys(fixed))
    return None if fixed == entries else ";".join(fixed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device_type: str) -> DistInfo:
    """Join (or, outside torchrun, create) the process group: nccl on GPU, gloo on CPU."""
    import torch

    if not under_torchrun():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    import deepspeed

    import contextlib
    import io

    if device_type == "cuda":  # bound to its GPU from the start (DeepSpeed then joins this group): without a
        # device_id NCCL guesses the device from the rank and every barrier warns (seen on an H100, 2026-12-05)
        import torch.distributed as tdist

        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        tdist.init_process_group("nccl", device_id=torch.device("cuda", local))
    # On a CPU DeepSpeed print()s "deepspeed_shm_comm_op built successfully" at every start (verbose=False does not
    # cover it): a build notice, kept out of the output; errors still raise.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", verbose=False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks(info: DistInfo, verbose: int = 0) -> None:
    """Rank 0 logs at the CLI's level; every other rank only reports errors.

    DeepSpeed logs a banner per engine at INFO and a spurious scheduler warning at start-up;
    it reports errors only unless -v (warnings) or -vv (everything) is given.
    """
    ds_level = {0: logging.ERROR, 1: logging.WARNING}.get(verbose, logging.DEBUG)
    if not info.is_main:
        logging.getLogger().setLevel(logging.ERROR)
        ds_level = logging.ERROR
        warnings.filterwarnings("ignore")
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(ds_level)
    except ImportError:  # pragma: no cover - deepspeed is a train dependency
        pass
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def torchrun_command(args: "argparse.Namespace", nproc: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m components.cli ... train ...``."""
    cli: list[str] = ["-v"] * int(getattr(args, "verbose", 0) or 0)
    if getattr(args, "params", None):
        cli += ["--params", str(args.params)]
    cli += [f"--set={o}" for o in getattr(args, "overrides", []) or []]
    cli += ["train", "--stage", args.stage]
    if args.resume:
        cli.append("--resume")
    if args.max_steps is not None:
        cli += ["--max-steps", str(args.max_steps)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "components.cli", *cli]


def relaunch(args: "argparse.Namespace", nproc: int) -> int:
    """Run this command again under torchrun with ``nproc`` processes; returns torchrun's exit code."""
    import subprocess

    accelerator_env()  # children inherit DS_ACCELERATOR
    cmd = torchrun_command(args, nproc)
    log.info("re-launching under torchrun: %s", " ".join(cmd))
    return subprocess.run(cmd, env=os.environ.copy(), check=False).returncode

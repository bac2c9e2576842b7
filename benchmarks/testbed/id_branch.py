"""How much does SAA's ID branch add to the UNet, and how much of that depends on who the person is? (issue 16)

``id_signal`` says whether identity is worth anything in the stage-1 loss. When it is worth nothing, this reading
says which of two things happened: the branch adds a large, person-dependent term that the UNet cannot use, or
training shrank the branch until it adds little at all. At every SAA cross-attention of the UNet it records, per
query position, the norm of the text branch's output (before the output projection), the norm of what the ID
branch adds to it (``id_scale * a(q) * softmax(S) V_id``) and the norm of the change in that addition when the same
noisy image is given another person's tokens (``id_by_person``: the part that depends on who the person is);
averaged over positions, layers and people, at several timesteps, with the empty prompt so that only the ID tokens
condition the image. ``id_gain`` is the loss with the next person's tokens minus with another photo of the same
person; ``id_gain_same_photo`` the same with the image's own face crop, as stage 1 trains (a branch that only copies
the photo, its background or pose, gains there and not in ``id_gain``).

    python -m benchmarks.testbed.id_branch --checkpoint runs/anchor/export [--people 16] [--timesteps 100 500 900]
    python -m benchmarks.testbed.id_branch --checkpoint init ...        (freshly initialised parts, seed as params)

Prints one JSON object; ``--params`` and ``-S`` as for ``dynamicid``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def recording(unet) -> Iterator[list[tuple[float, "torch.Tensor"]]]:
    """Within the block, each SAA processor's ID-branch call appends (the text output's mean norm, the ID branch's
    addition [B, HW, inner]) to the yielded list, in call order. Patches the processor instances only, and undoes
    it on exit."""
    from model.saa.processor import SAAAttnProcessor

    rows: list[tuple[float, "torch.Tensor"]] = []
    procs = [p for p in unet.attn_processors.values() if isinstance(p, SAAAttnProcessor)]

    def wrap(proc):
        inner = proc._add_id_branch

        def add(out, attn, query, ids, ctx, grid):
            res = inner(out, attn, query, ids, ctx, grid)  # [B, HW, inner]
            rows.append((float(out.norm(dim=-1).mean()), (res - out).detach()))
            return res
        return add

    for proc in procs:
        proc._add_id_branch = wrap(proc)
    try:
        yield rows
    finally:
        for proc in procs:
            del proc._add_id_branch  # the class's method again


def measure_task(task, data, people: int, timesteps: list[int], resolution: int, seed: int = 0) -> dict:
    """The reading of the module docstring for an ``AnchorTask``: one photo per person of the training split as the
    image, another photo of the same person as the reference."""
    import torch

    from components.train.checks import photo_tokens
    from components.train.images import image_tensor
    from components.train.losses import SampleRandom, encode_latents, per_sample_mse
    from model.dynamicid import text_embeddings

    bb = task.backbone
    groups = data.identities("train")
    names = sorted(n for n in groups if len(groups[n]) > 1)[:people]
    if len(names) < 2:
        raise ValueError("the training split has fewer than 2 people with two photos")
    out: dict = {"people": len(names), "timesteps": {}}
    with torch.no_grad():
        got = [data.sample(groups[n][0]) for n in names]
        pixels = torch.stack([image_tensor(s.pixels, resolution) for s in got])
        latents = encode_latents(bb.vae, pixels, SampleRandom(list(range(len(got)))))
        text = text_embeddings(bb, [""] * len(got))[0]
        own = photo_tokens(task, data, [groups[n][1] for n in names])  # [P, K, D]
        other = torch.roll(own, 1, 0)  # the next person's
        same = photo_tokens(task, data, [groups[n][0] for n in names])  # the image's own crop, as stage 1 trains
        for step in timesteps:
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + step))
            t = torch.full((len(got),), step, dtype=torch.long)
            noisy = bb.scheduler.add_noise(latents, noise, t)
            with recording(bb.unet) as mine:
                loss_own = float(per_sample_mse(task.predict(noisy, t, text, own), noise).mean())
            with recording(bb.unet) as theirs:
                loss_other = float(per_sample_mse(task.predict(noisy, t, text, other), noise).mean())
            loss_same = float(per_sample_mse(task.predict(noisy, t, text, same), noise).mean())
            out["timesteps"][str(step)] = {
                "text_out": float(np.mean([n for n, _ in mine])),
                "id_out": float(np.mean([float(a.norm(dim=-1).mean()) for _, a in mine])),
                "id_by_person": float(np.mean([float((a - b).norm(dim=-1).mean())
                                               for (_, a), (_, b) in zip(mine, theirs, strict=True)])),
                "loss_own": loss_own, "id_gain": loss_other - loss_own, "id_gain_same_photo": loss_other - loss_same}
    return out


def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params
    from components.core.shards import PreparedData

    from benchmarks.testbed.id_signal import anchor_task, reading_parser

    p = reading_parser(__doc__)
    p.add_argument("--people", type=int, default=16)
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    args = p.parse_args(argv)
    params = load_params(args.params, args.overrides)
    task = anchor_task(params, None if args.checkpoint == "init" else args.checkpoint).eval()
    res = measure_task(task, PreparedData(params.data.prepared), args.people, args.timesteps,
                       params.model.tiny.resolution)
    json.dump({"checkpoint": args.checkpoint, **res}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

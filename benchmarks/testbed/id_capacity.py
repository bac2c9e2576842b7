"""Can stage 1's ID pathway carry identity at all? A capacity check for the test bed (issue 16).

On the full test bed, 2-core stage-1 runs end with tokens that move together and no identity gain
(docs/evaluation.md). That could be a broken pathway (a detached gradient, a gate that shuts the branch)
or too little training. This tool separates the two: it fits stage 1's objective (face encoder + SAA +
LoRA, epsilon MSE with the photo's own face crop, as in training) on ONE photo each of a few people,
and reads, every few steps, the loss on those photos with each photo's own tokens and with another
person's (the same noise and timesteps in both columns). A working pathway memorises who is who: the
gain grows. A captioned run shows how much of the identity the captions already give away.

    python -m benchmarks.testbed.id_capacity --people 8 --steps 300 [--caption] [--lr 1e-3]

Prints one JSON object per reading; ``--params`` and ``-S`` as for ``dynamicid``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterator


def fit_task(task, data, *, people: int, steps: int, lr: float, caption: bool, readings: int = 5,
             resolution: int, repeats: int = 6) -> Iterator[dict]:
    """Fit ``task`` (an ``AnchorTask``) on one photo of each of ``people`` training people; yield readings."""
    import torch

    from benchmarks.testbed.id_signal import relative_spread
    from components.train.images import image_tensor
    from components.train.losses import SampleRandom, encode_moments, mse, noised, per_sample_mse, posterior_sample
    from model.dynamicid import clip_image_features, text_embeddings

    bb = task.backbone
    groups = data.identities("train")
    if len(groups) < 2 or people < 2:
        raise ValueError(f"need at least 2 people, the train split has {len(groups)} and {people} were asked for")
    samples = [data.sample(groups[name][0]) for name in sorted(groups)[:people]]
    n = len(samples)
    embeddings = torch.stack([torch.from_numpy(s.embedding.copy()) for s in samples])  # [n, D]
    # the frozen encoders run once, as with the trainer's feature cache; every step draws its own latent sample
    moments = encode_moments(bb.vae, torch.stack([image_tensor(s.pixels, resolution) for s in samples]))
    clip = clip_image_features(bb, torch.stack([image_tensor(s.face_crop) for s in samples]))  # [n, L, clip_dim]
    with torch.no_grad():
        text = text_embeddings(bb, [s.caption if caption else "" for s in samples])[0]  # [n, 77, D]
    scaling = bb.vae.config.scaling_factor
    other = torch.roll(torch.arange(n), 1)  # each photo read with the next person's tokens
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=lr, weight_decay=0.01)
    start = time.time()

    def reading(step: int) -> dict:
        task.eval()
        own = wrong = 0.0
        with torch.no_grad():
            tokens = task.encode_faces(embeddings, clip)  # [n, K, D]
            spread = relative_spread(tokens.flatten(1).double().numpy())
            for r in range(repeats):
                rand = SampleRandom([10_000_000 + 97 * r + j for j in range(n)])
                noisy, t, target = noised(bb.scheduler, posterior_sample(moments, rand, scaling), rand)
                own += float(per_sample_mse(task.predict(noisy, t, text, tokens), target).mean()) / repeats
                wrong += float(per_sample_mse(task.predict(noisy, t, text, tokens[other]), target).mean()) / repeats
        task.train()
        return {"step": step, "samples": step * n, "loss_own": own, "loss_other": wrong, "id_gain": wrong - own,
                "token_spread": spread, "seconds": round(time.time() - start, 1)}

    task.train()
    every = max(1, steps // readings)
    for step in range(steps):
        if step % every == 0:
            yield reading(step)
        rand = SampleRandom([step * n + j for j in range(n)])
        noisy, t, target = noised(bb.scheduler, posterior_sample(moments, rand, scaling), rand)
        loss = mse(task.predict(noisy, t, text, task.encode_faces(embeddings, clip)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    yield reading(steps)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.testbed.id_signal import anchor_task
    from components.core.config import load_params
    from components.core.shards import PreparedData

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("-S", dest="overrides", action="append", default=[], help="key=value override (repeatable)")
    p.add_argument("--checkpoint", default=None, help="start from this stage-1 export (default: fresh parts)")
    p.add_argument("--people", type=int, default=8, help="one photo each, from the train split")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps, each over all the photos")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--caption", action="store_true", help="train and read with the captions (default: empty prompt)")
    args = p.parse_args(argv)
    params = load_params(args.params, args.overrides)
    task = anchor_task(params, args.checkpoint)
    for row in fit_task(task, PreparedData(params.data.prepared), people=args.people, steps=args.steps, lr=args.lr,
                        caption=args.caption, resolution=params.model.tiny.resolution):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())

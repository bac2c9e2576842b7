"""Does a stage-1 checkpoint carry identity in its tokens? A diagnostic for the test bed (issue 16).

The learning check (components/train/checks.py) answers yes or no on held-out people. When it says no, this tool says
why, with three readings of the same checkpoint on people of one split:

* **token spread**: how far apart different people's ID tokens are. ``relative_spread`` is the mean distance of a
  person's tokens from the mean token over the mean token's norm; ``centred_within`` / ``centred_between`` are the
  cosines of mean-centred tokens of the same person (other photos) and of different people. A face encoder that
  gives everyone the same tokens has spread near 0 and within == between.
* **the inputs' spread**: the same two cosines for the face encoder's inputs (the recognition embedding and the
  CLIP features of the crop): how much identity the encoder is given to work with.
* **what the loss sees**: stage 1's epsilon MSE (the same noise and timesteps in every column) with the caption or
  the empty prompt, and the person's own tokens (another photo), another person's, or the unconditional ones. The
  text-vs-empty gap is the size of the signal that conditioning can win at all; own-vs-other is what identity wins.

    python -m benchmarks.testbed.id_signal --checkpoint runs/anchor/export [--split train] [--people 12]
    python -m benchmarks.testbed.id_signal --checkpoint init ...     (freshly initialised parts, seed 0)

Prints one JSON object; ``--params`` and ``-S`` as for ``dynamicid`` (the data and the base come from there).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _cosines(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean cosine of mean-centred vectors within a person (different photos) and between people."""
    x = vectors.astype(np.float64)
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    c = x @ x.T
    same = labels[:, None] == labels[None, :]
    return {"centred_within": float(c[same & ~np.eye(len(x), dtype=bool)].mean()),
            "centred_between": float(c[~same].mean())}


def relative_spread(tokens: np.ndarray) -> float:
    """Mean distance of each row from the mean row, over the mean row's norm: [P, F] -> 0 when all rows are equal."""
    mean = tokens.mean(0)
    return float(np.linalg.norm(tokens - mean, axis=1).mean() / np.linalg.norm(mean))


def anchor_task(params, checkpoint: str | None):
    """A stage-1 ``AnchorTask`` over ``checkpoint`` (None: freshly initialised parts, seeded), on the CPU in fp32."""
    import torch

    from components.train.tasks import AnchorTask
    from model.loading import load_pipeline

    torch.manual_seed(params.model.tiny.seed)
    pipe = load_pipeline(params.model, params.face, checkpoint, params.storage.cache_dir, fuse_lora=False,
                         device="cpu", dtype="fp32")
    return AnchorTask(pipe.backbone, pipe.dynamicid, params.model, 0)


def measure(params, checkpoint: str | None, split: str, people: int, photos: int, repeats: int) -> dict:
    """Load ``checkpoint`` (None: freshly initialised parts) and read it with ``measure_task``."""
    from components.core.shards import PreparedData

    out = measure_task(anchor_task(params, checkpoint).eval(), PreparedData(params.data.prepared), split, people,
                       photos, repeats, params.model.tiny.resolution)
    return {"checkpoint": checkpoint or "init", **out}


def measure_task(task, data, split: str, people: int, photos: int, repeats: int, resolution: int) -> dict:
    """The three readings of the module docstring for an ``AnchorTask`` over ``data``'s people of ``split``."""
    import torch

    from components.train.checks import photo_tokens
    from components.train.images import image_tensor
    from components.train.losses import SampleRandom, encode_latents, noised, per_sample_mse
    from model.dynamicid import clip_image_features, text_embeddings

    bb = task.backbone
    groups = data.identities(split)
    names = sorted(n for n in groups if len(groups[n]) > photos)[:people]
    if len(names) < 2:
        raise ValueError(f"split {split!r} has fewer than 2 people with more than {photos} photos")
    picks = [p for n in names for p in groups[n][:photos]]
    labels = np.repeat(np.arange(len(names)), photos)
    samples = [data.sample(p) for p in picks]
    out: dict = {"split": split, "people": len(names), "photos": photos}
    with torch.no_grad():
        tokens = photo_tokens(task, data, picks).flatten(1).double().numpy()  # [P, K * D]
        out["tokens"] = {"relative_spread": relative_spread(tokens), **_cosines(tokens, labels)}
        emb = np.stack([s.embedding for s in samples])
        crops = torch.stack([image_tensor(s.face_crop) for s in samples])
        clip = clip_image_features(bb, crops).flatten(1).double().numpy()
        out["inputs"] = {"embedding": _cosines(emb, labels), "clip": _cosines(clip, labels)}

        names_of = {p: labels[i] for i, p in enumerate(picks)}
        rows = [(t, next(o for o in groups[names[names_of[t]]] if o != t),
                 groups[names[(names_of[t] + 1) % len(names)]][0]) for t in picks]
        cols = {f"{tx}_{tk}": [] for tx in ("caption", "empty") for tk in ("own", "other", "uncond")}
        for c in range(0, len(rows), 16):
            chunk = rows[c:c + 16]
            got = [data.sample(t) for t, _, _ in chunk]
            pixels = torch.stack([image_tensor(s.pixels, resolution) for s in got])
            texts = {"caption": text_embeddings(bb, [s.caption for s in got])[0],
                     "empty": text_embeddings(bb, [""] * len(got))[0]}
            toks = {"own": photo_tokens(task, data, [o for _, o, _ in chunk]),
                    "other": photo_tokens(task, data, [x for _, _, x in chunk]),
                    "uncond": task.face_tokens(torch.zeros(len(got), emb.shape[1]),
                                               torch.zeros((len(got), *crops.shape[1:])))}
            for r in range(repeats):
                rand = SampleRandom([1000 * c + 17 * r + j for j in range(len(chunk))])
                noisy, t, target = noised(bb.scheduler, encode_latents(bb.vae, pixels, rand), rand)
                for tx, text in texts.items():
                    for tk, tok in toks.items():
                        cols[f"{tx}_{tk}"].append(per_sample_mse(task.predict(noisy, t, text, tok), target))
        loss = {k: float(torch.cat(v).double().mean()) for k, v in cols.items()}
        out["loss"] = loss
        out["text_gain"] = loss["empty_own"] - loss["caption_own"]
        out["id_gain_with_caption"] = loss["caption_other"] - loss["caption_own"]
        out["id_gain_without_caption"] = loss["empty_other"] - loss["empty_own"]
    return out


def reading_parser(doc: str | None, checkpoint: bool = True) -> argparse.ArgumentParser:
    """The arguments every test-bed reading takes: ``--params`` and ``-S``, and the checkpoint it reads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="a stage-1 (or stage-2) export, or 'init'")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("-S", dest="overrides", action="append", default=[], help="key=value override (repeatable)")
    return p


def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    p = reading_parser(__doc__)
    p.add_argument("--split", default="train", help="people of this split (train: seen in training; test: held out)")
    p.add_argument("--people", type=int, default=12)
    p.add_argument("--photos", type=int, default=6, help="photos per person")
    p.add_argument("--repeats", type=int, default=4, help="noise draws per photo")
    args = p.parse_args(argv)
    params = load_params(args.params, args.overrides)
    ckpt = None if args.checkpoint == "init" else args.checkpoint
    json.dump(measure(params, ckpt, args.split, args.people, args.photos, args.repeats), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

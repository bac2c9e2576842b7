"""Learning checks on held-out images of training identities (run at the end of a stage and by
``scripts/learning_check.py``): does the trained part do the job it was trained for?

* stage 1: the denoising loss with the person's ID tokens is lower than with the tokens zeroed
  (zero tokens give the SAA branch zero keys and values, i.e. no identity at all); same images,
  noise and timesteps for both, so the difference is paired;
* stage 2: tokens the IMR predicts for a held-out target motion are closer (MSE) to the target
  image's own tokens than the unedited source tokens are.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from components.train.data import Split, noise_seed
from components.train.images import image_tensor
from components.train.losses import SampleRandom, encode_latents, noised, per_sample_mse
from model.dynamicid import text_embeddings

if TYPE_CHECKING:
    from components.core.shards import PreparedData
    from components.train.tasks import AnchorTask, ReconfigureTask

# Noise stream of the checks, far from the training slots' seeds.
_CHECK_STREAM = 1 << 40


def _summary(prefix: str, reference: np.ndarray, candidate: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Paired comparison, gain = reference - candidate (> 0: the candidate is better).

    Comparisons that share a held-out image (several noise draws, several sources) are not
    independent, so the gain is first averaged per held-out image and the standard error and
    win rate are over images.
    """
    gain = reference - candidate
    ids, inverse = np.unique(groups, return_inverse=True)
    per_image = np.bincount(inverse, weights=gain) / np.bincount(inverse)
    n = len(ids)
    mean = float(per_image.mean())
    stderr = float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {
        f"{prefix}_gain": mean,
        f"{prefix}_gain_stderr": stderr,
        f"{prefix}_win_rate": float((per_image > 0).mean()),
        f"{prefix}_images": float(n),
        f"{prefix}_pairs": float(len(gain)),
        # the check's verdict: a gain of more than two standard errors (1.0 / 0.0, a DVC metric)
        f"{prefix}_passed": float(n > 1 and mean > 2 * stderr),
    }


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def id_token_check(task: "AnchorTask", data: "PreparedData", positions: list[int], *, resolution: int, repeats: int,
                   seed: int, batch_size: int = 16) -> dict[str, float]:
    if not positions:
        return {}
    bb = task.backbone
    with_id, zeroed, groups = [], [], []
    for chunk in _chunks(positions, batch_size):
        samples = [data.sample(p) for p in chunk]
        pixels = torch.stack([image_tensor(s.pixels, resolution) for s in samples]).to(bb.vae.device)
        crops = torch.stack([image_tensor(s.face_crop) for s in samples]).to(bb.vae.device)
        emb = torch.stack([torch.from_numpy(s.embedding.copy()) for s in samples])
        text, _ = text_embeddings(bb, [s.caption for s in samples])
        tokens = task.face_tokens(emb, crops)  # [B, K, D]
        for r in range(repeats):
            rand = SampleRandom([noise_seed(seed, _CHECK_STREAM + p * repeats + r) for p in chunk], bb.vae.device)
            latents = encode_latents(bb.vae, pixels, rand)
            noisy, t, target = noised(bb.scheduler, latents, rand)
            with_id.append(per_sample_mse(task.predict(noisy, t, text, tokens), target).cpu())
            zeroed.append(per_sample_mse(task.predict(noisy, t, text, torch.zeros_like(tokens)), target).cpu())
            groups += chunk
    a, b = torch.cat(with_id).numpy(), torch.cat(zeroed).numpy()
    return {"heldout_loss_id": float(a.mean()), "heldout_loss_zero_id": float(b.mean()),
            **_summary("id", b, a, np.asarray(groups))}


def motion_pairs(data: "PreparedData", split: Split, limit: int, sources: int = 4) -> list[tuple[int, int]]:
    """(source, held-out target) pairs: per target, the identity's first ``sources`` training images
    (by key) whose face prompt differs from the target's, so every pair asks for a real motion
    change (an identity without such images contributes its first training image)."""
    by_id: dict[str, list[int]] = {}
    for p in split.train:
        by_id.setdefault(data.index[p]["identity"], []).append(p)
    pairs = []
    for target in split.heldout[:limit] if limit else split.heldout:
        candidates = sorted(by_id.get(data.index[target]["identity"], []), key=lambda p: data.index[p]["key"])
        if not candidates:
            continue
        prompt = data.index[target]["face_prompt"]
        different = [p for p in candidates if data.index[p]["face_prompt"] != prompt]
        pairs += [(source, target) for source in (different or candidates)[:sources]]
    return pairs


@torch.no_grad()
def imr_check(task: "ReconfigureTask", data: "PreparedData", pairs: list[tuple[int, int]],
              batch_size: int = 32) -> dict[str, float]:
    if not pairs:
        return {}
    size = task.dyn.dims.imr["landmark_size"]
    d_pred, d_src = [], []
    for chunk in _chunks(list(range(len(pairs))), batch_size):
        src = [data.sample(pairs[i][0]) for i in chunk]
        tgt = [data.sample(pairs[i][1]) for i in chunk]
        b = len(chunk)
        emb = torch.stack([torch.from_numpy(s.embedding.copy()) for s in src + tgt])
        crops = torch.stack([image_tensor(s.face_crop) for s in src + tgt])
        tokens = task.face_tokens(emb, crops.to(task.backbone.image_encoder.device))
        src_tok, tgt_tok = tokens[:b], tokens[b:]
        lmk = lambda ss: torch.stack([image_tensor(s.landmark_image, size) for s in ss])  # noqa: E731
        pred = task.edit(src_tok, lmk(src), [s.face_prompt for s in src], lmk(tgt), [s.face_prompt for s in tgt])
        d_pred.append(per_sample_mse(pred, tgt_tok).cpu())
        d_src.append(per_sample_mse(src_tok, tgt_tok).cpu())
    p, s = torch.cat(d_pred).numpy(), torch.cat(d_src).numpy()
    targets = np.asarray([t for _, t in pairs])
    return {"heldout_dist_pred": float(p.mean()), "heldout_dist_source": float(s.mean()),
            **_summary("imr", s, p, targets)}

"""Learning checks with controls, on people never seen in training (run at the end of a stage, written into the
exported checkpoint's manifest and the MLflow run, and required by the promotion gate):

* stage 1, identity: the denoising loss of a held-out image is lower with ID tokens made from *another photo of
  the same person* than with tokens made from *another person's* photo. Both branches get the same image, noise,
  timestep and caption, so the difference is paired, and both switch the ID branch on: a model whose tokens are
  the same for everyone (identity-blind) scores exactly 0 and fails.
* stage 2, motion: the IMR's prediction for the target's motion is closer to the target image's own tokens than
  the same prediction for a *shuffled* target motion (another sample's motion): a model that ignores the asked
  motion (motion-blind, or one that pulls every source to the person's average) scores 0 and fails; and asking
  for the source's own motion must move the tokens less than a real motion change separates source and target.

Every statistic is a mean over people with a 95 % bootstrap interval that resamples people
(components.core.stats); a check passes when its interval excludes "no effect".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from components.core.stats import clustered_interval
from components.train.data import noise_seed
from components.train.images import image_tensor
from components.train.losses import SampleRandom, encode_latents, noised, per_sample_mse
from model.dynamicid import text_embeddings

if TYPE_CHECKING:
    from components.core.shards import PreparedData
    from components.train.tasks import AnchorTask, ReconfigureTask

# Noise stream of the checks, far from the training slots' seeds.
_CHECK_STREAM = 1 << 40


def heldout_people(data: "PreparedData") -> tuple[str, dict[str, list[int]]]:
    """-> (split name, person -> positions sorted by key) of the people no training step sees: the ``val``
    identities when the data has them, else the ``test`` ones (the checks fit nothing, so they may share the
    evaluation's people). Only people with two or more images can supply a reference and a target."""
    for split in ("val", "test"):
        people = {who: sorted(ps, key=lambda p: data.index[p]["key"]) for who, ps in data.identities(split).items()}
        people = {who: ps for who, ps in sorted(people.items()) if len(ps) >= 2}
        if len(people) >= 2:
            return split, people
    return "", {}


def _spread(people: dict[str, list[int]], limit: int) -> list[int]:
    """Up to ``limit`` positions taken round-robin over people, so every person is represented."""
    out: list[int] = []
    depth = 0
    while (not limit or len(out) < limit) and any(depth < len(ps) for ps in people.values()):
        out += [ps[depth] for ps in people.values() if depth < len(ps)]
        depth += 1
    return sorted(out[:limit]) if limit else sorted(out)


def _verdict(prefix: str, gain: np.ndarray, people: list[str], split: str, *, upper_below: float | None = None
             ) -> dict[str, float]:
    """Mean over people of a per-comparison gain and its person-bootstrap interval; passes when the interval is
    above 0 (or, with ``upper_below``, when its upper end is below that value)."""
    iv = clustered_interval(gain, people)
    passed = iv.high < upper_below if upper_below is not None else iv.excludes(0.0)
    return {f"{prefix}": iv.mean, f"{prefix}_low": iv.low, f"{prefix}_high": iv.high,
            f"{prefix}_people": float(iv.people), f"{prefix}_comparisons": float(iv.values),
            f"{prefix}_passed": float(iv.people > 1 and passed)}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def photo_tokens(task, data: "PreparedData", positions: list[int]) -> torch.Tensor:
    """The face encoder's ID tokens of prepared photos (their embedding and face crop): [B, K, D]."""
    samples = [data.sample(p) for p in positions]
    emb = torch.stack([torch.from_numpy(s.embedding.copy()) for s in samples])
    crops = torch.stack([image_tensor(s.face_crop) for s in samples])
    return task.face_tokens(emb, crops.to(task.backbone.image_encoder.device))


def identity_triples(data: "PreparedData", people: dict[str, list[int]], limit: int) -> list[tuple[int, int, int]]:
    """(target image, another photo of the same person, a photo of another person), over held-out people. The
    other person is the next one in sorted order, so every person serves once as everybody's control."""
    names = list(people)
    triples = []
    for target in _spread(people, limit):
        who = data.index[target]["identity"]
        own = next(p for p in people[who] if p != target)
        other = people[names[(names.index(who) + 1) % len(names)]][0]
        triples.append((target, own, other))
    return triples


@torch.no_grad()
def id_token_check(task: "AnchorTask", data: "PreparedData", *, limit: int, resolution: int, repeats: int,
                   seed: int, batch_size: int = 16, prompt: str | None = None) -> dict[str, float]:
    """Stage 1: loss with another person's tokens minus loss with the person's own tokens (> 0: identity used).
    The text is each image's caption, as stage 1 trains; ``prompt`` replaces every caption (a diagnostic:
    the empty prompt leaves the tokens as the only conditioning)."""
    split, people = heldout_people(data)
    if not people:
        return {}
    bb = task.backbone
    triples = identity_triples(data, people, limit)
    own_loss, other_loss, who = [], [], []
    for chunk in _chunks(triples, batch_size):
        samples = [data.sample(t) for t, _, _ in chunk]
        pixels = torch.stack([image_tensor(s.pixels, resolution) for s in samples]).to(bb.vae.device)
        text, _ = text_embeddings(bb, [s.caption if prompt is None else prompt for s in samples])
        own = photo_tokens(task, data, [o for _, o, _ in chunk])  # [B, K, D]
        other = photo_tokens(task, data, [x for _, _, x in chunk])  # [B, K, D]
        for r in range(repeats):
            rand = SampleRandom([noise_seed(seed, _CHECK_STREAM + t * repeats + r) for t, _, _ in chunk],
                                bb.vae.device)
            latents = encode_latents(bb.vae, pixels, rand)
            noisy, t, target = noised(bb.scheduler, latents, rand)
            own_loss.append(per_sample_mse(task.predict(noisy, t, text, own), target).cpu())
            other_loss.append(per_sample_mse(task.predict(noisy, t, text, other), target).cpu())
            who += [data.index[c[0]]["identity"] for c in chunk]
    a, b = torch.cat(own_loss).double().numpy(), torch.cat(other_loss).double().numpy()
    gain = _verdict("id_gain", b - a, who, split)
    return {"heldout_loss_own_id": float(a.mean()), "heldout_loss_other_id": float(b.mean()),
            **gain, "id_passed": gain["id_gain_passed"]}


def motion_pairs(data: "PreparedData", people: dict[str, list[int]], limit: int, sources: int = 2
                 ) -> list[tuple[int, int]]:
    """(source, target) pairs of one held-out person in two different motions (face prompts differ): per
    target, the person's first ``sources`` other images whose face prompt differs from the target's."""
    pairs = []
    for target in _spread(people, limit):
        prompt = data.index[target]["face_prompt"]
        different = [p for p in people[data.index[target]["identity"]] if data.index[p]["face_prompt"] != prompt]
        pairs += [(source, target) for source in different[:sources]]
    return pairs


def shuffled_targets(data: "PreparedData", pairs: list[tuple[int, int]]) -> list[int]:
    """For each pair, another pair's target whose motion (face prompt) differs from this pair's target: the
    control motion. Deterministic: the nearest later pair (cyclically) with a different face prompt."""
    out = []
    for i, (_, target) in enumerate(pairs):
        prompt = data.index[target]["face_prompt"]
        for k in range(1, len(pairs) + 1):
            cand = pairs[(i + k) % len(pairs)][1]
            if data.index[cand]["face_prompt"] != prompt:
                out.append(cand)
                break
        else:
            out.append(target)  # every target asks for the same motion: no control exists (gain 0)
    return out


@torch.no_grad()
def imr_check(task: "ReconfigureTask", data: "PreparedData", *, limit: int, batch_size: int = 32
              ) -> dict[str, float]:
    """Stage 2: the edit for the asked motion beats the edit for a shuffled motion, and asking for the source's
    own motion moves the tokens less than a real motion change separates source and target."""
    split, people = heldout_people(data)
    pairs = motion_pairs(data, people, limit)
    if not pairs:
        return {}
    shuffled = shuffled_targets(data, pairs)
    size = task.dyn.dims.imr["landmark_size"]
    lmk = lambda ss: torch.stack([image_tensor(s.landmark_image, size) for s in ss])  # noqa: E731
    d_pred, d_shuf, d_same, d_src, who = [], [], [], [], []
    for chunk in _chunks(list(range(len(pairs))), batch_size):
        src = [data.sample(pairs[i][0]) for i in chunk]
        tgt = [data.sample(pairs[i][1]) for i in chunk]
        shf = [data.sample(shuffled[i]) for i in chunk]
        tokens = photo_tokens(task, data, [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk])
        src_tok, tgt_tok = tokens[:len(chunk)], tokens[len(chunk):]
        src_prompts = [s.face_prompt for s in src]
        pred = task.edit(src_tok, lmk(src), src_prompts, lmk(tgt), [s.face_prompt for s in tgt])
        pred_shuf = task.edit(src_tok, lmk(src), src_prompts, lmk(shf), [s.face_prompt for s in shf])
        same = task.edit(src_tok, lmk(src), src_prompts, lmk(src), src_prompts)
        d_pred.append(per_sample_mse(pred, tgt_tok).cpu())
        d_shuf.append(per_sample_mse(pred_shuf, tgt_tok).cpu())
        d_same.append(per_sample_mse(same, src_tok).cpu())
        d_src.append(per_sample_mse(src_tok, tgt_tok).cpu())
        who += [data.index[pairs[i][1]]["identity"] for i in chunk]
    p, s, m, d = (torch.cat(x).double().numpy() for x in (d_pred, d_shuf, d_same, d_src))
    motion = _verdict("imr_gain", s - p, who, split)
    stay = _verdict("imr_stay_ratio", m / np.maximum(d, 1e-12), who, split, upper_below=1.0)
    return {"heldout_dist_pred": float(p.mean()), "heldout_dist_shuffled": float(s.mean()),
            "heldout_dist_source": float(d.mean()), "heldout_dist_same_motion": float(m.mean()),
            **motion, **stay, "imr_passed": float(motion["imr_gain_passed"] and stay["imr_stay_ratio_passed"])}


# The parts whose weights decide each check's outcome (what its record is bound to).
CHECK_PARTS = {"anchor": ("saa", "face_encoder"), "reconfigure": ("saa", "face_encoder", "imr", "keypoint_encoder")}


def check_record(stage: str, found: dict[str, float], parts: dict[str, dict[str, torch.Tensor]]) -> dict:
    """The learning-check record a checkpoint carries: the verdict, its numbers, and the digest of the weights
    it was measured on (model.checkpoint.parts_digest), so that the gate refuses a record that belongs to other
    weights."""
    from model.checkpoint import parts_digest

    names = CHECK_PARTS[stage]
    from components.core.metric_catalogue import LEARNING_CHECK_PREFIX

    record: dict = {"passed": bool(found.get(f"{LEARNING_CHECK_PREFIX[stage]}_passed", 0.0)), "metrics": dict(found),
                    "parts": list(names), "weights": parts_digest(parts, names)}
    if not found:
        record["reason"] = "no held-out people with two or more images"
    return record

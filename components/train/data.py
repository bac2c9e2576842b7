"""Training data from the prepared shards, in an order that survives a restart.

Resume must continue with exactly the batches an uninterrupted run would have seen, on any
rank, without saving sampler state. So every sample has a *slot*: a global position in an
endless stream. Optimizer step ``s``, accumulation micro-step ``m`` on rank ``r`` reads the
slots ``((s * accum + m) * world + r) * micro_batch + [0, micro_batch)``; slot ``g`` belongs to
epoch ``g // U`` (U units per epoch) and maps to unit ``perm(epoch)[g % U]`` with a
permutation seeded by (seed, epoch). Every random choice of a sample (CFG drops, the target
images of stage 2) is drawn from a generator seeded by (seed, slot). A batch is therefore a
pure function of (seed, step), and ``--resume`` at step s simply starts the sampler at s.

Held-out images: per training identity the ``holdout_per_identity`` images with the smallest
keys (content hashes, so independent of file order and spread over motions) never enter
training; the learning checks measure on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from components.train.images import image_tensor

if TYPE_CHECKING:
    import torch

    from components.core.shards import PreparedData, Sample
    from components.train.feature_cache import FeatureCache

# Distinct streams of the per-slot generators (order, sample choices, noise).
_ORDER, _CHOICE, _NOISE = 1, 2, 3


def slot_rng(seed: int, stream: int, slot: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, slot])


def noise_seed(seed: int, slot: int) -> int:
    """Seed of the torch generator of the sample in ``slot`` (latent sample, noise, timestep: losses.SampleRandom)."""
    return int(np.random.SeedSequence([seed, _NOISE, slot]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Split:
    """Positions (rows of the prepared index) used for training and held out for the learning check."""

    train: list[int]
    heldout: list[int]


def holdout_split(data: "PreparedData", per_identity: int, split: str = "train") -> Split:
    """Hold out ``per_identity`` images per identity; identities keep at least two training images."""
    train: list[int] = []
    heldout: list[int] = []
    for _, positions in sorted(data.identities(split).items()):
        ordered = sorted(positions, key=lambda p: data.index[p]["key"])
        k = per_identity if len(ordered) - per_identity >= 2 else 0
        heldout += ordered[:k]
        train += ordered[k:]
    return Split(sorted(train), sorted(heldout))


class SlotOrder:
    """Slot -> (epoch, unit index): one seeded permutation of the units per epoch."""

    def __init__(self, num_units: int, seed: int):
        if num_units < 1:
            raise ValueError("no training samples")
        self.num_units = num_units
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, slot: int) -> tuple[int, int]:
        epoch, pos = divmod(int(slot), self.num_units)
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = slot_rng(self.seed, _ORDER, epoch).permutation(self.num_units)
        return epoch, int(self._cache[epoch][pos])


def batch_slots(step: int, micro: int, *, rank: int, world: int, micro_batch: int, accum: int) -> list[int]:
    first = ((step * accum + micro) * world + rank) * micro_batch
    return list(range(first, first + micro_batch))


class SlotBatches:
    """Batch sampler for ``DataLoader(batch_sampler=...)``: the slot lists of steps [start, stop) of one rank."""

    def __init__(self, start: int, stop: int, *, rank: int, world: int, micro_batch: int, accum: int):
        self.start, self.stop = start, stop
        self.kw = dict(rank=rank, world=world, micro_batch=micro_batch, accum=accum)
        self.accum = accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                yield batch_slots(step, micro, **self.kw)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum


# --------------------------------------------------------------------------- tensors


class SlotDataset:
    """Map-style dataset over slots. Opens the prepared data lazily (once per DataLoader worker)."""

    def __init__(self, root: str | Path, units: list[Any], seed: int):
        self.root = Path(root)
        self.units = units
        self.seed = seed
        self.order = SlotOrder(len(units), seed)

    @cached_property
    def data(self) -> "PreparedData":
        from components.core.shards import PreparedData

        return PreparedData(self.root)

    def __getitem__(self, slot: int) -> dict[str, Any]:
        epoch, unit = self.order(slot)
        item = self.item(self.units[unit], slot_rng(self.seed, _CHOICE, slot))
        item["slot"] = int(slot)
        return item

    def item(self, unit: Any, rng: np.random.Generator) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class CaptionedImages(SlotDataset):
    """Base stage: image + caption (caption emptied with ``drop_caption`` for classifier-free guidance)."""

    def __init__(self, root, positions: list[int], seed: int, resolution: int, drop_caption: float = 0.0):
        super().__init__(root, positions, seed)
        self.resolution = resolution
        self.drop_caption = drop_caption

    def item(self, position: int, rng: np.random.Generator) -> dict[str, Any]:
        s = self.data.sample(position)
        drop = bool(rng.random() < self.drop_caption)
        return {"pixels": image_tensor(s.pixels, self.resolution), "caption": "" if drop else s.caption}


class AnchorSamples(SlotDataset):
    """Stage 1: one image of one person, its caption and face; drop flags per method.md.

    One uniform draw u per sample: u < p_text drops the text, the next p_id the ID, the next
    p_both both; so each case has exactly its configured probability.

    With a ``FeatureCache`` (``train.cache_features``) an item carries the frozen encoders'
    outputs for its image (``moments``, ``clip``, ``text``, ``embedding``) instead of pixels, crop
    and caption: the shards are not opened at all, and the drop flags are the same draws.
    """

    def __init__(self, root, positions: list[int], seed: int, resolution: int,
                 drop_text: float, drop_id: float, drop_both: float, cache: "FeatureCache | None" = None):
        super().__init__(root, positions, seed)
        self.resolution = resolution
        self.p = (drop_text, drop_id, drop_both)
        self.cache = cache
        if cache is not None:
            missing = [p for p in positions if p not in cache]
            if missing:
                raise ValueError(f"feature cache {cache.root} lacks {len(missing)} training positions")

    def drops(self, rng: np.random.Generator) -> tuple[bool, bool]:
        pt, pi, pb = self.p
        u = float(rng.random())
        return u < pt or pt + pi <= u < pt + pi + pb, pt <= u < pt + pi + pb

    def item(self, position: int, rng: np.random.Generator) -> dict[str, Any]:
        import torch

        drop_text, drop_id = self.drops(rng)
        if self.cache is not None:
            return {**self.cache.row(position), "drop_text": drop_text, "drop_id": drop_id}
        s = self.data.sample(position)
        return {
            "pixels": image_tensor(s.pixels, self.resolution),
            "caption": s.caption,
            "face_crop": image_tensor(s.face_crop),
            "embedding": torch.from_numpy(s.embedding.copy()),
            "drop_text": drop_text,
            "drop_id": drop_id,
        }


class MotionPairs(SlotDataset):
    """Stage 2: a unit is an identity; a sample is one source image and T target images of that
    person, preferring targets whose face prompt (expression, pose) differs from the source's."""

    def __init__(self, root, positions: list[int], seed: int, resolution: int, landmark_size: int, targets: int,
                 prompts: dict[int, str], identities: dict[int, str]):
        by_id: dict[str, list[int]] = {}
        for p in positions:
            by_id.setdefault(identities[p], []).append(p)
        groups = [sorted(v) for _, v in sorted(by_id.items()) if len(v) >= 2]
        if not groups:
            raise ValueError("stage 2 needs identities with at least two training images")
        super().__init__(root, groups, seed)
        self.resolution, self.landmark_size, self.targets = resolution, landmark_size, targets
        self.prompts = prompts

    def pick(self, group: list[int], rng: np.random.Generator) -> tuple[int, list[int]]:
        source = int(group[int(rng.integers(len(group)))])
        others = [p for p in group if p != source]
        different = [p for p in others if self.prompts[p] != self.prompts[source]] or others
        chosen = rng.choice(len(different), size=self.targets, replace=len(different) < self.targets)
        return source, [int(different[i]) for i in chosen]

    def face(self, s: "Sample") -> dict[str, Any]:
        import torch

        return {"face_crop": image_tensor(s.face_crop), "embedding": torch.from_numpy(s.embedding.copy()),
                "landmarks": image_tensor(s.landmark_image, self.landmark_size), "prompt": s.face_prompt}

    def item(self, group: list[int], rng: np.random.Generator) -> dict[str, Any]:
        import torch

        source, targets = self.pick(group, rng)
        src = self.face(self.data.sample(source))
        tgts = [self.data.sample(p) for p in targets]
        faces = [self.face(t) for t in tgts]
        return {
            "identity": self.data.index[source]["identity"],
            "src_crop": src["face_crop"], "src_embedding": src["embedding"],
            "src_landmarks": src["landmarks"], "src_prompt": src["prompt"],
            "tgt_crop": torch.stack([f["face_crop"] for f in faces]),            # [T, 3, C, C]
            "tgt_embedding": torch.stack([f["embedding"] for f in faces]),       # [T, D]
            "tgt_landmarks": torch.stack([f["landmarks"] for f in faces]),       # [T, 1, L, L]
            "tgt_prompt": [f["prompt"] for f in faces],                          # T strings
            "tgt_pixels": torch.stack([image_tensor(t.pixels, self.resolution) for t in tgts]),  # [T, 3, S, S]
        }


# Per-sample values the step reads on the host: they stay Python lists through collate and
# to_device, so that reading them never waits for the GPU.
HOST_KEYS = frozenset({"slot", "drop_text", "drop_id"})


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate, except that per-sample string lists stay lists of lists (not transposed)
    and the host keys (slot, drop flags) stay plain lists."""
    from torch.utils.data import default_collate

    lists = {k for k, v in items[0].items() if isinstance(v, list) or k in HOST_KEYS}
    out = default_collate([{k: v for k, v in it.items() if k not in lists} for it in items])
    for k in lists:
        out[k] = [it[k] for it in items]
    return out


def to_device(batch: dict[str, Any], device: "torch.device") -> dict[str, Any]:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def host_list(values: Any) -> list:
    """Per-sample host values as a list (a CPU tensor is read without a device round trip)."""
    import torch

    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)


def device_flags(values: Any, device: "torch.device") -> "torch.Tensor":
    """[B] bool mask on ``device`` from host flags: staged through pinned memory and copied
    asynchronously, so the host does not wait for the GPU (a pageable copy would)."""
    import torch

    if isinstance(values, torch.Tensor) and values.device == torch.device(device):
        return values.bool()
    flags = torch.tensor(host_list(values), dtype=torch.bool)
    if torch.device(device).type == "cuda":
        flags = flags.pin_memory()
    return flags.to(device, non_blocking=True)

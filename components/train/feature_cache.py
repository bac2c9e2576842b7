"""Frozen-encoder features of the stage-1 training images, computed once before the first step.

Stage 1 trains only the face encoder and SAA: the VAE encoder, the CLIP image encoder and the
text encoder are frozen, so their outputs for a training image never change. Running them every
step cost 82 ms of an H100 step at SD1.5 size (batch 8, 512 px) and kept 1.8 GiB of weights on
the GPU. The anchor stage therefore computes, in a pre-pass over its training images:

* the VAE posterior *moments* (mean ; logvar, [2C, h, w]), not a latent: each step still draws
  a fresh posterior sample on the device (``losses.posterior_sample``) from the sample's own
  generator, so the objective is the uncached one in distribution, and bit for bit where the
  moments are stored in the dtype the encoder ran in (they are);
* the CLIP image features of the face crop ([L, clip_dim], penultimate hidden states);
* the text embedding of the caption ([77, D]) and the identity embedding ([id_dim]);
* two constants: the empty prompt's embedding (caption dropout) and the CLIP features of a black
  crop (ID dropout: the unconditional tokens the pipeline uses).

Nothing random happens before the VAE (the trainer resizes, it does not augment), so one entry
per image is exact. A trainer that adds random augmentation must either cache one entry per
augmentation variant or turn ``train.cache_features`` off.

Layout (``<train.anchor.output>/feature_cache/<key>/``): under DeepSpeed every rank encodes the
training positions ``P[rank::world]`` and writes its own memory-mappable ``.npy`` files
(``r{rank}-{field}.npy``; 2-byte float dtypes stored as their raw uint16 bits, so bf16 survives
exactly); position ``P[i]`` is row ``i // world`` of rank ``i % world``'s files. Rank 0 writes
``constants.safetensors`` and, after every rank has finished, ``meta.json``: a cache without it
is incomplete and is rebuilt. The key hashes the frozen encoders' files, the prepared data's
content hash, the training positions, the resolution and the dtype, so ``--resume`` (and any
run with the same inputs) reuses it and a change of any input builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from components.core.shards import PreparedData
    from components.train.distributed import DistInfo
    from model.backbone import Backbone

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FIELDS = ("moments", "clip", "text", "embedding")
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.uint16, torch.float32: np.float32}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


# --------------------------------------------------------------------------- key


def fingerprint_files(root: Path, sub: Sequence[str] = ("",), edge: int = 1 << 16) -> str:
    """Hash of every file under ``root/<sub>``: path, size and its first and last ``edge`` bytes.

    Reading whole multi-GiB weight files on every start would take longer than the check is
    worth; the edges change with any re-save (safetensors headers hold the tensor table)."""
    h = hashlib.sha256()
    for s in sub:
        base = root / s
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base] if base.exists() else []
        for p in files:
            size = p.stat().st_size
            h.update(f"{p.relative_to(root)}\0{size}\0".encode())
            with open(p, "rb") as fh:
                h.update(fh.read(edge))
                if size > 2 * edge:
                    fh.seek(size - edge)
                    h.update(fh.read(edge))
    return h.hexdigest()


def cache_key(*, encoders: Sequence[tuple[Path, Sequence[str]]], data_hash: str, positions: Sequence[int],
              resolution: int, dtype: torch.dtype) -> str:
    """Content key of a cache: frozen encoders' files, prepared data, training positions, resolution, dtype."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "data": data_hash, "resolution": int(resolution),
                         "dtype": _DTYPE_NAMES[dtype], "positions": list(map(int, positions))}).encode())
    for root, sub in encoders:
        h.update(fingerprint_files(Path(root), sub).encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- read side


@dataclass(frozen=True)
class CachedConstants:
    """Unconditional inputs, on the training device: empty prompt [77, D], black-crop CLIP features [L, Dc]."""

    empty_text: torch.Tensor
    black_clip: torch.Tensor

    def to(self, device: torch.device) -> "CachedConstants":
        return CachedConstants(self.empty_text.to(device), self.black_clip.to(device))


class FeatureCache:
    """Read side: ``row(position)`` -> {field: tensor} from the memory-mapped per-rank files.

    Pickles without its open maps (DataLoader workers open their own on first use)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.world = int(self.meta["world"])
        self.dtype = _DTYPES[self.meta["dtype"]]
        self.index = {int(p): i for i, p in enumerate(self.meta["positions"])}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "maps"}

    def _maps(self, rank: int) -> dict[str, np.ndarray]:
        maps = self.__dict__.setdefault("maps", {})
        if rank not in maps:
            maps[rank] = {f: np.load(self.root / f"r{rank}-{f}.npy", mmap_mode="r") for f in FIELDS}
        return maps[rank]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, position: int) -> bool:
        return int(position) in self.index

    def row(self, position: int) -> dict[str, torch.Tensor]:
        i = self.index[int(position)]
        arrays = self._maps(i % self.world)
        out = {}
        for f in FIELDS:
            a = np.array(arrays[f][i // self.world])  # a copy: the map stays read-only
            out[f] = torch.from_numpy(a.view(np.int16)).view(self.dtype) if a.dtype == np.uint16 else torch.from_numpy(a)
        out["embedding"] = out["embedding"].float()
        return out

    def constants(self, device: torch.device | str = "cpu") -> CachedConstants:
        from safetensors.torch import load_file

        c = load_file(str(self.root / "constants.safetensors"))
        return CachedConstants(c["empty_text"], c["black_clip"]).to(torch.device(device))


def _store(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.float().numpy()


# --------------------------------------------------------------------------- write side


@dataclass
class RawSample:
    """What the encoders read for one training image (prepared-data decoding, CPU)."""

    position: int
    pixels: torch.Tensor      # [3, S, S] in [0, 1]
    face_crop: torch.Tensor   # [3, C, C] in [0, 1]
    caption: str
    embedding: torch.Tensor   # [id_dim]


class _Positions(torch.utils.data.Dataset):
    def __init__(self, root: Path, positions: list[int], resolution: int):
        self.root, self.positions, self.resolution = root, positions, resolution

    @cached_property
    def data(self) -> "PreparedData":
        from components.core.shards import PreparedData

        return PreparedData(self.root)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> RawSample:
        from components.train.images import image_tensor

        p = self.positions[i]
        s = self.data.sample(p)
        return RawSample(p, image_tensor(s.pixels, self.resolution), image_tensor(s.face_crop), s.caption,
                         torch.from_numpy(s.embedding.copy()))


def prepared_samples(root: Path, positions: list[int], resolution: int, batch_size: int,
                     num_workers: int) -> Iterator[list[RawSample]]:
    """Batches of decoded prepared samples, in ``positions`` order (decoded in DataLoader workers)."""
    loader = torch.utils.data.DataLoader(_Positions(root, positions, resolution), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list)
    yield from loader


@torch.no_grad()
def encode_batch(bb: "Backbone", samples: list[RawSample]) -> dict[str, torch.Tensor]:
    """Frozen encoders on one batch -> {field: [B, ...]} in the encoders' dtype (embedding fp32)."""
    from components.train.losses import encode_moments
    from model.dynamicid import clip_image_features, text_embeddings

    pixels = torch.stack([s.pixels for s in samples])
    crops = torch.stack([s.face_crop for s in samples]).to(bb.image_encoder.device)
    text, _ = text_embeddings(bb, [s.caption for s in samples])
    return {"moments": encode_moments(bb.vae, pixels), "clip": clip_image_features(bb, crops), "text": text,
            "embedding": torch.stack([s.embedding for s in samples]).float()}


@torch.no_grad()
def unconditional_constants(bb: "Backbone") -> CachedConstants:
    from model.dynamicid import clip_image_features, text_embeddings

    empty, _ = text_embeddings(bb, [""])
    size = bb.image_size
    black = clip_image_features(bb, torch.zeros(1, 3, size, size, device=bb.image_encoder.device))
    return CachedConstants(empty[0], black[0])


def build_feature_cache(out: Path, key: str, positions: Sequence[int], batches: Iterable[list[RawSample]],
                        bb: "Backbone", dist: "DistInfo", *, total: int | None = None) -> Path:
    """Encode this rank's share of ``positions`` (``batches`` yields exactly ``positions[rank::world]``,
    in order) into ``out/<key>``; rank 0 adds the constants and, after a barrier, ``meta.json``.
    Returns the cache directory (complete once every rank has returned)."""
    from tqdm.auto import tqdm

    final = out / key
    mine = list(positions)[dist.rank::dist.world_size]
    final.mkdir(parents=True, exist_ok=True)
    maps: dict[str, np.ndarray] = {}
    done = 0
    bar = tqdm(total=total if total is not None else len(mine), desc="cache frozen features",
               disable=not dist.is_main, dynamic_ncols=True, mininterval=1.0)
    dtype = None
    for batch in batches:
        if [s.position for s in batch] != mine[done:done + len(batch)]:
            raise RuntimeError("feature cache: samples arrived out of order")
        feats = encode_batch(bb, batch)
        dtype = feats["moments"].dtype
        if not maps:
            for f, t in feats.items():
                arr = _store(t[:1])
                maps[f] = np.lib.format.open_memmap(final / f".r{dist.rank}-{f}.npy.tmp", mode="w+",
                                                    dtype=arr.dtype, shape=(len(mine), *arr.shape[1:]))
        for f, t in feats.items():
            maps[f][done:done + len(batch)] = _store(t)
        done += len(batch)
        bar.update(len(batch) * (dist.world_size if total is not None else 1))
    bar.close()
    if done != len(mine):
        raise RuntimeError(f"feature cache: encoded {done} of {len(mine)} samples")
    for f in list(maps):  # a rank without positions (fewer images than processes) writes no files
        maps[f].flush()
        del maps[f]
        os.replace(final / f".r{dist.rank}-{f}.npy.tmp", final / f"r{dist.rank}-{f}.npy")
    if dist.is_main:
        from safetensors.torch import save_file

        c = unconditional_constants(bb)
        save_file({"empty_text": c.empty_text.contiguous().cpu(), "black_clip": c.black_clip.contiguous().cpu()},
                  str(final / "constants.safetensors"))
    dist.barrier()
    if dist.is_main:
        meta = {"format": FORMAT_VERSION, "key": key, "world": dist.world_size,
                "dtype": _DTYPE_NAMES[dtype or bb.vae.dtype],
                "positions": [int(p) for p in positions]}
        tmp = final / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, final / "meta.json")
    dist.barrier()
    return final


def open_or_build(out: Path, key: str, positions: Sequence[int], make_batches, bb: "Backbone",
                  dist: "DistInfo") -> tuple[FeatureCache, bool]:
    """The complete cache under ``out/<key>`` if there is one (-> (cache, True)), else build it;
    rank 0 removes caches of other keys (stale inputs) first."""
    final = out / key
    meta = final / "meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("format") == FORMAT_VERSION and m.get("key") == key and m.get("positions") == list(map(int, positions)):
            log.info("frozen features: reusing %s", final)
            return FeatureCache(final), True
    dist.barrier()  # every rank has looked before rank 0 cleans up
    if dist.is_main:
        if out.is_dir():
            for old in out.iterdir():
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    log.info("frozen features: encoding %d training images into %s", len(positions), final)
    mine = list(positions)[dist.rank::dist.world_size]
    return FeatureCache(build_feature_cache(out, key, positions, make_batches(mine), bb, dist,
                                            total=len(positions))), False


# --------------------------------------------------------------------------- device residency


def frozen_encoders(bb: "Backbone") -> list[torch.nn.Module]:
    """The modules stage-1 steps do not need once features are cached (the UNet stays)."""
    return [bb.vae, bb.text_encoder, bb.image_encoder]


def offload(bb: "Backbone") -> None:
    """Frozen encoders to the host: the GPU keeps the UNet and the trainable parts only."""
    moved = False
    for m in frozen_encoders(bb):
        if next(m.parameters()).device.type != "cpu":
            m.to("cpu")
            moved = True
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()


class encoders_on:
    """``with encoders_on(bb, device):`` the frozen encoders on ``device`` (sample grids, learning
    checks), back on the host afterwards if they were there before."""

    def __init__(self, bb: "Backbone", device: torch.device):
        self.bb, self.device = bb, torch.device(device)
        self.was: list[torch.device] = []

    def __enter__(self) -> None:
        self.was = [next(m.parameters()).device for m in frozen_encoders(self.bb)]
        for m in frozen_encoders(self.bb):
            m.to(self.device)

    def __exit__(self, *exc) -> None:
        for m, d in zip(frozen_encoders(self.bb), self.was):
            m.to(d)
        if self.device.type == "cuda" and any(d.type == "cpu" for d in self.was):
            torch.cuda.empty_cache()

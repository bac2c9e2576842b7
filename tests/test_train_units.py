"""Training building blocks in one process, without DeepSpeed: the DeepSpeed config, the slot
data order, held-out split, CFG drops, stage-2 pairs, the two stage objectives (what learns, which
encoders run, per-sample randomness) and atomic checkpoints."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from components.core.config import ParamsError, params_from_dict
from components.core.config.train import StageParams, TrainParams
from components.train.checkpoints import CheckpointStore
from components.train.data import (
    AnchorSamples,
    MotionPairs,
    SlotBatches,
    SlotOrder,
    batch_slots,
    collate,
    holdout_split,
)
from components.train.deepspeed_config import deepspeed_config
from components.train.distributed import DistInfo


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("prepared")
    write_testbed(root, identities=4, images_per_identity=5, test_identities=1)
    return root


@pytest.fixture(scope="module")
def data(prepared):
    from components.core.shards import PreparedData

    return PreparedData(prepared)


# --------------------------------------------------------------------------- config


def test_deepspeed_config_comes_from_params_in_one_place():
    train = TrainParams(zero_stage=2, precision="bf16", weight_decay=0.03, betas=(0.8, 0.95), grad_clip=0.5,
                        warmup_min_ratio=0.1, min_lr_ratio=0.2)
    stage = StageParams(steps=120, lr=3e-4, micro_batch=6, grad_accum=3, warmup_steps=7)
    cfg = deepspeed_config(train, stage, device_type="cpu")
    assert cfg["train_micro_batch_size_per_gpu"] == 6 and cfg["gradient_accumulation_steps"] == 3
    assert "train_batch_size" not in cfg  # derived by DeepSpeed for any world size
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"] == {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-8, "weight_decay": 0.03, "torch_adam": True}
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"] == {"total_num_steps": 120, "warmup_num_steps": 7, "warmup_min_ratio": 0.1,
                               "cos_min_ratio": 0.2, "warmup_type": "linear"}
    gpu = deepspeed_config(train, stage, device_type="cuda", lr=1e-3, steps=40)
    assert gpu["optimizer"]["params"]["torch_adam"] is False  # FusedAdam on GPU
    assert gpu["optimizer"]["params"]["lr"] == 1e-3 and gpu["scheduler"]["params"]["total_num_steps"] == 40
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        deepspeed_config(TrainParams(precision="fp16"), stage, device_type="cpu")


def test_drop_rates_must_leave_samples_with_text_and_id():
    with pytest.raises(ParamsError, match=r"train.*drop_text \+ drop_id \+ drop_both must be < 1"):
        params_from_dict({"train": {"drop_text": 0.5, "drop_id": 0.4, "drop_both": 0.2}})
    # exactly 1 (a stage-1 run on a GPU, 2026-12-05): the model never trained the caption + identity condition
    with pytest.raises(ParamsError, match=r"train.*drop_text \+ drop_id \+ drop_both must be < 1"):
        params_from_dict({"train": {"drop_text": 0.9}})
    assert params_from_dict({"train": {"drop_text": 0.85}}).train.drop_text == 0.85
    with pytest.raises(ParamsError, match=r"train\.anchor\.stepz: unknown key"):
        params_from_dict({"train": {"anchor": {"stepz": 3}}})


# --------------------------------------------------------------------------- data order


def test_slots_cover_every_sample_once_across_ranks_and_resume_is_a_suffix():
    world, mb, accum, steps = 3, 2, 2, 5
    seen = []
    for rank in range(world):
        for batch in SlotBatches(0, steps, rank=rank, world=world, micro_batch=mb, accum=accum):
            seen += batch
    assert sorted(seen) == list(range(steps * accum * world * mb))  # a partition: no overlap, no gap
    full = list(SlotBatches(0, steps, rank=1, world=world, micro_batch=mb, accum=accum))
    resumed = list(SlotBatches(3, steps, rank=1, world=world, micro_batch=mb, accum=accum))
    assert resumed == full[3 * accum:]
    assert batch_slots(2, 1, rank=0, world=world, micro_batch=mb, accum=accum)[0] == ((2 * accum + 1) * world) * mb


def test_slot_order_is_a_fresh_permutation_each_epoch_and_seeded():
    order = SlotOrder(7, seed=3)
    epochs = [[order(e * 7 + i)[1] for i in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    again = SlotOrder(7, seed=3)
    assert [again(i)[1] for i in range(21)] == [u for e in epochs for u in e]
    other = SlotOrder(7, seed=4)
    assert [other(i)[1] for i in range(21)] != [u for e in epochs for u in e]


def test_holdout_split_is_deterministic_per_identity_and_keeps_two_for_training(data):
    split = holdout_split(data, per_identity=2)
    ids = Counter(data.index[p]["identity"] for p in split.heldout)
    assert set(ids.values()) == {2} and len(ids) == 3  # train identities only (one identity is "test")
    assert not set(split.train) & set(split.heldout)
    assert all(data.index[p]["split"] == "train" for p in split.train + split.heldout)
    for ident, count in ids.items():  # the held-out images are the ones with the smallest keys
        keys = sorted(r["key"] for r in data.index if r["identity"] == ident)
        assert sorted(data.index[p]["key"] for p in split.heldout if data.index[p]["identity"] == ident) == keys[:2]
    too_many = holdout_split(data, per_identity=4)  # 5 images: holding out 4 would leave 1
    assert too_many.heldout == [] and len(too_many.train) == 15


def test_cfg_drops_have_their_probabilities_and_depend_only_on_the_slot(prepared, data):
    split = holdout_split(data, per_identity=0)
    ds = AnchorSamples(prepared, split.train, seed=0, resolution=64, drop_text=0.2, drop_id=0.15, drop_both=0.25)
    n = 1200
    cases = Counter((bool(ds[s]["drop_text"]), bool(ds[s]["drop_id"])) for s in range(n))
    expected = {(True, False): 0.2, (False, True): 0.15, (True, True): 0.25, (False, False): 0.4}
    for case, p in expected.items():
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(cases[case] - n * p) < 4 * sd, (case, cases[case], n * p)
    again = AnchorSamples(prepared, split.train, seed=0, resolution=64, drop_text=0.2, drop_id=0.15, drop_both=0.25)
    a, b = ds[17], again[17]
    assert (a["drop_text"], a["drop_id"], a["caption"]) == (b["drop_text"], b["drop_id"], b["caption"])
    assert torch.equal(a["pixels"], b["pixels"]) and a["pixels"].shape == (3, 64, 64)


def test_motion_pairs_are_one_person_in_other_motions(prepared, data):
    split = holdout_split(data, per_identity=1)
    prompts = {p: data.index[p]["face_prompt"] for p in split.train}
    idents = {p: data.index[p]["identity"] for p in split.train}
    ds = MotionPairs(prepared, split.train, seed=0, resolution=64, landmark_size=48, targets=2, prompts=prompts,
                     identities=idents)
    assert len(ds.units) == 3  # train identities with >= 2 training images
    for slot in range(12):
        group = ds.units[ds.order(slot)[1]]
        source, targets = ds.pick(group, __import__("numpy").random.default_rng([0, 2, slot]))
        assert source in group and all(t in group and t != source for t in targets)
        assert all(prompts[t] != prompts[source] for t in targets)
    item = ds[5]
    assert item["tgt_crop"].shape[0] == 2 and item["tgt_landmarks"].shape == (2, 1, 48, 48)
    assert item["src_landmarks"].max() > 0.5 and len(item["tgt_prompt"]) == 2  # dots survive the resize
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["tgt_pixels"].shape == (3, 2, 3, 64, 64) and len(batch["tgt_prompt"]) == 3


# --------------------------------------------------------------------------- objectives


@pytest.fixture()
def backbone(tiny_params):
    """A fresh frozen tiny backbone per test (SAA installs into its UNet)."""
    from model.loading import load_backbone_for

    return load_backbone_for(tiny_params.model, tiny_params.storage.cache_dir)


def _dyn(backbone, tiny_params, seed=0):
    from model.dynamicid import build_dynamicid

    torch.manual_seed(seed)
    return build_dynamicid(backbone, tiny_params.model, "dlib")


class _Calls:
    """Counts forward calls of modules (and whether their output carried a gradient graph)."""

    def __init__(self, **modules):
        self.count = Counter()
        self.grad: dict[str, list[bool]] = {k: [] for k in modules}
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(_m, _inp, out):
            self.count[key] += 1
            t = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            t = getattr(t, "last_hidden_state", t)
            self.grad[key].append(bool(getattr(t, "requires_grad", False)))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _anchor_batch(prepared, data, slots, **drops):
    split = holdout_split(data, per_identity=0)
    ds = AnchorSamples(prepared, split.train, seed=0, resolution=64, drop_text=0.0, drop_id=0.0, drop_both=0.0)
    batch = collate([ds[s] for s in slots])
    for k, v in drops.items():
        batch[k] = list(v)
    return batch


def test_anchor_objective_trains_only_face_encoder_and_saa(backbone, tiny_params, prepared, data):
    from components.train.tasks import AnchorTask
    from model.dynamicid import clip_image_features, tokenize

    dyn = _dyn(backbone, tiny_params)
    task = AnchorTask(backbone, dyn, tiny_params.model, seed=0)
    batch = _anchor_batch(prepared, data, [0, 1, 2], drop_text=[False, True, True], drop_id=[False, False, True])
    calls = _Calls(vae=backbone.vae.encoder, text=backbone.text_encoder, clip=backbone.image_encoder,
                   face=dyn.face_encoder, unet=backbone.unet)
    seen = {}
    hooks = [dyn.face_encoder.register_forward_hook(lambda m, i, o: seen.update(tokens=o.detach())),
             backbone.text_encoder.register_forward_hook(lambda m, a, kw, o: seen.update(ids=kw["input_ids"]),
                                                         with_kwargs=True)]
    try:
        loss, parts = task(batch)
    finally:
        calls.close()
        for h in hooks:
            h.remove()
    # every encoder exactly once for the whole batch (dropped rows included)
    assert dict(calls.count) == {"vae": 1, "text": 1, "clip": 1, "face": 1, "unet": 1}
    loss.backward()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("dyn.face_encoder.", "dyn.saa.")) for n in trainable)
    assert any(n.startswith("dyn.saa.") and "to_k_id" in n for n in trainable)
    assert all(p.grad is not None for n, p in task.named_parameters() if n in trainable)
    assert all(p.grad is None for p in dyn.imr.parameters()) and all(p.grad is None for p in dyn.keypoint_encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for n, p in backbone.unet.named_parameters()
               if ".processor." not in n)
    assert float(parts["loss"]) == pytest.approx(float(loss.detach()))
    # the ID-dropped row got the unconditional tokens (zero embedding + CLIP of a black crop)
    with torch.no_grad():
        black = clip_image_features(backbone, torch.zeros(1, 3, 64, 64))
        uncond = dyn.face_encoder.unconditional_tokens(black)[0]
    assert torch.allclose(seen["tokens"][2], uncond, atol=1e-5)
    assert not torch.allclose(seen["tokens"][1], uncond, atol=1e-3)
    # the text-dropped rows got the empty prompt
    empty = tokenize(backbone, [""])[0]
    assert torch.equal(seen["ids"][1], empty) and torch.equal(seen["ids"][2], empty)
    assert not torch.equal(seen["ids"][0], empty)


def test_anchor_randomness_is_per_sample_so_batches_decompose(backbone, tiny_params, prepared, data):
    """A batch's loss is the mean of its samples' losses computed alone: what a sample gets
    (noise, timestep, latent draw) depends on its slot only, so any process count / micro-batch
    split of one global batch trains on the same thing."""
    from components.train.tasks import AnchorTask

    task = AnchorTask(backbone, _dyn(backbone, tiny_params), tiny_params.model, seed=5)
    with torch.no_grad():
        both, _ = task(_anchor_batch(prepared, data, [3, 8], drop_text=[False, False], drop_id=[False, False]))
        one, _ = task(_anchor_batch(prepared, data, [3], drop_text=[False], drop_id=[False]))
        two, _ = task(_anchor_batch(prepared, data, [8], drop_text=[False], drop_id=[False]))
        other_seed = AnchorTask(backbone, task.dyn, tiny_params.model, seed=6)
        moved, _ = other_seed(_anchor_batch(prepared, data, [3, 8], drop_text=[False, False], drop_id=[False, False]))
    assert float(both) == pytest.approx((float(one) + float(two)) / 2, rel=1e-5)
    assert float(moved) != pytest.approx(float(both), rel=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(backbone, tiny_params, prepared, data):
    from components.train.tasks import AnchorTask

    task = AnchorTask(backbone, _dyn(backbone, tiny_params), tiny_params.model, seed=0)
    batch = _anchor_batch(prepared, data, [1, 2], drop_text=[False, False], drop_id=[False, False])

    def grads():
        task.zero_grad(set_to_none=True)
        loss, _ = task(batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad}

    plain_loss, plain = grads()
    backbone.unet.enable_gradient_checkpointing()
    ckpt_loss, ckpt = grads()
    assert backbone.unet.is_gradient_checkpointing
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-4, atol=1e-7), n


def test_gradient_checkpointing_mode_is_validated():
    assert TrainParams(gradient_checkpointing="high_res").gradient_checkpointing == "high_res"
    assert TrainParams(gradient_checkpointing=True).gradient_checkpointing is True
    assert TrainParams(gradient_checkpointing=False).gradient_checkpointing is False
    auto = TrainParams()  # the default: high_res on CUDA (measured, docs/benchmarks.md), off on CPU
    assert auto.gradient_checkpointing == "auto"
    assert auto.checkpointing_for("cuda") == "high_res" and auto.checkpointing_for("cpu") is False
    assert TrainParams(gradient_checkpointing=True).checkpointing_for("cpu") is True
    with pytest.raises(ParamsError, match=r"train\.gradient_checkpointing"):
        params_from_dict({"train": {"gradient_checkpointing": "mid_res"}})


def test_high_res_checkpointing_wraps_only_the_latent_resolution_blocks(backbone, tiny_params, prepared, data):
    """``high_res`` recomputes exactly the first down block and the last up block (their resnets
    and transformer blocks run twice: forward and recomputation in backward; every other block
    once) and gives the loss and gradients of the run without checkpointing."""
    from components.train.tasks import AnchorTask

    task = AnchorTask(backbone, _dyn(backbone, tiny_params), tiny_params.model, seed=0)
    unet = backbone.unet
    last_up = f"up_blocks.{len(unet.up_blocks) - 1}"
    batch = _anchor_batch(prepared, data, [1, 2], drop_text=[False, False], drop_id=[False, False])
    watched = {n: m for n, m in unet.named_modules()
               if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")}
    calls: Counter = Counter()
    # pre-hooks: a recomputation in backward stops once it has what backward needs (no forward hook)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: calls.update([n])) for n, m in watched.items()]

    def grads():
        task.zero_grad(set_to_none=True)
        calls.clear()
        loss, _ = task(batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad}

    try:
        plain_loss, plain = grads()
        assert set(calls.values()) == {1}
        on = task.set_gradient_checkpointing("high_res")
        sel_loss, sel = grads()
        sel_calls = dict(calls)
        assert task.set_gradient_checkpointing(False) == [] and not unet.is_gradient_checkpointing
    finally:
        for h in hooks:
            h.remove()
    high = ("down_blocks.0.", last_up + ".")
    assert {"down_blocks.0", last_up} <= set(on)  # the blocks (their resnets) and their transformers
    assert all(n in ("down_blocks.0", last_up) or n.startswith(high) for n in on)
    assert any(".attentions." in n for n in on)
    twice = {n for n, c in sel_calls.items() if c == 2}
    # recomputed in backward: every high-res module except the first resnet, which sees only the
    # gradient-free noisy latents (frozen UNet), so it saves nothing and has nothing to recompute
    assert twice == {n for n in watched if n.startswith(high)} - {"down_blocks.0.resnets.0"}
    assert {n for n, c in sel_calls.items() if c == 1} == set(watched) - twice
    assert any(".transformer_blocks." in n for n in twice) and any(".resnets." in n for n in twice)
    assert len(twice) < len(watched)  # the lower levels keep their activations
    assert sel_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == sel.keys()
    for n in plain:
        assert torch.allclose(plain[n], sel[n], rtol=1e-4, atol=1e-7), n


# --------------------------------------------------------------------------- frozen-feature cache


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory, tiny_params, prepared, data):
    """The training images' cache, built once for the module (frozen encoders only: any backbone will do)."""
    from model.loading import load_backbone_for

    bb = load_backbone_for(tiny_params.model, tiny_params.storage.cache_dir)
    return _build_cache(bb, prepared, data, tmp_path_factory.mktemp("features"),
                        holdout_split(data, per_identity=0).train)


def _build_cache(backbone, prepared, data, out, positions, *, rank=0, world=1, key="k"):
    from components.train.feature_cache import (
        FeatureCache,
        build_feature_cache,
        prepared_samples,
    )

    dist = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    mine = positions[rank::world]
    path = build_feature_cache(out, key, positions, prepared_samples(prepared, mine, 64, 3, 0), backbone, dist)
    return FeatureCache(path) if rank == 0 else path


def test_cached_step_is_the_uncached_objective(backbone, tiny_params, prepared, data, feature_cache):
    """Cached moments + a fresh posterior draw, cached CLIP/text features, and the cached
    unconditional inputs for dropped rows give the loss (and gradients) of the step that runs
    every frozen encoder, sample for sample."""
    from components.train.tasks import AnchorTask

    split = holdout_split(data, per_identity=0)
    cache = feature_cache
    task = AnchorTask(backbone, _dyn(backbone, tiny_params), tiny_params.model, seed=3)
    task.use_cached_features(cache.constants())
    slots = [0, 5, 9, 14]
    drops = dict(drop_text=[False, True, False, True], drop_id=[False, False, True, True])
    plain = _anchor_batch(prepared, data, slots, **drops)
    ds = AnchorSamples(prepared, split.train, seed=0, resolution=64, drop_text=0.0, drop_id=0.0, drop_both=0.0,
                       cache=cache)
    cached = collate([ds[s] for s in slots])
    cached.update(drops)
    h = 64 // backbone.vae_scale_factor
    assert "pixels" not in cached and cached["moments"].shape == (4, 2 * backbone.vae.config.latent_channels, h, h)
    assert cached["slot"] == slots  # host keys stay lists

    def run(batch):
        task.zero_grad(set_to_none=True)
        loss, _ = task(batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad}

    calls = _Calls(vae=backbone.vae.encoder, text=backbone.text_encoder, clip=backbone.image_encoder)
    try:
        loss_c, grad_c = run(cached)
    finally:
        calls.close()
    assert sum(calls.count.values()) == 0  # no frozen encoder ran
    loss_p, grad_p = run(plain)
    assert loss_c == pytest.approx(loss_p, rel=1e-5)
    for n in grad_p:
        assert torch.allclose(grad_c[n], grad_p[n], rtol=1e-3, atol=1e-6), n
    # the posterior is sampled each step, not frozen: other slots (other draws) of the same images differ
    again = collate([ds[s] for s in slots])
    again.update(drops, slot=[s + 1000 for s in slots])
    with torch.no_grad():
        assert float(task(again)[0]) != pytest.approx(loss_c, rel=1e-4)


def test_cached_posterior_sample_matches_diffusers(backbone):
    """posterior_sample reproduces DiagonalGaussianDistribution.sample for the same draw (logvar clamp included)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from components.train.losses import SampleRandom, posterior_sample

    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 5, 5, generator=g) * 4
    moments[0, 4:] = -50.0  # clamped logvar
    got = posterior_sample(moments, SampleRandom([7, 8, 9]), 0.5)
    eps = torch.stack([torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(s)) for s in (7, 8, 9)])[:, 0]
    dist = DiagonalGaussianDistribution(moments)
    assert torch.allclose(got, (dist.mean + dist.std * eps) * 0.5, atol=1e-6)


def test_cache_shards_by_rank_and_is_reused_only_for_the_same_inputs(backbone, prepared, data, tmp_path,
                                                                    feature_cache):
    from components.train.feature_cache import (
        FeatureCache,
        cache_key,
        open_or_build,
        prepared_samples,
    )

    positions = holdout_split(data, per_identity=1).train[::3]  # 3 identities x 3 images, every third: 3
    single = feature_cache
    # two ranks (no process group: barriers are no-ops): rank 1 writes only its own rows, and
    # the cache is complete (meta.json) only once rank 0 has finished too
    _build_cache(backbone, prepared, data, tmp_path / "two", positions, rank=1, world=2)
    assert not (tmp_path / "two" / "k" / "meta.json").exists()
    assert sorted(p.name for p in (tmp_path / "two" / "k").glob("r*.npy")) == [
        "r1-clip.npy", "r1-embedding.npy", "r1-moments.npy", "r1-text.npy"]
    two = _build_cache(backbone, prepared, data, tmp_path / "two", positions, rank=0, world=2)
    assert two.world == 2 and len(two) == len(positions)
    for p in positions:
        a, b = single.row(p), two.row(p)
        assert a.keys() == b.keys()  # other batch groupings: equal up to float summation order
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a), p
    # what is stored is what the encoders give
    from components.train.images import image_tensor
    from model.dynamicid import clip_image_features, text_embeddings

    s = data.sample(positions[3])
    row = single.row(positions[3])
    assert torch.allclose(row["clip"], clip_image_features(backbone, image_tensor(s.face_crop)[None])[0], atol=1e-6)
    assert torch.allclose(row["text"], text_embeddings(backbone, [s.caption])[0][0], atol=1e-6)
    assert torch.equal(row["embedding"], torch.from_numpy(s.embedding))
    const = single.constants()
    assert torch.allclose(const.empty_text, text_embeddings(backbone, [""])[0][0], atol=1e-6)
    # bf16 survives storage bit for bit
    from components.train.feature_cache import _store

    x = torch.randn(2, 3).to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(_store(x).view("int16")).view(torch.bfloat16), x)

    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    key = lambda res: cache_key(encoders=[(backbone.base_dir, ["vae", "text_encoder"])], data_hash="d",  # noqa: E731
                                positions=positions, resolution=res, dtype=torch.float32)
    assert key(64) == key(64) and key(64) != key(32)
    built = []

    def batches(mine):
        built.append(len(mine))
        return prepared_samples(prepared, mine, 64, 4, 0)

    out = tmp_path / "stage"
    first, reused = open_or_build(out, key(64), positions, batches, backbone, dist)
    second, reused2 = open_or_build(out, key(64), positions, batches, backbone, dist)
    assert (reused, reused2) == (False, True) and built == [len(positions)]
    (out / key(64) / "meta.json").unlink()  # killed before completion: rebuilt
    _, reused3 = open_or_build(out, key(64), positions, batches, backbone, dist)
    assert reused3 is False and len(built) == 2
    _, reused4 = open_or_build(out, key(32), positions, batches, backbone, dist)  # other inputs: a new cache
    assert reused4 is False and sorted(p.name for p in out.iterdir()) == [key(32)]
    assert isinstance(FeatureCache(out / key(32)), FeatureCache)


def test_cached_step_reads_no_tensor_on_the_host(backbone, tiny_params, prepared, data, feature_cache, monkeypatch):
    """Nothing in the cached stage-1 step (forward and backward) pulls a tensor value to the host:
    on a GPU each of these would wait for the device (seeds, drop flags, masks come from host lists)."""
    from components.train.tasks import AnchorTask

    split = holdout_split(data, per_identity=0)
    cache = feature_cache
    task = AnchorTask(backbone, _dyn(backbone, tiny_params), tiny_params.model, seed=0)
    task.use_cached_features(cache.constants())
    ds = AnchorSamples(prepared, split.train, seed=0, resolution=64, drop_text=0.3, drop_id=0.3, drop_both=0.3,
                       cache=cache)
    batch = collate([ds[s] for s in range(6)])
    task(batch)  # first step: the SAA context builds its masks once

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"host read in the step: Tensor.{name}")
        return f

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    loss, parts = task(batch)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and set(parts) == {"loss"}


def _pairs_batch(prepared, data, slots, landmark_size):
    split = holdout_split(data, per_identity=0)
    ds = MotionPairs(prepared, split.train, seed=0, resolution=64, landmark_size=landmark_size, targets=2,
                     prompts={p: data.index[p]["face_prompt"] for p in split.train},
                     identities={p: data.index[p]["identity"] for p in split.train})
    return collate([ds[s] for s in slots])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_reconfigure_objective_trains_only_imr_and_keypoints(backbone, tiny_params, prepared, data, weights):
    from components.train.tasks import ReconfigureTask

    dyn = _dyn(backbone, tiny_params)
    fw, dw, cw = weights
    task = ReconfigureTask(backbone, dyn, tiny_params.model, seed=0, prompt="a photo of a person",
                           feature_weight=fw, denoise_weight=dw, contrastive_weight=cw, temperature=0.1)
    batch = _pairs_batch(prepared, data, [0, 1, 2], dyn.dims.imr["landmark_size"])
    calls = _Calls(vae=backbone.vae.encoder, text=backbone.text_encoder, clip=backbone.image_encoder,
                   face=dyn.face_encoder, kp=dyn.keypoint_encoder, unet=backbone.unet)
    try:
        loss, parts = task(batch)
    finally:
        calls.close()
    expected_calls = {"text": 1, "clip": 1, "face": 1, "kp": 1}
    if dw:
        expected_calls.update(vae=1, unet=2)
    assert dict(calls.count) == expected_calls
    if dw:  # the target-token branch ran without a graph, the predicted-token branch with one
        assert calls.grad["unet"] == [False, True]
        assert calls.grad["face"] == [False]
    total = sum(w * float(parts.get(k, 0.0)) for w, k in zip(weights, ("feature", "denoise", "contrastive")))
    assert float(loss.detach()) == pytest.approx(total, rel=1e-6)
    loss.backward()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert all(n.startswith(("dyn.imr.", "dyn.keypoint_encoder.")) for n in trainable)
    assert all(p.grad is None for p in dyn.face_encoder.parameters()) and all(p.grad is None for p in dyn.saa.parameters())
    disentangle = [p.grad for p in dyn.imr.disentangle_layers.parameters()]
    entangle = [p.grad for p in dyn.imr.entangle_layers.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in disentangle)
    if cw and not fw and not dw:  # InfoNCE acts on the erased tokens only: nothing reaches the entangle net
        assert all(g is None for g in entangle)
        assert float(parts["contrastive"]) > 0
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in entangle)
        assert "contrastive" not in parts


# --------------------------------------------------------------------------- checkpoints


class _Engine:
    """Writes what a DeepSpeed engine would (one file) so the store's commit protocol can be tested."""

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        assert save_latest is False and exclude_frozen_parameters is True
        Path(save_dir, tag).mkdir(parents=True)
        Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_checkpoint_becomes_latest_only_when_complete(tmp_path):
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None

    def export(d: Path) -> None:
        d.mkdir()
        (d / "manifest.json").write_text("{}")

    first = store.save(_Engine(), 2, {"stage": "anchor"}, export, dist)
    assert store.latest() == first and (tmp_path / "latest").read_text().strip() == "step-000002"
    assert json.loads((first.path / "state.json").read_text())["step"] == 2

    def broken(d: Path) -> None:  # dies half-way through writing step 4
        d.mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.save(_Engine(), 4, {}, broken, dist)
    assert store.latest() == first and not (tmp_path / "step-000004").exists()
    # a pointer at something incomplete is ignored in favour of the newest complete checkpoint
    (tmp_path / "step-000006").mkdir()
    (tmp_path / "latest").write_text("step-000006\n")
    assert store.latest().step == 2
    for step in (6, 8, 10):
        store.save(_Engine(), step, {}, export, dist)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-000008", "step-000010"]  # keep=2, stale temp dirs removed
    assert store.latest().step == 10 and store.latest().export_dir.joinpath("manifest.json").exists()


# --------------------------------------------------------------------------- command line


def test_cli_errors_name_the_problem_before_any_training(tmp_path, prepared, capsys):
    from components.cli import main

    base = ["-S", f"storage.cache_dir={tmp_path}", "-S", f"data.prepared={prepared}"]
    assert main(base + ["train", "--stage", "anchor", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert main(base + ["-S", f"train.anchor.output={tmp_path / 'none'}", "train", "--stage", "reconfigure"]) == 2
    assert "reconfigure starts from the stage-1 export" in capsys.readouterr().err
    assert main(["-S", f"data.prepared={tmp_path / 'missing'}", "train", "--stage", "anchor"]) == 2
    assert "no prepared data there" in capsys.readouterr().err


def test_sd15_profile_skips_the_base_stage(tmp_path):
    import torch.distributed as dist

    from components.cli import main

    out = tmp_path / "base"
    assert main(["-S", "model.profile=sd15", "-S", f"train.base.output={out}", "train", "--stage", "base"]) == 0
    assert json.loads((out / "export" / "skipped.json").read_text())["skipped"] is True
    assert (out / "metrics.json").exists() and (out / "loss.tsv").exists()
    assert not dist.is_initialized()  # the skip never starts a process group


# (the learning checks and their statistics: tests/test_learning_checks.py)


def test_loading_the_base_and_the_pipelines_prints_no_library_notices(cache_dir):
    """transformers announces its PIL fallback for every image processor class, diffusers asks for accelerate on
    every load and advises on casting an empty list of float32 modules; `make run` must show none of it."""
    import subprocess
    import sys

    code = ("from model.loading import load_backbone_for; from components.core.config import params_from_dict; "
            f"p = params_from_dict({{'storage': {{'cache_dir': {str(cache_dir)!r}}}}}); "
            "load_backbone_for(p.model, p.storage.cache_dir); "
            "from model.loading import load_pipeline; load_pipeline(p.model, p.face, None, p.storage.cache_dir); "
            "from diffusers import StableDiffusionPipeline; print('loaded')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert run.returncode == 0 and run.stdout.strip() == "loaded", run.stderr[-2000:]
    for notice in ("torchvision", "accelerate", "float32"):
        assert notice not in run.stderr, run.stderr[-2000:]


def test_cuda_arch_lists_that_deepspeed_cannot_parse_are_rewritten(monkeypatch):
    """CUDA images name sm_90a-style targets; DeepSpeed's JIT builder (FusedAdam on a GPU) fails on them. The
    rewritten list builds the plain targets, with DeepSpeed's own parser as the judge."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, also on a CPU machine

    from components.train.distributed import deepspeed_arch_list

    image = "8.0 9.0a;10.0a+PTX"
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", image)
    with pytest.raises(ValueError, match="0a"):
        builder.compute_capability_args()
    fixed = deepspeed_arch_list(image)
    assert fixed == "8.0;9.0;10.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", fixed)
    builder.compute_capability_args()  # parses; DeepSpeed writes back the list it will build for
    assert os.environ["TORCH_CUDA_ARCH_LIST"].split(";") == ["8.0", "9.0", "10.0+PTX"]
    assert deepspeed_arch_list("8.0;9.0+PTX") is None and deepspeed_arch_list(None) is None

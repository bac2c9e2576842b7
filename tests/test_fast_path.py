"""The fast inference path (model/fast/) computes what the plain path computes.

CPU, tiny profile: the bucket runner runs eagerly here (mode "eager"), through the same
static buffers that CUDA graphs replay on a GPU, so a stale mask or scale would show here
too. The GPU replay itself is checked by the benchmark (benchmarks/checks.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from model.dynamicid import clip_image_features
from model.fast.buckets import BucketStepRunner
from model.fast.enable import enable_fast_path
from model.fast.gate import _gate_add_functional, gate_add_eager
from model.fast.processor import FastSAAProcessor, fast_processors
from model.loading import init_checkpoint, load_pipeline
from model.pipeline import IdentityInput
from model.saa.context import IDContext
from model.saa.install import install_saa, merge_lora
from model.saa.processor import SAAAttnProcessor

TOL = 2e-4  # fp32 images in [0, 1]: the fast path reorders a few float ops (scale into V, 1/(b+1) as a product)


# --------------------------------------------------------------------------- UNet level


def _tiny_unet(cross: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    install_saa(unet, lora_rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random LoRA and ID projections: zero-init must not hide a wrong merge or branch
        for name, p in unet.named_parameters():
            if "lora" in name or "_id." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    merge_lora(unet)
    return unet.requires_grad_(False)


@pytest.fixture(scope="module")
def unet_pair():
    plain = _tiny_unet()
    fast = _tiny_unet()
    runner = BucketStepRunner(fast, capture=False, precomputed=True)
    from model.fast.processor import install_fast_processors

    install_fast_processors(fast, "eager")
    assert len(fast_processors(fast)) == 7 and all(p.fast_ok for _, _, p in fast_processors(fast))
    return plain, fast, runner


def _step_inputs(batch: int, num_ids: int, sources: int = 1, seed: int = 0, hw=(16, 12)):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *hw, generator=g)
    states = torch.randn(batch, 7 + 4 * num_ids * sources, 32, generator=g)
    return latents, torch.tensor(321), states


CASES = [
    dict(num_ids=1),
    dict(num_ids=1, boost_active=True),
    dict(num_ids=2, regions=torch.tensor([[0.0, 0.0, 1.0, 0.4], [0.2, 0.5, 0.9, 1.0]])),
    dict(num_ids=2, boost_active=True, id_scale=torch.tensor([1.0, 0.5])),
    dict(num_ids=3, gating=False, boost_active=True),
    dict(num_ids=3, gating=False),
    dict(num_ids=2, regions=torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]],
                                          [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]]), tau=0.5),
    dict(num_ids=1, mix_scale=0.3, id_scale=0.7),
    # per identity [B, N]: folded into each identity's own values
    dict(num_ids=2, boost_active=True, id_scale=torch.tensor([[1.0, 0.0], [0.5, 2.0]])),
    dict(num_ids=3, regions=torch.tensor([[0.0, 0.0, 1.0, 0.4], [0.0, 0.3, 1.0, 0.7], [0.0, 0.6, 1.0, 1.0]]),
         id_scale=torch.tensor([[0.0, 1.5, 0.7]])),
    dict(num_ids=1, mix_scale=0.3, id_scale=torch.tensor([[0.7], [1.3]])),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}" for k in c))
def test_runner_step_matches_plain_unet(unet_pair, case):
    plain, fast, runner = unet_pair
    sources = 2 if case.get("mix_scale") is not None else 1
    latents, t, states = _step_inputs(2, case["num_ids"], sources, seed=len(str(case)))
    boost = case.get("boost_active", False)
    kw = {k: v for k, v in case.items() if k != "boost_active"}
    ctx_plain = IDContext(latent_hw=(16, 12), **kw)
    ctx_plain.boost_active = boost
    ctx_fast = IDContext(latent_hw=(16, 12), **kw)
    ctx_fast.boost_active = boost
    want = plain(latents, t, encoder_hidden_states=states, cross_attention_kwargs={"id_context": ctx_plain}).sample
    got = runner(latents, t, states, ctx_fast)
    base = plain(latents, t, encoder_hidden_states=states[:, :7]).sample
    assert (want - base).abs().max() > 1e-3, "the ID branch must change the output, or this test proves nothing"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_per_identity_scales_through_one_bucket_and_the_unfolded_runner(unet_pair):
    """Per-sample and per-identity scales alternate through one bucket (the scale buffer is reloaded
    per request), and the runner without precomputed values (plain processors reading the bucket's
    [B, N] scale) gives the plain UNet's result too: equal scales per person exactly as the [B] form."""
    plain, fast, runner = unet_pair
    latents, t, states = _step_inputs(2, 2, seed=13)
    eager = BucketStepRunner(plain, capture=False, precomputed=False)
    scales = [torch.tensor([[1.0, 0.0], [0.3, 1.0]]), torch.tensor([1.0, 0.3]), torch.tensor([[1.0, 1.0], [0.3, 0.3]])]
    outs = []
    for scale in scales + scales[:1]:
        ref = IDContext(num_ids=2, latent_hw=(16, 12), id_scale=scale)
        want = plain(latents, t, encoder_hidden_states=states, cross_attention_kwargs={"id_context": ref}).sample
        got = runner(latents, t, states, IDContext(num_ids=2, latent_hw=(16, 12), id_scale=scale))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        unfolded = eager(latents, t, states, IDContext(num_ids=2, latent_hw=(16, 12), id_scale=scale))
        torch.testing.assert_close(unfolded, want, rtol=1e-5, atol=1e-6)
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=0)  # [s, s] per person: the [B] form's numbers
    torch.testing.assert_close(outs[0], outs[3], rtol=0, atol=0)


def test_bucket_replay_with_new_layout_is_not_stale(unet_pair):
    """Two layouts through one bucket: each gives its own plain result (masks reloaded per request)."""
    plain, fast, runner = unet_pair
    latents, t, states = _step_inputs(2, 2, seed=11)
    layouts = [torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]),
               torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])]
    outs = []
    before = None
    for regions in layouts + layouts[:1]:
        ctx = IDContext(num_ids=2, regions=regions, latent_hw=(16, 12))
        got = runner(latents, t, states, ctx)
        before = runner.num_buckets if before is None else before
        assert runner.num_buckets == before
        ref = IDContext(num_ids=2, regions=regions, latent_hw=(16, 12))
        want = plain(latents, t, encoder_hidden_states=states, cross_attention_kwargs={"id_context": ref}).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)


def test_new_states_in_same_context_are_reloaded(unet_pair):
    plain, fast, runner = unet_pair
    latents, t, states = _step_inputs(2, 1, seed=5)
    ctx = IDContext(num_ids=1, latent_hw=(16, 12))
    first = runner(latents, t, states, ctx)
    states.mul_(-1.0)  # in place: same object, new version
    got = runner(latents, t, states, ctx)
    want = plain(latents, t, encoder_hidden_states=states,
                 cross_attention_kwargs={"id_context": IDContext(num_ids=1, latent_hw=(16, 12))}).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (first - got).abs().max() > 1e-3


def test_gate_functional_matches_eager():
    """The function torch.compile fuses on GPU is the same math as the eager gate."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 30, 4, 8, generator=g)
    act = torch.randn(2, 30, 1, generator=g) * 5
    id_out = torch.randn(2, 4, 30, 8, generator=g).transpose(1, 2)
    add = (torch.rand(2, 30, 1, generator=g) > 0.5).float() * 4.0
    mul = torch.where(add > 0, 1.0, 0.2)
    for gating in (True, False):
        for boost in ((add, mul), None):
            want = gate_add_eager(out.clone(), act, id_out, 0.3, gating, boost)
            got = _gate_add_functional(out, act, id_out, *(boost or (None, None)), 0.3, gating)
            torch.testing.assert_close(got, want)
    # the threshold: a(q) < tau is zeroed, a(q) == tau is kept (model/saa/processor.py's rule)
    lin = torch.linspace(0, 1, 11).view(1, 11, 1)  # a(q) = 0, 0.1, ..., 1 exactly after min-max
    res = gate_add_eager(torch.zeros(1, 11, 1, 1), lin, torch.ones(1, 11, 1, 1), 0.3, True, None).flatten()
    from model.fast.gate import _tau_below

    res2 = gate_add_eager(torch.zeros(1, 11, 1, 1), lin, torch.ones(1, 11, 1, 1), _tau_below(float(lin[0, 3])),
                          True, None).flatten()
    assert res[:3].eq(0).all() and res[4:].gt(0).all()
    assert res2[3] == lin[0, 3, 0] and res2[:3].eq(0).all()


# --------------------------------------------------------------------------- whole pipeline


@pytest.fixture(scope="module")
def ckpt(tiny_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("fastckpt") / "init"
    return init_checkpoint(tiny_params.model, tiny_params.face, out, tiny_params.storage.cache_dir, seed=2)


def _load(tiny_params, ckpt):
    p = load_pipeline(tiny_params.model, tiny_params.face, ckpt, tiny_params.storage.cache_dir)
    p.set_progress(False)
    return p


@pytest.fixture(scope="module")
def spare(tiny_params, ckpt):
    """A third pipeline for the tests that switch the fast path on and off again."""
    return _load(tiny_params, ckpt)


@pytest.fixture(scope="module")
def pipes(tiny_params, ckpt):
    plain = _load(tiny_params, ckpt)
    fast = _load(tiny_params, ckpt)
    handle = enable_fast_path(fast, mode="auto", buckets=[(64, 64, 1), (64, 64, 2)])
    return plain, fast, handle


def _identity(pipe, seed: int) -> IdentityInput:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(pipe.dims.id_dim, generator=g)
    size = pipe.backbone.image_size
    feats = clip_image_features(pipe.backbone, torch.rand(1, 3, size, size, generator=g))[0]
    return IdentityInput(embedding=(emb / emb.norm()).numpy(), clip_features=feats)


def _gen(pipe, ids, **kw):
    kw.setdefault("num_inference_steps", 4)  # boost_steps = 3: both graph variants run
    kw.setdefault("seed", 3)
    return pipe(kw.pop("prompt", "a photo of a person"), ids, output_type="pt", **kw).images


def test_pipeline_fast_path_is_eager_buckets_on_cpu(pipes):
    _, fast, handle = pipes
    assert handle.mode == "eager" and fast.step_runner is handle.runner
    assert handle.runner.num_buckets == 2  # the warmed buckets: (64 px, 1 id) and (64 px, 2 ids)
    assert all(isinstance(p, FastSAAProcessor) for _, _, p in fast_processors(fast.unet))
    cross = [a for _, a in fast.unet.named_modules() if getattr(a, "is_cross_attention", False)]
    assert len(fast_processors(fast.unet)) == len(cross) > 0


def test_pipeline_one_identity_matches_plain(pipes):
    plain, fast, _ = pipes
    ids = [_identity(plain, 1)]
    want, got = _gen(plain, ids), _gen(fast, ids)
    no_id = _gen(plain, [])
    assert (want - no_id).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_pipeline_two_identities_two_layouts_match_plain(pipes):
    plain, fast, handle = pipes
    a, b = _identity(plain, 1), _identity(plain, 2)
    outs = []
    buckets = handle.runner.num_buckets
    for boxes in (((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)), ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))):
        ids = [IdentityInput(embedding=a.embedding, clip_features=a.clip_features, bbox=boxes[0]),
               IdentityInput(embedding=b.embedding, clip_features=b.clip_features, bbox=boxes[1])]
        want, got = _gen(plain, ids), _gen(fast, ids)
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        outs.append(got)
    assert handle.runner.num_buckets == buckets  # same bucket, new layout
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_pipeline_batched_per_sample_scale_matches_plain(pipes):
    plain, fast, _ = pipes
    a, b = _identity(plain, 4), _identity(plain, 5)
    kw = dict(prompt=["a photo of a person", "a portrait of a man"], seed=[1, 2], id_scale=[1.0, 0.4],
              guidance_scale=[5.0, 3.0])
    ids = [[a], [b]]
    want, got = _gen(plain, ids, **dict(kw)), _gen(fast, ids, **dict(kw))
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_pipeline_per_person_scales_match_plain(pipes):
    """id_scale per sample and person (one sample per person, one a plain float), fast = plain; a
    sample whose people share one value is that value's image exactly; a per-person 0 matters."""
    plain, fast, _ = pipes
    a, b = _identity(plain, 4), _identity(plain, 5)
    boxes = ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0))
    ids = [IdentityInput(embedding=p.embedding, clip_features=p.clip_features, bbox=box)
           for p, box in zip((a, b), boxes)]
    kw = dict(prompt=["two people", "two people"], seed=[1, 2], id_scale=[[1.0, 0.0], 0.6])
    want, got = _gen(plain, ids, **dict(kw)), _gen(fast, ids, **dict(kw))
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    same = _gen(plain, ids, **{**kw, "id_scale": [[0.6, 0.6], [0.6, 0.6]]})
    assert torch.equal(same, _gen(plain, ids, **{**kw, "id_scale": 0.6}))
    assert torch.equal(want[1], same[1])  # the float sample of the mixed batch
    both = _gen(plain, ids, **{**kw, "id_scale": 1.0})
    assert (want[0] - both[0]).abs().max() > 1e-3
    with pytest.raises(Exception, match="id_scale\\[0\\] has 3 values"):
        _gen(plain, ids, **{**kw, "id_scale": [[1.0, 0.0, 1.0], 0.6]})


def test_disable_restores_plain_processors(spare):
    pipe = spare
    ids = [_identity(pipe, 7)]
    before = _gen(pipe, ids, num_inference_steps=2)
    handle = enable_fast_path(pipe, mode="eager", buckets=[])
    handle.disable()
    assert pipe.step_runner is None
    procs = [a.processor for _, a in pipe.unet.named_modules() if hasattr(a, "processor")]
    assert not any(isinstance(p, FastSAAProcessor) for p in procs)
    assert any(type(p) is SAAAttnProcessor for p in procs)
    torch.testing.assert_close(_gen(pipe, ids, num_inference_steps=2), before, rtol=0, atol=0)


def test_graphed_encoders_keep_modules_and_pass_through_on_cpu(spare):
    """The encoders keep their identity, parameters and outputs; on a CPU the graphs are bypassed,
    and with gradients enabled (training) the plain forward runs."""
    from model.fast.graphed import GraphedForward

    pipe = spare
    enc, fe = pipe.backbone.image_encoder, pipe.dynamicid.face_encoder
    keys = list(pipe.dynamicid.state_dict())
    size = pipe.backbone.image_size
    crops = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = clip_image_features(pipe.backbone, crops)
    handle = enable_fast_path(pipe, mode="eager", buckets=[(64, 64, 1)], graph_encoders=True)
    assert pipe.backbone.image_encoder is enc and pipe.dynamicid.face_encoder is fe
    assert isinstance(enc.forward, GraphedForward) and isinstance(fe.forward, GraphedForward)
    assert list(pipe.dynamicid.state_dict()) == keys
    torch.testing.assert_close(clip_image_features(pipe.backbone, crops), want, rtol=0, atol=0)
    handle.disable()
    assert "forward" not in enc.__dict__ and "forward" not in fe.__dict__


def test_mode_errors_and_off(spare):
    pipe = spare
    with pytest.raises(ValueError, match="needs a CUDA device"):
        enable_fast_path(pipe, mode="cuda_graphs")
    with pytest.raises(ValueError, match="unknown fast path mode"):
        enable_fast_path(pipe, mode="warp")  # type: ignore[arg-type]
    handle = enable_fast_path(pipe, mode="off")
    assert handle.runner is None and pipe.step_runner is None
    assert not np.any([isinstance(a.processor, FastSAAProcessor)
                       for _, a in pipe.unet.named_modules() if hasattr(a, "processor")])

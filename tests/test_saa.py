"""SAA processors (model/saa/): the ID-branch math against explicit per-head re-computations,
multi-ID routing, exactness against diffusers' AttnProcessor2_0, LoRA merging, state dicts and
the region-mask cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from model.saa.context import IDContext
from model.saa.install import install_saa, load_saa_state_dict, merge_lora, saa_state_dict
from model.saa.lora import LoRAAttnProcessor, LoRALinear
from model.saa.processor import SAAAttnProcessor
from model.saa.regions import default_regions

CROSS = 32  # cross-attention width of the tiny UNet
TEXT = 7  # text tokens
K = 4  # tokens per identity


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return _tiny_unet()


def _inputs(batch: int = 2, hw: tuple[int, int] = (16, 16), num_ids: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *hw, generator=g)
    t = torch.tensor([10, 600][:batch] + [300] * max(0, batch - 2))
    text = torch.randn(batch, TEXT, CROSS, generator=g)
    ids = torch.randn(batch, num_ids * K, CROSS, generator=g)
    return latents, t, text, ids


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Give every trainable SAA / LoRA tensor a random value, so zero-init cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------- independent reference


def _linear(layer: torch.nn.Linear, lora: LoRALinear | None, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)
    if lora is not None:
        y = y + (x @ lora.down.weight.T) @ lora.up.weight.T * lora.scale
    return y


def _reference(attn: Attention, proc: SAAAttnProcessor, x, text, ids, ctx: IDContext, grid):
    """SAA output written out plainly: per-sample, per-head matmuls, Python loops over queries and boxes.

    Returns (output [B, HW, C], gate a(q) [B, HW]).
    """
    b_size, seq, _ = x.shape
    heads = attn.heads
    inner = attn.to_q.out_features
    d = inner // heads
    q = _linear(attn.to_q, proc.to_q_lora, x)
    k = _linear(attn.to_k, proc.to_k_lora, text)
    v = _linear(attn.to_v, proc.to_v_lora, text)
    kid = ids @ proc.to_k_id.weight.T
    vid = ids @ proc.to_v_id.weight.T
    n, n_tok = ctx.num_ids, ids.shape[1]
    owner = [t // (n_tok // n) for t in range(n_tok)]
    regions = ctx.regions if ctx.regions is not None else default_regions(n)
    q_h, q_w = grid
    scales = ctx.id_scale if isinstance(ctx.id_scale, torch.Tensor) else torch.full((b_size,), float(ctx.id_scale))
    out = torch.zeros(b_size, seq, inner)
    gates = torch.zeros(b_size, seq)
    for b in range(b_size):
        boxes = (regions[b] if regions.dim() == 3 else regions).tolist()
        containing = []
        for qi in range(seq):
            i, j = divmod(qi, q_w)
            cy, cx = (i + 0.5) / q_h, (j + 0.5) / q_w
            containing.append([r for r, (y0, x0, y1, x1) in enumerate(boxes) if y0 <= cy < y1 and x0 <= cx < x1])
        scores, act = [], torch.zeros(seq)
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            s = q[b, :, sl] @ kid[b, :, sl].T / math.sqrt(d)  # [HW, n_tok]
            scores.append(s)
            act += s.sum(-1)
            out[b, :, sl] = torch.softmax(q[b, :, sl] @ k[b, :, sl].T / math.sqrt(d), -1) @ v[b, :, sl]
        if ctx.gating:
            a = (act - act.min()) / (act.max() - act.min())
            a[a < ctx.tau] = 0.0
        else:
            a = torch.ones(seq)
        if ctx.boost_active:
            for qi in range(seq):
                a[qi] = a[qi] + ctx.boost if containing[qi] else a[qi] / (ctx.boost + 1)
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            s = scores[h].clone()
            for qi in range(seq):
                if containing[qi]:
                    for t in range(n_tok):
                        if owner[t] not in containing[qi]:
                            s[qi, t] = float("-inf")
            if ctx.mix_scale is not None:
                s[:, :K] = s[:, :K] * ctx.mix_scale
                s[:, K:] = s[:, K:] * (1 - ctx.mix_scale)
            if scales.dim() == 2:  # per identity: each token's value times its owner's scale
                tok = torch.tensor([float(scales[b, owner[t]]) for t in range(n_tok)])
                out[b, :, sl] += a[:, None] * (torch.softmax(s, -1) @ (vid[b, :, sl] * tok[:, None]))
                continue
            id_out = torch.softmax(s, -1) @ vid[b, :, sl]
            out[b, :, sl] += scales[b] * a[:, None] * id_out
        gates[b] = a
    return _linear(attn.to_out[0], proc.to_out_lora, out), gates


def _single_attention(lora_rank: int = 3, seed: int = 0, **attn_kwargs):
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, **attn_kwargs).eval()
    proc = SAAAttnProcessor(16, 12, lora_rank=lora_rank, lora_alpha=6.0, base_to_k=attn.to_k, base_to_v=attn.to_v)
    _randomise(proc, seed + 1, std=0.3)
    attn.set_processor(proc)
    return attn, proc


GRID = (6, 5)  # non-square query grid, HW = 30
REGIONS = torch.tensor([[0.0, 0.0, 0.5, 0.6], [0.34, 0.5, 1.0, 1.0]])  # overlapping, with queries outside both


@pytest.mark.parametrize(
    "gating, boost_active, tau, num_ids, mix",
    [
        (True, False, 0.3, 2, None),  # threshold only
        (True, True, 0.3, 2, None),  # threshold + boost inside / outside
        (False, True, 0.3, 2, None),  # gating off, boost still on
        (False, False, 0.3, 2, None),  # a = 1
        (True, False, 0.0, 2, None),
        (True, True, 0.3, 1, 0.7),  # one identity, two token sources
    ],
)
def test_id_branch_matches_explicit_recomputation(gating, boost_active, tau, num_ids, mix):
    attn, proc = _single_attention()
    g = torch.Generator().manual_seed(5)
    n_tok = 2 * K if mix is not None else num_ids * K
    x = torch.randn(2, GRID[0] * GRID[1], 16, generator=g)
    text = torch.randn(2, TEXT, 12, generator=g)
    ids = torch.randn(2, n_tok, 12, generator=g)
    regions = REGIONS[:num_ids]
    ctx = IDContext(num_ids=num_ids, num_tokens=K, regions=regions, latent_hw=GRID, id_scale=torch.tensor([0.5, 1.5]),
                    gating=gating, tau=tau, boost=4.0, boost_active=boost_active, mix_scale=mix)
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=torch.cat([text, ids], 1), id_context=ctx)
        want, gate = _reference(attn, proc, x, text, ids, ctx, GRID)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if gating and tau > 0 and not boost_active:
        assert (gate == 0).any() and (gate > 0).any()  # the threshold cuts some queries and keeps others
    # the branch matters: the same call without ID tokens differs
    with torch.no_grad():
        text_only = attn(x, encoder_hidden_states=text)
    assert not torch.allclose(got, text_only, atol=1e-3)


@pytest.mark.parametrize("gating, boost_active, num_ids, mix, scale", [
    (True, False, 2, None, [[1.0, 0.0], [0.5, 2.0]]),
    (True, True, 2, None, [[0.3, 1.2], [0.0, 0.0]]),  # boost; a sample with every person at 0
    (False, False, 2, None, [[2.0, 0.5], [1.0, 1.0]]),
    (True, True, 1, 0.7, [[0.6], [1.4]]),  # one identity, two token sources: both take its scale
])
def test_per_identity_scale_matches_explicit_recomputation(gating, boost_active, num_ids, mix, scale):
    """id_scale [B, N]: each identity's tokens' values times that identity's scale (the reference's loops)."""
    attn, proc = _single_attention()
    g = torch.Generator().manual_seed(6)
    n_tok = 2 * K if mix is not None else num_ids * K
    x = torch.randn(2, GRID[0] * GRID[1], 16, generator=g)
    text = torch.randn(2, TEXT, 12, generator=g)
    ids = torch.randn(2, n_tok, 12, generator=g)
    ctx = IDContext(num_ids=num_ids, num_tokens=K, regions=REGIONS[:num_ids], latent_hw=GRID,
                    id_scale=torch.tensor(scale), gating=gating, boost_active=boost_active, mix_scale=mix)
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=torch.cat([text, ids], 1), id_context=ctx)
        want, _ = _reference(attn, proc, x, text, ids, ctx, GRID)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("boost_active", [False, True])
def test_per_identity_scale_zero_removes_only_that_person(boost_active):
    """Two overlapping boxes with queries outside both: [1, 0] keeps person 1's term exactly as with
    scale 1 and drops person 2's (inside person 2's box alone: text only); per-person terms add up;
    [s, s] is the scalar s bit for bit, and [B, N] rows of one value are the [B] form bit for bit."""
    attn, _ = _single_attention()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, GRID[0] * GRID[1], 16, generator=g)
    enc = torch.cat([torch.randn(2, TEXT, 12, generator=g), torch.randn(2, 2 * K, 12, generator=g)], 1)

    def run(scale):
        ctx = IDContext(num_ids=2, num_tokens=K, regions=REGIONS, latent_hw=GRID, boost_active=boost_active,
                        id_scale=torch.tensor(scale) if isinstance(scale, list) else scale)
        with torch.no_grad():
            return attn(x, encoder_hidden_states=enc, id_context=ctx), ctx

    (both, ctx), (text_only, _) = run(1.0), run(0.0)
    first, second = run([[1.0, 0.0]] * 2)[0], run([[0.0, 1.0]] * 2)[0]
    inside = ctx.region_masks(*GRID, "cpu").inside[0]  # [HW, 2]
    only_1, only_2 = inside[:, 0] & ~inside[:, 1], inside[:, 1] & ~inside[:, 0]
    outside = ~inside.any(1)
    assert only_1.any() and only_2.any() and outside.any() and (inside[:, 0] & inside[:, 1]).any()
    torch.testing.assert_close(first[:, only_1], both[:, only_1], rtol=0, atol=1e-6)  # person 1 unchanged
    torch.testing.assert_close(first[:, only_2], text_only[:, only_2], rtol=0, atol=1e-6)  # person 2 gone
    torch.testing.assert_close(second[:, only_1], text_only[:, only_1], rtol=0, atol=1e-6)
    # each person's term alone, added to the text branch, gives both (to_out is affine)
    torch.testing.assert_close(first + second - text_only, both, rtol=0, atol=1e-5)
    assert (first - both)[:, outside].abs().max() > 1e-3  # outside the boxes both people mix: it matters there
    for s in (0.7, 1.0, 2.5):
        assert torch.equal(run([[s, s]] * 2)[0], run(s)[0])
    per_sample = run(torch.tensor([0.5, 1.5]))[0]
    assert torch.equal(run([[0.5, 0.5], [1.5, 1.5]])[0], per_sample)
    assert torch.equal(run([[0.0, 0.0], [1.5, 1.5]])[0][0], text_only[0])


def test_per_identity_scale_shape_is_checked():
    with pytest.raises(ValueError, match="num_ids=2"):
        IDContext(num_ids=2, id_scale=torch.ones(2, 3))
    attn, _ = _single_attention()
    ctx = IDContext(num_ids=2, num_tokens=K, latent_hw=GRID, id_scale=torch.ones(3, 2))
    with pytest.raises(ValueError, match="expected \\[2, 2\\]"):
        attn(torch.randn(2, 30, 16), encoder_hidden_states=torch.randn(2, TEXT + 2 * K, 12), id_context=ctx)


def test_gate_threshold_is_not_near_tau():
    """Guards the test above: no normalised activation lies within 1e-4 of tau, so float rounding
    differences between the einsum form and the per-head loop cannot flip a query."""
    attn, proc = _single_attention()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, GRID[0] * GRID[1], 16, generator=g)
    text = torch.randn(2, TEXT, 12, generator=g)
    ids = torch.randn(2, 2 * K, 12, generator=g)
    ctx = IDContext(num_ids=2, regions=REGIONS, latent_hw=GRID, tau=0.0)
    with torch.no_grad():
        _, gate = _reference(attn, proc, x, text, ids, ctx, GRID)
    assert ((gate - 0.3).abs() > 1e-4).all()
    assert ((gate < 0.3).sum(1) > 0).all() and ((gate >= 0.3).sum(1) > 0).all()


def test_routing_gives_zero_weight_to_other_identity():
    """Identity B's value vectors are made huge without touching its keys (so scores and gate are
    unchanged): queries in A's region must not move at all, queries elsewhere must."""
    attn, proc = _single_attention(lora_rank=0)
    half = 6
    with torch.no_grad():
        proc.to_k_id.weight[:, half:] = 0.0  # keys read dims [:6] only
        proc.to_v_id.weight[:, :half] = 0.0  # values read dims [6:] only
    g = torch.Generator().manual_seed(2)
    q_h, q_w = 6, 10
    x = torch.randn(1, q_h * q_w, 16, generator=g)
    text = torch.randn(1, TEXT, 12, generator=g)
    ids = torch.randn(1, 2 * K, 12, generator=g)
    regions = torch.tensor([[0.0, 0.0, 1.0, 0.4], [0.0, 0.6, 1.0, 1.0]])  # A left, B right, a band outside both
    ctx = IDContext(num_ids=2, regions=regions, latent_hw=(q_h, q_w), tau=0.0)
    loud = ids.clone()
    loud[:, K:, half:] += 1e4  # B's values explode, B's keys do not change
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=torch.cat([text, ids], 1), id_context=ctx)
        out_loud = attn(x, encoder_hidden_states=torch.cat([text, loud], 1), id_context=ctx)
    cols = (torch.arange(q_w) + 0.5) / q_w
    col_of_query = cols.repeat(q_h)  # [HW] x centre of each query
    in_a, in_b = col_of_query < 0.4, col_of_query >= 0.6
    outside = ~(in_a | in_b)
    assert torch.equal(out[0, in_a], out_loud[0, in_a])
    assert (out[0, in_b] - out_loud[0, in_b]).abs().amin(-1).gt(1.0).all()
    assert (out[0, outside] - out_loud[0, outside]).abs().amin(-1).gt(1.0).all()


def test_region_masks_follow_cell_centres():
    regions = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]])
    ctx = IDContext(num_ids=2, num_tokens=3, regions=regions)
    q_h, q_w = 4, 6
    masks = ctx.region_masks(q_h, q_w, "cpu")
    assert masks.allowed.shape == (1, 1, q_h * q_w, 6)
    for qi in range(q_h * q_w):
        i, j = divmod(qi, q_w)
        cy, cx = (i + 0.5) / q_h, (j + 0.5) / q_w
        inside = [y0 <= cy < y1 and x0 <= cx < x1 for y0, x0, y1, x1 in regions.tolist()]
        allowed_ids = [n for n in range(2) if inside[n]] if any(inside) else [0, 1]
        want = [t // 3 in allowed_ids for t in range(6)]
        assert masks.allowed[0, 0, qi].tolist() == want, (i, j)
        assert masks.inside[0, qi].tolist() == inside
        assert bool(masks.inside_any[0, qi]) == any(inside)


def test_spatial_input_and_residual_follow_the_processor_protocol():
    """4-D input takes its grid from the tensor (latent_hw is not consulted), and residual /
    rescale are applied as in AttnProcessor2_0."""
    attn, _ = _single_attention(residual_connection=True, rescale_output_factor=2.0)
    g = torch.Generator().manual_seed(3)
    x4 = torch.randn(2, 16, 6, 5, generator=g)
    enc = torch.randn(2, TEXT + 2 * K, 12, generator=g)
    x3 = x4.flatten(2).transpose(1, 2)
    with torch.no_grad():
        wrong_hw = IDContext(num_ids=2, latent_hw=(97, 89), boost_active=True)
        out4 = attn(x4, encoder_hidden_states=enc, id_context=wrong_hw)
        out3 = attn(x3, encoder_hidden_states=enc, id_context=IDContext(num_ids=2, latent_hw=(6, 5), boost_active=True))
    torch.testing.assert_close(out4.flatten(2).transpose(1, 2), out3, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="latent_hw"):
        attn(x3, encoder_hidden_states=enc, id_context=IDContext(num_ids=2, latent_hw=(97, 89), boost_active=True))


def test_text_attention_mask_matches_attn_processor_2_0():
    """An encoder attention mask (bias over text tokens, or over text + ID tokens) masks the text
    branch exactly as diffusers does for a text-only call."""
    torch.manual_seed(4)
    base = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    base.set_processor(AttnProcessor2_0())
    saa = copy.deepcopy(base)
    saa.set_processor(SAAAttnProcessor(16, 12, lora_rank=2, base_to_k=saa.to_k, base_to_v=saa.to_v))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 16, generator=g)
    text = torch.randn(2, TEXT, 12, generator=g)
    enc = torch.cat([text, torch.randn(2, 2 * K, 12, generator=g)], 1)
    bias = torch.zeros(2, 1, TEXT)
    bias[0, 0, 3:] = -10000.0  # sample 0 sees its first 3 text tokens only
    ctx = IDContext(num_ids=2, latent_hw=GRID, id_scale=0.0)
    with torch.no_grad():
        want = base(x, encoder_hidden_states=text, attention_mask=bias)
        got_text_len = saa(x, encoder_hidden_states=enc, attention_mask=bias, id_context=ctx)
        got_full_len = saa(x, encoder_hidden_states=enc, attention_mask=torch.cat([bias, torch.zeros(2, 1, 2 * K)], -1),
                           id_context=ctx)
        unmasked = base(x, encoder_hidden_states=text)
    assert torch.equal(got_text_len, want) and torch.equal(got_full_len, want)
    assert not torch.allclose(want[0], unmasked[0], atol=1e-4)


def test_low_precision_unet_runs_in_its_dtype(unet):
    """bf16 UNet: new modules follow the base dtype and the output stays close to fp32."""
    latents, t, text, ids = _inputs()
    enc = torch.cat([text, ids], 1)
    ctx = IDContext(num_ids=2, latent_hw=(16, 16), boost_active=True)
    ref = copy.deepcopy(unet)
    _randomise(install_saa(ref, lora_rank=2), seed=3)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    with torch.no_grad():
        want = ref(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx}).sample
        got = low(latents.bfloat16(), t, encoder_hidden_states=enc.bfloat16(),
                  cross_attention_kwargs={"id_context": ctx}).sample
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 5e-2, rel


# --------------------------------------------------------------------------- UNet level


def test_zero_scale_and_no_context_reproduce_base_unet_exactly(unet):
    latents, t, text, ids = _inputs()
    with torch.no_grad():
        base = unet(latents, t, encoder_hidden_states=text).sample
    saa_unet = copy.deepcopy(unet)
    install_saa(saa_unet, lora_rank=4)  # LoRA up weights start at zero
    enc = torch.cat([text, ids], 1)

    def run(states, ctx):
        kwargs = {} if ctx is None else {"cross_attention_kwargs": {"id_context": ctx}}
        with torch.no_grad():
            return saa_unet(latents, t, encoder_hidden_states=states, **kwargs).sample

    assert torch.equal(run(text, None), base)  # plain text-to-image UNet
    assert torch.equal(run(enc, IDContext(num_ids=2, latent_hw=(16, 16), id_scale=0.0)), base)
    assert torch.equal(run(text, IDContext(num_ids=0, latent_hw=(16, 16))), base)
    per_sample = run(enc, IDContext(num_ids=2, latent_hw=(16, 16), id_scale=torch.tensor([0.0, 1.0])))
    assert torch.equal(per_sample[0], base[0])
    assert not torch.allclose(per_sample[1], base[1], atol=1e-4)


def test_merged_lora_matches_unmerged(unet):
    latents, t, text, ids = _inputs()
    saa_unet = copy.deepcopy(unet)
    procs = install_saa(saa_unet, lora_rank=4, lora_alpha=8.0)
    enc = torch.cat([text, ids], 1)
    ctx = IDContext(num_ids=2, latent_hw=(16, 16), boost_active=True)

    def run():
        with torch.no_grad():
            return saa_unet(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx}).sample

    before_lora = run()
    _randomise(procs, seed=7, std=0.1)
    unmerged = run()
    assert not torch.allclose(unmerged, before_lora, atol=1e-3)  # LoRA is live, so the test can fail
    merge_lora(saa_unet)
    merged = run()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert not any("lora" in key for key in saa_state_dict(saa_unet))
    merge_lora(saa_unet)  # idempotent
    assert torch.equal(run(), merged)


def test_training_gradients_reach_every_trainable_part(unet):
    """Stage-1 shape: frozen base, one identity, gating on. Every SAA / LoRA tensor and the ID
    tokens themselves get a gradient (LoRA down only once up is non-zero), the base none."""
    latents, t, text, ids = _inputs(num_ids=1)
    train = copy.deepcopy(unet).train()
    train.requires_grad_(False)
    procs = install_saa(train, lora_rank=2)
    with torch.no_grad():
        for name, p in procs.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.05)
    ids = ids.clone().requires_grad_(True)
    ctx = IDContext(num_ids=1, latent_hw=(16, 16))
    out = train(latents, t, encoder_hidden_states=torch.cat([text, ids], 1),
                cross_attention_kwargs={"id_context": ctx}).sample
    out.pow(2).mean().backward()
    assert ids.grad is not None and ids.grad.abs().sum() > 0
    no_grad = [n for n, p in procs.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for n, p in train.named_parameters() if ".processor." not in n)


def test_install_registers_exactly_the_trainable_parts(unet):
    saa_unet = copy.deepcopy(unet)
    procs = install_saa(saa_unet, lora_rank=2)
    kinds = {name: type(attn.processor) for name, attn in saa_unet.named_modules() if isinstance(attn, Attention)}
    assert {n for n, k in kinds.items() if k is SAAAttnProcessor} == {n for n in kinds if n.endswith("attn2")}
    assert {n for n, k in kinds.items() if k is LoRAAttnProcessor} == {n for n in kinds if n.endswith("attn1")}
    proc_params = {id(p) for name, p in saa_unet.named_parameters() if ".processor." in name}
    assert {id(p) for p in procs.parameters()} == proc_params
    assert len(list(procs.parameters())) == len(saa_state_dict(saa_unet))
    for name, attn in saa_unet.named_modules():
        if isinstance(attn, Attention) and attn.is_cross_attention:
            assert torch.equal(attn.processor.to_k_id.weight, attn.to_k.weight)
            assert torch.equal(attn.processor.to_v_id.weight, attn.to_v.weight)
            assert attn.processor.to_k_id.bias is None
    with pytest.raises(ValueError, match="already installed"):
        install_saa(saa_unet, lora_rank=2)


def test_state_dict_round_trip_through_safetensors(unet, tmp_path):
    latents, t, text, ids = _inputs()
    enc = torch.cat([text, ids], 1)
    ctx = IDContext(num_ids=2, latent_hw=(16, 16))
    src = copy.deepcopy(unet)
    src_procs = install_saa(src, lora_rank=4)
    _randomise(src_procs, seed=11)
    path = tmp_path / "saa.safetensors"
    save_file(saa_state_dict(src), str(path))

    dst = copy.deepcopy(unet)
    dst_procs = install_saa(dst, lora_rank=4)
    load_saa_state_dict(dst, load_file(str(path)))
    with torch.no_grad():
        a = src(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx}).sample
        b = dst(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx}).sample
    assert torch.equal(a, b)

    # the install_saa ModuleDict's own state dict loads too ("__" keys)
    other = copy.deepcopy(unet)
    install_saa(other, lora_rank=4)
    load_saa_state_dict(other, dst_procs.state_dict())
    assert all(torch.equal(v, saa_state_dict(other)[k]) for k, v in saa_state_dict(src).items())

    state = load_file(str(path))
    key = next(k for k in state if k.endswith("attn2.processor.to_k_id.weight"))
    bad = dict(state)
    bad[key] = torch.zeros(3, 3)
    fresh = copy.deepcopy(unet)
    install_saa(fresh, lora_rank=4)
    before = saa_state_dict(fresh)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        load_saa_state_dict(fresh, bad)
    assert "(3, 3)" in str(err.value)
    assert all(torch.equal(v, saa_state_dict(fresh)[k]) for k, v in before.items())  # nothing half-loaded
    missing = dict(state)
    del missing[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_saa_state_dict(fresh, missing)
    with pytest.raises(ValueError, match="rank|shape"):
        wrong_rank = copy.deepcopy(unet)
        install_saa(wrong_rank, lora_rank=2)
        load_saa_state_dict(wrong_rank, state)


def test_masks_built_once_per_context_per_level(unet, monkeypatch):
    builds: list[tuple[int, int]] = []
    original = IDContext._build_region_masks

    def counting(self, q_h, q_w, device):
        builds.append((q_h, q_w))
        return original(self, q_h, q_w, device)

    monkeypatch.setattr(IDContext, "_build_region_masks", counting)
    saa_unet = copy.deepcopy(unet)
    install_saa(saa_unet, lora_rank=0)
    latents, t, text, ids = _inputs(hw=(9, 14))  # odd size: the second level is ceil -> 5 x 7
    enc = torch.cat([text, ids], 1)
    ctx = IDContext(num_ids=2, latent_hw=(9, 14), regions=torch.tensor([[0, 0, 1, 0.5], [0.2, 0.5, 0.9, 1.0]]))
    with torch.no_grad():
        for step in range(3):
            ctx.boost_active = step < 2
            saa_unet(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx})
    assert sorted(builds) == [(5, 7), (9, 14)]  # 5 cross-attentions x 3 steps, 2 builds
    ctx2 = IDContext(num_ids=2, latent_hw=(9, 14))
    with torch.no_grad():
        saa_unet(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx2})
    assert len(builds) == 4
    ctx2.regions = default_regions(2).flip(0)  # a new layout invalidates the cache
    with torch.no_grad():
        saa_unet(latents, t, encoder_hidden_states=enc, cross_attention_kwargs={"id_context": ctx2})
    assert len(builds) == 6


# --------------------------------------------------------------------------- regions


def test_default_regions_are_equal_vertical_strips():
    torch.testing.assert_close(default_regions(1), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(
        default_regions(3),
        torch.tensor([[0.0, 0.0, 1.0, 1 / 3], [0.0, 1 / 3, 1.0, 2 / 3], [0.0, 2 / 3, 1.0, 1.0]]),
    )
    with pytest.raises(ValueError):
        default_regions(0)


@pytest.mark.parametrize(
    "box",
    [
        [-0.1, 0.0, 1.0, 1.0],  # below 0
        [0.0, 0.0, 1.2, 1.0],  # above 1
        [0.5, 0.0, 0.5, 1.0],  # y0 == y1
        [0.0, 0.7, 1.0, 0.2],  # x0 > x1
        [0.0, float("nan"), 1, 1],
    ],
)
def test_bad_regions_name_the_identity(box):
    regions = torch.tensor([[0.0, 0.0, 1.0, 0.5], box])
    with pytest.raises(ValueError, match="identity 1"):
        IDContext(num_ids=2, regions=regions)
    per_sample = torch.stack([default_regions(2), regions])
    with pytest.raises(ValueError, match="identity 1 of sample 1"):
        IDContext(num_ids=2, regions=per_sample)
    ctx = IDContext(num_ids=2)
    with pytest.raises(ValueError, match="identity 1"):
        ctx.regions = regions


def test_context_validation():
    with pytest.raises(ValueError, match="N = num_ids = 3"):
        IDContext(num_ids=3, regions=default_regions(2))
    with pytest.raises(ValueError, match="mix_scale"):
        IDContext(num_ids=2, mix_scale=0.5)
    assert IDContext(num_ids=1, mix_scale=0.5).num_id_tokens == 2 * 4
    ctx = IDContext(num_ids=1, latent_hw=(9, 14))
    assert [ctx.query_grid(n) for n in (126, 35, 12, 4, 1)] == [(9, 14), (5, 7), (3, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="latent_hw"):
        ctx.query_grid(64)

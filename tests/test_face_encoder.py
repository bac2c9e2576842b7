"""FaceEncoder (model/face_encoder.py): shapes, the math of both paths against hand computations, shortcut, CFG branch."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import SD15ProfileParams, TinyProfileParams
from model.face_encoder import FaceEncoder

TINY = dict(id_dim=128, clip_dim=64, token_dim=64, num_tokens=4, depth=2, heads=2, dim_head=16, ff_mult=2)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm defines it
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Explicit multi-head softmax attention, per sample and head, without SDPA."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.empty_like(q)
    for i in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[i, :, sl] @ k[i, :, sl].T / math.sqrt(d)  # [N, M]
            out[i, :, sl] = torch.softmax(scores, dim=-1) @ v[i, :, sl]
    return out


def _reference_forward(enc: FaceEncoder, ids: torch.Tensor, clip: torch.Tensor, heads: int) -> tuple:
    """Independent re-computation of the encoder from its raw weights: (MLP tokens, refined tokens)."""
    lin1, lin2 = enc.id_mlp[0], enc.id_mlp[2]
    hidden = _gelu(ids @ lin1.weight.T + lin1.bias)  # [B, 2 * id_dim]
    flat = hidden @ lin2.weight.T + lin2.bias  # [B, K * D]
    tokens = _layer_norm(flat.reshape(ids.shape[0], enc.num_tokens, enc.token_dim),
                         enc.id_norm.weight, enc.id_norm.bias, enc.id_norm.eps)
    ctx = clip @ enc.clip_proj.weight.T + enc.clip_proj.bias  # [B, L, D]
    x = tokens
    for attn, ff in enc.layers:
        lat = _layer_norm(x, attn.norm_latents.weight, attn.norm_latents.bias, attn.norm_latents.eps)
        cn = _layer_norm(ctx, attn.norm_context.weight, attn.norm_context.bias, attn.norm_context.eps)
        kv_in = torch.cat([cn, lat], dim=1)  # [CLIP ; tokens]
        inner = attn.to_q.weight.shape[0]
        kv = kv_in @ attn.to_kv.weight.T
        x = _attend(lat @ attn.to_q.weight.T, kv[..., :inner], kv[..., inner:], heads) @ attn.to_out.weight.T + x
        ln, w1, _, w2 = ff.net
        x = _gelu(_layer_norm(x, ln.weight, ln.bias, ln.eps) @ w1.weight.T) @ w2.weight.T + x
    refined = _layer_norm(x, enc.norm_out.weight, enc.norm_out.bias, enc.norm_out.eps)
    return tokens, refined


def _randomise_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """LayerNorms start at weight 1, bias 0, which would hide a swapped weight/bias in the checks."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


def test_sd15_dims_give_four_768_tokens():
    torch.manual_seed(0)
    params = SD15ProfileParams().face_encoder
    enc = FaceEncoder.from_params(params, id_dim=512, clip_dim=1280, token_dim=768, num_tokens=4)
    assert len(enc.layers) == 4 and enc.layers[0][0].heads == 12 and enc.layers[0][0].to_q.out_features == 768
    ids = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    with torch.no_grad():
        out = enc(ids, torch.randn(2, 257, 1280))
    assert out.shape == (2, 4, 768)
    assert torch.isfinite(out).all()


def test_tiny_profile_dims():
    params = TinyProfileParams()
    enc = FaceEncoder.from_params(params.face_encoder, id_dim=128, clip_dim=params.vision.hidden_size,
                                  token_dim=params.cross_attention_dim, num_tokens=params.num_id_tokens)
    out = enc(torch.randn(3, 128), torch.randn(3, 65, params.vision.hidden_size))
    assert out.shape == (3, params.num_id_tokens, params.cross_attention_dim)


def test_mlp_layernorm_and_perceiver_match_independent_computation():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    enc = FaceEncoder(**TINY).double()
    _randomise_norms(enc, gen)
    ids = torch.randn(3, 128, generator=gen, dtype=torch.float64)
    clip = torch.randn(3, 17, 64, generator=gen, dtype=torch.float64)
    ref_tokens, ref_refined = _reference_forward(enc, ids, clip, heads=TINY["heads"])
    with torch.no_grad():
        torch.testing.assert_close(enc.id_tokens(ids), ref_tokens, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(enc(ids, clip), ref_refined, rtol=1e-10, atol=1e-10)


def test_shortcut_adds_scaled_refinement_to_mlp_tokens():
    torch.manual_seed(2)
    plain = FaceEncoder(**TINY)
    _randomise_norms(plain, torch.Generator().manual_seed(2))
    scaled = FaceEncoder(**TINY, shortcut=True, shortcut_scale=0.7)
    off = FaceEncoder(**TINY, shortcut=True, shortcut_scale=0.0)
    scaled.load_state_dict(plain.state_dict())
    off.load_state_dict(plain.state_dict())
    ids, clip = torch.randn(2, 128), torch.randn(2, 9, 64)
    with torch.no_grad():
        base, refined = plain.id_tokens(ids), plain(ids, clip)
        torch.testing.assert_close(scaled(ids, clip), base + 0.7 * refined)
        # scale 0: pure MLP tokens, blind to CLIP features
        torch.testing.assert_close(off(ids, clip), base)
        torch.testing.assert_close(off(ids, clip + 5 * torch.randn_like(clip)), base)
        # no shortcut: the result is the refined tokens, which do read the CLIP features
        assert not torch.allclose(plain(ids, clip + torch.randn_like(clip)), refined, atol=1e-4)


def test_output_depends_on_both_inputs_per_sample():
    torch.manual_seed(3)
    enc = FaceEncoder(**TINY)
    ids, clip = torch.randn(2, 128), torch.randn(2, 9, 64)
    with torch.no_grad():
        out = enc(ids, clip)
        ids2 = ids.clone()
        ids2[1] = torch.randn(128)
        out2 = enc(ids2, clip)
    torch.testing.assert_close(out2[0], out[0])  # identities are encoded independently
    assert (out2[1] - out[1]).abs().max() > 1e-2


@pytest.mark.parametrize("shortcut", [False, True])
def test_every_parameter_gets_a_gradient(shortcut: bool):
    torch.manual_seed(4)
    enc = FaceEncoder(**TINY, shortcut=shortcut, shortcut_scale=0.5)
    out = enc(torch.randn(2, 128), torch.randn(2, 9, 64))
    # A random projection: sum() or a squared norm of LayerNorm outputs has zero gradient at init.
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def test_unconditional_tokens_are_the_encoder_on_zero_embedding():
    torch.manual_seed(5)
    enc = FaceEncoder(**TINY)
    zero_clip = torch.randn(2, 9, 64)  # stands for CLIP(all-zero image)
    with torch.no_grad():
        uncond = enc.unconditional_tokens(zero_clip)
        torch.testing.assert_close(uncond, enc(torch.zeros(2, 128), zero_clip))
        cond = enc(torch.nn.functional.normalize(torch.randn(2, 128), dim=-1), zero_clip)
    assert uncond.shape == (2, 4, 64)
    assert (uncond - cond).abs().max() > 1e-2


def test_bad_shapes_are_rejected_with_a_message():
    enc = FaceEncoder(**TINY)
    with pytest.raises(ValueError, match="id_embeds must be"):
        enc(torch.randn(2, 512), torch.randn(2, 9, 64))
    with pytest.raises(ValueError, match="clip_features must be"):
        enc(torch.randn(2, 128), torch.randn(2, 9, 1280))
    with pytest.raises(ValueError, match="batch mismatch"):
        enc(torch.randn(2, 128), torch.randn(3, 9, 64))
    with pytest.raises(ValueError, match="depth"):
        FaceEncoder(**{**TINY, "depth": 0})

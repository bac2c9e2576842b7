"""IMR, keypoint encoder, landmark rendering and the InfoNCE term (model/imr.py, model/landmarks.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import SD15ProfileParams, TinyProfileParams
from model.imr import IMR, IMRLayer, KeypointEncoder, info_nce
from model.landmarks import landmarks_to_tensor, render_landmarks

TINY = dict(token_dim=64, width=64, landmark_dim=64, text_dim=64, num_latents=4, depth=1, heads=2, dim_head=32,
            ff_mult=2)


def _features(b: int, dims: dict, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """tokens, source landmark, source text, target landmark, target text."""
    return (torch.randn(b, 4, dims["token_dim"], generator=gen),
            torch.randn(b, dims["landmark_dim"], generator=gen), torch.randn(b, dims["text_dim"], generator=gen),
            torch.randn(b, dims["landmark_dim"], generator=gen), torch.randn(b, dims["text_dim"], generator=gen))


def _lit(image: np.ndarray) -> set[tuple[int, int]]:
    rows, cols = np.nonzero(image[0])
    return set(zip(rows.tolist(), cols.tolist()))


# ---------------------------------------------------------------- landmarks


def test_render_puts_single_pixel_dots_at_scaled_positions():
    # pixel-centre convention: x' = (x + 0.5) * 96 / 512 - 0.5, rounded
    pts = np.array([[0, 0], [511, 511], [256, 128], [100.2, 300.9]])
    img = render_landmarks(pts, (512, 512), size=96, radius=0)
    assert img.shape == (1, 96, 96) and img.dtype == np.float32
    # (row, col): (0,0); (95,95); y=128 -> 23.59 -> 24, x=256 -> 47.59 -> 48; y=300.9 -> 56.01, x=100.2 -> 18.38
    assert _lit(img) == {(0, 0), (95, 95), (24, 48), (56, 18)}
    assert set(np.unique(img).tolist()) == {0.0, 1.0}


def test_render_matches_a_per_point_loop_on_106_random_landmarks_and_non_square_frame():
    rng = np.random.default_rng(0)
    h, w = 300, 512
    pts = np.stack([rng.uniform(0, w, 106), rng.uniform(0, h, 106)], axis=1)
    expected = set()
    for x, y in pts:
        expected.add((int(round((y + 0.5) * 96 / h - 0.5)), int(round((x + 0.5) * 96 / w - 0.5))))
    assert _lit(render_landmarks(pts, (h, w), size=96, radius=0)) == expected


def test_render_at_native_size_is_the_identity_mapping():
    pts = np.array([[3, 7], [0, 15], [15, 0]])
    assert _lit(render_landmarks(pts, (16, 16), size=16, radius=0)) == {(7, 3), (15, 0), (0, 15)}


def test_render_drops_out_of_frame_and_nan_points():
    pts = np.array([[-1, 5], [512, 10], [10, 512], [5, -0.1], [np.nan, 3], [200, 200]])
    img = render_landmarks(pts, (512, 512), size=96, radius=0)
    assert _lit(img) == {(37, 37)}  # only (200, 200): (200.5 * 0.1875 - 0.5) = 37.09
    assert render_landmarks(np.zeros((0, 2)), (512, 512)).sum() == 0


def test_render_radius_one_is_a_plus_and_is_clipped_at_the_border():
    img = render_landmarks(np.array([[256, 256]]), (512, 512), size=96, radius=1)
    c = 48  # 256.5 * 0.1875 - 0.5 = 47.59
    assert _lit(img) == {(c, c), (c - 1, c), (c + 1, c), (c, c - 1), (c, c + 1)}
    corner = render_landmarks(np.array([[0, 0]]), (512, 512), size=96, radius=1)
    assert _lit(corner) == {(0, 0), (1, 0), (0, 1)}


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        render_landmarks(np.zeros((5, 3)), (512, 512))
    with pytest.raises(ValueError, match="frame_hw"):
        render_landmarks(np.zeros((5, 2)), (0, 512))


def test_landmarks_to_tensor_batches_renders():
    sets = [np.array([[10.0, 20.0]]), np.array([[300.0, 40.0], [50.0, 60.0]])]
    batch = landmarks_to_tensor(sets, (512, 512), size=96)
    assert batch.shape == (2, 1, 96, 96) and batch.dtype == torch.float32
    np.testing.assert_array_equal(batch[1].numpy(), render_landmarks(sets[1], (512, 512), size=96))


# ---------------------------------------------------------------- keypoint encoder


def test_keypoint_encoder_shapes_and_position_sensitivity():
    torch.manual_seed(0)
    enc = KeypointEncoder.from_params(SD15ProfileParams().imr)
    a = landmarks_to_tensor([np.array([[100.0, 100.0], [400.0, 300.0]])], (512, 512))
    b = landmarks_to_tensor([np.array([[140.0, 100.0], [400.0, 340.0]])], (512, 512))
    with torch.no_grad():
        fa, fb = enc(torch.cat([a, b]))
    assert fa.shape == (768,)
    assert (fa - fb).norm() > 1e-3 * fa.norm()  # moved dots give a different motion feature
    tiny = KeypointEncoder(image_size=32, feature_dim=16, channels=(8, 12))
    assert tiny(torch.zeros(3, 1, 32, 32)).shape == (3, 16)
    with pytest.raises(ValueError, match="expected"):
        tiny(torch.zeros(3, 1, 96, 96))


# ---------------------------------------------------------------- IMR


def test_sd15_dims_shapes():
    torch.manual_seed(0)
    imr = IMR.from_params(SD15ProfileParams().imr, token_dim=768, text_dim=768)
    assert len(imr.disentangle_layers) == 1 and imr.width == 1024
    feats = _features(2, dict(token_dim=768, landmark_dim=768, text_dim=768), torch.Generator().manual_seed(0))
    with torch.no_grad():
        edited, erased = imr(*feats, return_erased=True)
        motion = imr.motion(feats[1], feats[2])
    assert edited.shape == (2, 4, 768) and erased.shape == (2, 4, 1024) and motion.shape == (2, 4, 1024)


def test_tiny_profile_shapes():
    p = TinyProfileParams()
    imr = IMR.from_params(p.imr, token_dim=p.cross_attention_dim, text_dim=p.text.hidden_size)
    feats = _features(3, dict(token_dim=64, landmark_dim=p.imr.landmark_feature_dim, text_dim=64),
                      torch.Generator().manual_seed(0))
    assert imr(*feats).shape == (3, 4, 64)


def test_motion_mlp_matches_independent_computation():
    torch.manual_seed(1)
    imr = IMR(**TINY).double()
    lm, tx = torch.randn(2, 64, dtype=torch.float64), torch.randn(2, 64, dtype=torch.float64)
    ln, l1, _, l2 = imr.motion_mlp
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
        x = torch.cat([lm, tx], dim=-1)
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
        h = x * ln.weight + ln.bias
        h = h @ l1.weight.T + l1.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        expected = (h @ l2.weight.T + l2.bias).reshape(2, 4, 64)
        torch.testing.assert_close(imr.motion(lm, tx), expected, rtol=1e-10, atol=1e-10)


def test_erasing_sees_only_source_motion_and_entangling_writes_target_motion():
    torch.manual_seed(2)
    imr = IMR(**TINY)
    tok, s_lm, s_tx, t_lm, t_tx = _features(2, TINY, torch.Generator().manual_seed(2))
    with torch.no_grad():
        edited, erased = imr(tok, s_lm, s_tx, t_lm, t_tx, return_erased=True)
        edited2, erased2 = imr(tok, s_lm, s_tx, t_lm + 1, t_tx, return_erased=True)
        _, erased3 = imr(tok, s_lm + 1, s_tx, t_lm, t_tx, return_erased=True)
    torch.testing.assert_close(erased2, erased)  # target motion never reaches the erased tokens
    assert (edited2 - edited).abs().max() > 1e-3
    assert (erased3 - erased).abs().max() > 1e-3
    # the pieces compose to forward
    with torch.no_grad():
        manual = imr.entangle(imr.disentangle(tok, imr.motion(s_lm, s_tx)), imr.motion(t_lm, t_tx))
    torch.testing.assert_close(manual, edited)


def test_identities_are_reconfigured_independently():
    torch.manual_seed(3)
    imr = IMR(**TINY)
    feats = _features(3, TINY, torch.Generator().manual_seed(3))
    changed = [f.clone() for f in feats]
    for f in changed:
        f[2] = torch.randn_like(f[2])
    with torch.no_grad():
        a, b = imr(*feats), imr(*changed)
    torch.testing.assert_close(b[:2], a[:2])
    assert (b[2] - a[2]).abs().max() > 1e-3


def test_every_parameter_gets_a_gradient_through_keypoint_encoder_and_imr():
    torch.manual_seed(4)
    imr = IMR(**{**TINY, "depth": 2})
    kp = KeypointEncoder(image_size=48, feature_dim=64, channels=(8, 16))
    rng = np.random.default_rng(4)
    src = landmarks_to_tensor([rng.uniform(0, 512, (106, 2)) for _ in range(2)], (512, 512), size=48)
    tgt = landmarks_to_tensor([rng.uniform(0, 512, (106, 2)) for _ in range(2)], (512, 512), size=48)
    tok, _, s_tx, _, t_tx = _features(2, TINY, torch.Generator().manual_seed(4))
    edited, erased = imr(tok, kp(src), s_tx, kp(tgt), t_tx, return_erased=True)
    # random projections: sum() of LayerNorm-fed outputs can have zero gradient at init
    loss = (edited * torch.randn_like(edited)).sum() + (erased * torch.randn_like(erased)).sum()
    loss.backward()
    params = list(imr.named_parameters()) + [("kp." + n, p) for n, p in kp.named_parameters()]
    dead = [n for n, p in params if p.grad is None or p.grad.abs().max() == 0]
    assert dead == []


def test_depth_one_to_four_runs_and_each_level_adds_two_layers():
    feats = _features(2, TINY, torch.Generator().manual_seed(5))
    layer_params = sum(p.numel() for p in IMRLayer(64, 2, 32, 2).parameters())
    counts = {}
    for depth in range(1, 5):
        imr = IMR(**{**TINY, "depth": depth})
        assert len(imr.disentangle_layers) == len(imr.entangle_layers) == depth
        with torch.no_grad():
            assert imr(*feats).shape == (2, 4, 64)
        counts[depth] = sum(p.numel() for p in imr.parameters())
    for depth in range(2, 5):
        assert counts[depth] - counts[1] == 2 * (depth - 1) * layer_params


def test_bad_inputs_name_the_problem():
    imr = IMR(**TINY)
    tok, s_lm, s_tx, t_lm, t_tx = _features(2, TINY, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="tokens must be"):
        imr(tok[..., :32], s_lm, s_tx, t_lm, t_tx)
    with pytest.raises(ValueError, match="landmark feature"):
        imr(tok, s_lm[:, :10], s_tx, t_lm, t_tx)
    with pytest.raises(ValueError, match="batch mismatch"):
        imr(tok, s_lm, s_tx[:1], t_lm, t_tx)
    with pytest.raises(ValueError, match="motion latents"):
        imr.disentangle(tok, imr.motion(s_lm[:1], s_tx[:1]))


def test_imr_learns_to_reproduce_tokens_when_target_equals_source():
    """A real learning check: with target motion = source motion the IMR should learn the identity map."""
    torch.manual_seed(7)
    imr = IMR(**TINY)
    gen = torch.Generator().manual_seed(7)
    held = _features(64, TINY, gen)

    def held_out_mse() -> float:
        with torch.no_grad():
            tok, lm, tx = held[:3]
            return F.mse_loss(imr(tok, lm, tx, lm, tx), tok).item()

    before = held_out_mse()
    opt = torch.optim.Adam(imr.parameters(), lr=3e-3)
    for _ in range(60):  # fresh identities every step: it must learn the map, not memorise samples
        tok, lm, tx = _features(32, TINY, gen)[:3]
        loss = F.mse_loss(imr(tok, lm, tx, lm, tx), tok)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_mse()
    # tokens have unit variance: predicting zeros scores ~1.0; the untrained net scores worse than that
    assert before > 1.0
    assert after < 0.4 and after < before / 3


# ---------------------------------------------------------------- InfoNCE


def _info_nce_reference(a: np.ndarray, b: np.ndarray, t: float) -> float:
    pa, pb = a.mean(axis=1), b.mean(axis=1)
    pa = pa / np.linalg.norm(pa, axis=1, keepdims=True)
    pb = pb / np.linalg.norm(pb, axis=1, keepdims=True)
    n = len(pa)
    sim = np.array([[float(pa[i] @ pb[j]) / t for j in range(n)] for i in range(n)])
    a_to_b = np.mean([-(sim[i, i] - math.log(sum(math.exp(s) for s in sim[i]))) for i in range(n)])
    b_to_a = np.mean([-(sim[i, i] - math.log(sum(math.exp(s) for s in sim[:, i]))) for i in range(n)])
    return 0.5 * (a_to_b + b_to_a)


def test_info_nce_equals_independent_formula():
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(5, 4, 16, generator=gen, dtype=torch.float64), torch.randn(5, 4, 16, generator=gen,
                                                                                  dtype=torch.float64)
    for t in (0.07, 0.5):
        got = info_nce(a, b, t).item()
        assert got == pytest.approx(_info_nce_reference(a.numpy(), b.numpy(), t), rel=1e-10)


def test_info_nce_is_lower_for_matched_pairs_than_shuffled():
    gen = torch.Generator().manual_seed(9)
    people = torch.randn(8, 4, 32, generator=gen)
    view_a = people + 0.3 * torch.randn(people.shape, generator=gen)  # same person, two motions
    view_b = people + 0.3 * torch.randn(people.shape, generator=gen)
    matched = info_nce(view_a, view_b, 0.1)
    shuffled = info_nce(view_a, view_b[torch.roll(torch.arange(8), 1)], 0.1)
    assert matched < 0.5 * shuffled
    assert info_nce(view_a[:1], view_b[:1], 0.1).item() == pytest.approx(0.0, abs=1e-6)  # no negatives
    with pytest.raises(ValueError, match="temperature"):
        info_nce(view_a, view_b, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        info_nce(view_a, view_b[:4], 0.1)

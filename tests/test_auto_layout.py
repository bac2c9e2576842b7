"""layout auto (issue 20): the map-to-region rule, the per-identity activation maps, the switch inside the
pipeline (plain and fast path), and what generate and the endpoint return.

No test here shows that a *trained* checkpoint places two distinct people without boxes: there is no
trained test-bed checkpoint yet (docs/evaluation.md, the layout comparison, says what will measure it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.saa.auto_layout import AutoLayoutRule, boxes_overlap, layout_candidates
from model.saa.auto_run import AutoLayoutRun, resolve_layout
from model.saa.context import IDContext
from model.saa.layout_maps import ActivationRecorder, RoutedIDContext
from model.saa.regions import masks_from_boxes

RULE = AutoLayoutRule()
STRIPS = {n: [[0.0, i / n, 1.0, (i + 1) / n] for i in range(n)] for n in (2, 3, 4)}


def close(got, want) -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32),
                               rtol=0, atol=1e-5)


def blob(cy: float, cx: float, size: int = 16, sigma: float = 0.08, scale: float = 1.0) -> torch.Tensor:
    """[size, size] Gaussian bump centred at (cy, cx) in normalised image coordinates."""
    c = (torch.arange(size) + 0.5) / size
    return scale * torch.exp(-((c[:, None] - cy) ** 2 + (c[None, :] - cx) ** 2) / (2 * sigma**2))


def boxes_of(*maps: torch.Tensor) -> torch.Tensor:
    return RULE(torch.stack(maps)[None])[0]  # [N, 4]


def contains(box, y: float, x: float) -> bool:
    return box[0] <= y < box[2] and box[1] <= x < box[3]


def mass_in(box, m: torch.Tensor) -> float:
    """Fraction of map m's mass whose cell centres lie in box."""
    c = (torch.arange(m.shape[0]) + 0.5) / m.shape[0]
    inside = ((c[:, None] >= box[0]) & (c[:, None] < box[2]) & (c[None, :] >= box[1]) & (c[None, :] < box[3]))
    return float((m * inside).sum() / m.sum())


def assert_partition(boxes: torch.Tensor, min_side: float = 0.25) -> None:
    """Exclusive (no overlap), covering, non-degenerate boxes inside the image."""
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= min_side - 1e-6).all()
    assert ((boxes[:, 3] - boxes[:, 1]) >= min_side - 1e-6).all()
    assert not boxes_overlap(boxes).any()
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert float(area) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- the rule on constructed maps


@pytest.mark.parametrize("n", [2, 3, 4])
def test_maps_that_say_nothing_give_strips(n):
    for maps in (torch.zeros(1, n, 16, 16), torch.ones(1, n, 16, 16)):
        close(RULE(maps)[0], STRIPS[n])


def test_two_people_each_get_their_own_peak():
    boxes = boxes_of(blob(0.5, 0.8), blob(0.5, 0.2))  # identity 0 on the right
    assert contains(boxes[0], 0.5, 0.8) and contains(boxes[1], 0.5, 0.2)
    assert_partition(boxes)


def test_tie_one_face_goes_whole_to_one_identity_and_deterministically():
    """Identical maps on one face: the face is not split; exact ties go to the lower identity index."""
    face = blob(0.5, 0.5)
    boxes = boxes_of(face, face.clone())
    assert mass_in(boxes[0], face) > 0.95 and mass_in(boxes[1], face) < 0.05
    assert_partition(boxes)
    assert torch.equal(boxes_of(face, face.clone()), boxes)
    # one face, two claims of different strength: the stronger claim wins it, wherever its strip is
    strong, weak = blob(0.5, 0.5, sigma=0.06), blob(0.5, 0.5, sigma=0.12)
    assert mass_in(boxes_of(weak, strong)[1], strong) > 0.95
    assert mass_in(boxes_of(strong, weak)[0], strong) > 0.95


def test_one_identity_absent_still_gets_room():
    present = blob(0.4, 0.7)
    boxes = boxes_of(torch.zeros(16, 16), present)
    assert contains(boxes[1], 0.4, 0.7) and mass_in(boxes[1], present) > 0.9
    assert_partition(boxes)
    # three people, the middle one absent: the other two keep their faces
    boxes = boxes_of(blob(0.5, 0.15), torch.zeros(16, 16), blob(0.5, 0.85))
    assert contains(boxes[0], 0.5, 0.15) and contains(boxes[2], 0.5, 0.85)
    assert_partition(boxes)


def test_overlapping_peaks_are_separated():
    a, b = blob(0.5, 0.4), blob(0.5, 0.6)  # half-overlapping faces side by side
    boxes = boxes_of(a, b)
    assert contains(boxes[0], 0.5, 0.4) and contains(boxes[1], 0.5, 0.6)
    assert mass_in(boxes[0], a) > 0.8 and mass_in(boxes[1], b) > 0.8
    assert_partition(boxes)


@pytest.mark.parametrize("centres", [
    [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)],      # two rows of two
    [(0.5, 0.125), (0.4, 0.375), (0.5, 0.625), (0.4, 0.875)],      # one row, heads at two heights
    [(0.3, 0.85), (0.7, 0.15), (0.3, 0.4), (0.75, 0.6)],           # scattered, not in strip order
])
def test_four_identities_at_64px_latents(centres):
    """64 x 64 latents: the maps are read at level 2, 16 x 16 queries."""
    grid = AutoLayoutRun(IDContext(num_ids=4, latent_hw=(64, 64)), batch=1, cfg=False, num_steps=30, boost_steps=3,
                         levels=4, device="cpu").recorder.grid
    assert grid == (16, 16)
    boxes = boxes_of(*[blob(cy, cx, size=grid[0], sigma=0.06) for cy, cx in centres])
    for box, (cy, cx) in zip(boxes.tolist(), centres):
        assert contains(box, cy, cx)
    assert_partition(boxes)


def test_random_maps_always_give_exclusive_connected_non_degenerate_regions():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 4):
        for size in (8, 16, (12, 20)):
            h, w = (size, size) if isinstance(size, int) else size
            maps = torch.rand(3, n, h, w, generator=g) ** 6  # peaky noise
            for boxes in RULE(maps):
                assert_partition(boxes)
                # connected and non-empty at the 64 x 64 latent grid: each region is one rectangle of cells
                inside = masks_from_boxes(boxes[None], 64, 64, n * 4).inside[0].view(64, 64, n)
                assert not (inside.sum(-1) > 1).any()  # exclusive at the query level too
                for i in range(n):
                    rows, cols = inside[..., i].any(1).nonzero()[:, 0], inside[..., i].any(0).nonzero()[:, 0]
                    assert len(rows) >= 16 and len(cols) >= 16
                    assert rows.tolist() == list(range(rows[0], rows[-1] + 1))
                    assert inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, i].all()
                    assert int(inside[..., i].sum()) == len(rows) * len(cols)


def test_candidates_put_strips_first_and_are_exclusive():
    for n in (2, 3, 4):
        cand = layout_candidates(n, 12, 3)
        close(cand[0].float() / 12, STRIPS[n])
        assert not boxes_overlap(cand).any()
    assert layout_candidates(4, 12, 3).shape[0] == 45576


# --------------------------------------------------------------------------- maps, masks, layout choice


def test_recorder_reads_each_identitys_gate_at_its_grid_only():
    """Identity 0's key points along the left half's queries, identity 1's along the right half's."""
    heads, d, h, w, k = 2, 4, 4, 6, 2
    query = torch.zeros(1, heads, h * w, d)
    left = (torch.arange(h * w) % w) < w // 2
    query[0, :, left, 0] = 1.0
    query[0, :, ~left, 1] = 1.0
    key = torch.zeros(1, heads, 2 * k, d)
    key[0, :, :k, 0] = 1.0
    key[0, :, k:, 1] = 1.0
    rec = ActivationRecorder(1, 2, k, (h, w), tau=0.3, device="cpu")
    rec.record(query, key, (h, w))
    rec.record(query, key, (2, 3))  # another level: ignored
    assert torch.equal(rec.maps[0, 0].flatten() > 0, left) and torch.equal(rec.maps[0, 1].flatten() > 0, ~left)
    assert float(rec.maps.max()) == 1.0


def test_device_masks_equal_the_host_masks_of_idcontext():
    boxes = torch.tensor([[[0.0, 0.0, 0.5833333, 1.0], [0.5833333, 0.0, 1.0, 0.4166667],
                           [0.5833333, 0.4166667, 1.0, 1.0]]])
    host = IDContext(num_ids=3, regions=boxes, latent_hw=(20, 12))
    routed = RoutedIDContext(num_ids=3, latent_hw=(20, 12), device_regions=boxes)
    for q_h, q_w in ((20, 12), (10, 6), (5, 3)):
        a, b = host.region_masks(q_h, q_w, "cpu"), routed.region_masks(q_h, q_w, "cpu")
        for x, y in zip(a, b):
            assert torch.equal(x, y)


class _Ident:
    def __init__(self, bbox=None):
        self.bbox = bbox


@pytest.mark.parametrize("n, layout, bbox, want", [
    (2, None, None, "auto"), (4, None, None, "auto"), (1, None, None, "strips"), (5, None, None, "strips"),
    (3, "strips", None, "strips"), (1, "auto", None, "strips"), (2, None, (0, 0, 1, 0.5), "boxes"),
])
def test_layout_choice(n, layout, bbox, want):
    ids = [_Ident(bbox if i == 0 else None) for i in range(n)]
    assert resolve_layout([ids], layout) == want


@pytest.mark.parametrize("n, layout, bbox, match", [
    (2, "auto", (0, 0, 1, 0.5), "identity 0 gives a bbox"), (2, "strips", (0, 0, 1, 0.5), "not both"),
    (5, "auto", None, "at most 4"), (2, "rows", None, "one of auto, strips"),
])
def test_layout_errors(n, layout, bbox, match):
    with pytest.raises(ValueError, match=match):
        resolve_layout([[_Ident(bbox if i == 0 else None) for i in range(n)]], layout)


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipes(tiny_params, init_ckpt):
    from model.fast.enable import enable_fast_path
    from model.loading import load_pipeline

    def load():
        p = load_pipeline(tiny_params.model, tiny_params.face, init_ckpt, tiny_params.storage.cache_dir)
        p.set_progress(False)
        return p

    plain, fast = load(), load()
    handle = enable_fast_path(fast, mode="auto", buckets=[(64, 64, 2)])
    return plain, fast, handle


def _ids(pipe, n: int):
    from model.dynamicid import clip_image_features
    from model.pipeline import IdentityInput

    out = []
    for seed in range(1, n + 1):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(pipe.dims.id_dim, generator=g)
        size = pipe.backbone.image_size
        feats = clip_image_features(pipe.backbone, torch.rand(1, 3, size, size, generator=g))[0]
        out.append(IdentityInput(embedding=(emb / emb.norm()).numpy(), clip_features=feats))
    return out


def _spy(pipe):
    """Wrap the step function: record, per step, the context the UNet got."""
    seen = []
    inner = pipe.step_runner or pipe.denoise_step

    def step(latents, t, states, ctx):
        seen.append((type(ctx).__name__, ctx.recorder is not None, bool(ctx.boost_active),
                     None if ctx.regions is None else ctx.regions.tolist(),
                     getattr(ctx, "device_regions", None)))
        return inner(latents, t, states, ctx)

    return seen, step


HORIZONTAL = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])


def test_auto_runs_end_to_end_switches_at_its_step_and_returns_boxes(pipes, monkeypatch):
    plain, _, _ = pipes
    ids = _ids(plain, 2)
    seen, step = _spy(plain)
    monkeypatch.setattr(plain, "step_runner", step)
    # a rule that answers "one above the other", so the switch visibly changes the routing
    monkeypatch.setattr(AutoLayoutRule, "__call__", lambda self, maps: HORIZONTAL.expand(maps.shape[0], -1, -1))
    out = plain("a photo of two people", ids, num_inference_steps=6, seed=3, output_type="pt")
    assert out.layout == "auto" and [r.region for r in out.identities[0]] == HORIZONTAL.tolist()
    assert out.layout_maps.shape == (1, 2, 16, 16) and float(out.layout_maps.max()) <= 1.0
    switch, boost = 2, plain.model_params.saa.boost_steps  # DEFAULT_SWITCH_STEP, then the boost after it
    for i, (kind, recording, boosted, regions, device_regions) in enumerate(seen):
        if i < switch:  # observing: no routing (full-image boxes), no boost, maps recorded
            assert (kind, recording, boosted) == ("IDContext", True, False)
            assert regions == [[0.0, 0.0, 1.0, 1.0]] * 2
        else:
            assert (kind, recording, boosted) == ("RoutedIDContext", False, i < switch + boost)
            assert torch.equal(device_regions, HORIZONTAL.repeat(2, 1, 1))  # CFG: both halves
    assert len({id(s[4]) for s in seen[switch:]}) == 1  # one switch: the same routed context from then on


def test_params_choose_the_switch_step_and_the_map_grid(pipes, monkeypatch):
    """model.saa.auto reaches the run: a later switch (3), maps read at the full latent grid (level 0, where
    the default reads level 2, clamped to the tiny UNet's deepest), a rule whose regions may be a sixth of
    the image (min_cells 2), all from params alone."""
    from model.config import AutoLayoutSettings

    plain, _, _ = pipes
    settings = AutoLayoutSettings(switch_step=3, map_level=0, min_cells=2)
    monkeypatch.setattr(plain.model_params.saa, "auto", settings)
    rules = []
    monkeypatch.setattr(AutoLayoutRule, "__call__",
                        lambda self, maps: rules.append(self) or HORIZONTAL.expand(maps.shape[0], -1, -1))
    seen, step = _spy(plain)
    monkeypatch.setattr(plain, "step_runner", step)
    out = plain("a photo of two people", _ids(plain, 2), num_inference_steps=6, seed=3, output_type="pt")
    latent = 64 // 2 ** (len(plain.vae.config.block_out_channels) - 1)
    assert out.layout_maps.shape == (1, 2, latent, latent)
    assert [s[0] for s in seen] == ["IDContext"] * 3 + ["RoutedIDContext"] * 3
    assert [r.min_cells for r in rules] == [2]
    with pytest.raises(ValueError, match="min_cells"):
        AutoLayoutSettings(min_cells=1)


def test_auto_on_the_fast_path_matches_the_plain_path(pipes, monkeypatch):
    plain, fast, handle = pipes
    monkeypatch.setattr(AutoLayoutRule, "__call__", lambda self, maps: HORIZONTAL.expand(maps.shape[0], -1, -1))
    buckets = handle.runner.num_buckets
    want = plain("a photo of two people", _ids(plain, 2), num_inference_steps=4, seed=5, output_type="pt")
    got = fast("a photo of two people", _ids(fast, 2), num_inference_steps=4, seed=5, output_type="pt")
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.layout_maps, want.layout_maps, rtol=0, atol=1e-5)
    assert [r.region for r in got.identities[0]] == HORIZONTAL.tolist()
    assert handle.runner.num_buckets == buckets  # the warmed bucket: the switch is a buffer update
    slot = next(iter(handle.runner._slots.values()))
    assert slot.recorder is not None and slot.recorder.grid == (16, 16)


def test_the_real_rule_runs_on_a_batch_of_three_people(pipes):
    """Strips staying selectable: test_endpoint_... below and test_pipeline.py::test_multi_id_with_boxes_and_..."""
    _, fast, _ = pipes  # the plain path's switch is covered above, its equality with the fast path too
    auto = fast(["a photo of three people"] * 2, _ids(fast, 3), num_inference_steps=3, seed=1, output_type="pt")
    assert auto.layout == "auto" and auto.layout_maps.shape == (2, 3, 16, 16)
    for sample in auto.identities:
        assert_partition(torch.tensor([r.region for r in sample]))



def test_generate_cli_writes_the_layout_and_its_maps(tiny_params, init_ckpt, face_images_dir, tmp_path, capsys):
    from components.cli import main

    photo = str(face_images_dir / "Tom_Hanks_54745.png")
    out = tmp_path / "two.png"
    params = tmp_path / "params.yaml"
    params.write_text(f"storage:\n  cache_dir: {tiny_params.storage.cache_dir}\n")
    rc = main(["--params", str(params), "generate", "--checkpoint", str(init_ckpt), "--prompt", "two people",
               "--id-image", photo, "--id-image", photo, "--steps", "2", "--out", str(out)])
    assert rc == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["layout"] == "auto" and meta["layout_maps"] == "two.layout.png"
    assert_partition(torch.tensor([i["region"] for i in meta["identities"]]))
    assert Image.open(tmp_path / "two.layout.png").size == Image.open(out).size


# --------------------------------------------------------------------------- the endpoint


@pytest.fixture(scope="module")
def endpoint(tiny_params, init_ckpt):
    from prometheus_client import CollectorRegistry

    from components.core.config import params_from_dict
    from serving.metrics import ServingMetrics
    from serving.predictor import DynamicIDModel

    loop = asyncio.new_event_loop()
    params = params_from_dict({"storage": {"cache_dir": str(tiny_params.storage.cache_dir)}, "serve": {
        "request_timeout_s": 60.0, "max_batch_size": 2, "batch_window_ms": 10, "cpu_threads": 1,
        "default_steps": 2}})
    m = DynamicIDModel(params, model_uri=str(init_ckpt),
                       metrics=ServingMetrics("dynamicid", 4, registry=CollectorRegistry()))
    loop.run_until_complete(m.start_engine())
    yield m, loop
    loop.run_until_complete(m.batcher.close())
    m.stop_engine()
    loop.close()


def test_endpoint_returns_the_regions_and_maps_and_keeps_strips(endpoint, single_face_photo):
    from serving.errors import ServingError

    model, loop = endpoint
    photo = base64.b64encode(Path(single_face_photo).read_bytes()).decode()
    two = [{"image": photo}, {"image": photo}]

    def ask(**extra):
        return loop.run_until_complete(model.predict({"instances": [
            {"prompt": "two people", "identities": extra.pop("identities", two), "seed": 1, **extra}]}))

    auto = ask(layout_maps=True)["predictions"][0]
    assert auto["layout"] == "auto"
    assert_partition(torch.tensor([i["region"] for i in auto["identities"]]))
    maps = Image.open(io.BytesIO(base64.b64decode(auto["layout_maps"])))
    assert maps.size == Image.open(io.BytesIO(base64.b64decode(auto["image"]))).size
    strips = ask(layout="strips")["predictions"][0]
    assert strips["layout"] == "strips" and "layout_maps" not in strips
    close([i["region"] for i in strips["identities"]], STRIPS[2])
    with pytest.raises(ServingError, match="not both"):
        ask(layout="auto", identities=[{"image": photo, "bbox": [0, 0, 1, 0.5]}, {"image": photo}])
    boxed = ask(identities=[{"image": photo, "bbox": [0.1, 0.0, 0.9, 0.5]}, {"image": photo}])["predictions"][0]
    assert boxed["layout"] == "boxes" and boxed["identities"][0]["region"] == [0.1, 0.0, 0.9, 0.5]
    assert np.asarray(maps).shape[-1] == 3


# --------------------------------------------------------------------------- the evaluation's layout comparison


def test_evaluation_generates_each_layout_and_reports_it_under_its_own_key(tiny_params):
    from types import SimpleNamespace

    from components.core.metric_catalogue import metric_info
    from components.evaluate.evalset import EvalSet, Job, Reference, user_boxes
    from components.evaluate.generation import generate
    from components.evaluate.metrics import aggregate

    refs = [Reference(f"p{i}", f"k{i}", np.zeros((8, 8, 3), np.uint8), np.ones(4, np.float32)) for i in range(3)]
    jobs = [Job(f"multi3{'_' + lay if lay else ''}", (0, 1, 2), "three people", 0, layout=lay)
            for lay in (None, "boxes", "strips")]
    calls = []

    def pipe(prompts, ids, seed, layout=None, **kw):
        calls.append((layout, [[i.bbox for i in sample] for sample in ids]))
        n = len(ids[0]) if ids else 0
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))] * len(prompts),
                               identities=[[SimpleNamespace(region=[0.0, 0.0, 1.0, 1.0])] * n] * len(prompts))

    generate(pipe, EvalSet(refs, jobs, {}, "h"), tiny_params)
    assert calls[:3] == [(None, [[None] * 3]), (None, [user_boxes(3)]), ("strips", [[None] * 3])]
    assert not boxes_overlap(torch.tensor(user_boxes(3))).any()
    rows = [{"kind": k, "variant": v, "identity": f"p{p}", "prompt": "q", "seed": 0, "group": "g", "job": 0,
             "id_similarity": 0.5, "detected": p != 2, "confused": p == 0, "copy_paste": 0.0, "clip_t": 0.2}
            for k in ("multi3", "multi3_strips") for v in ("id", "baseline") for p in range(3)]
    agg = aggregate(rows)
    for kind in ("multi3", "multi3_strips"):
        assert agg[f"{kind}.missing_rate"] == pytest.approx(1 / 3)
        assert agg[f"{kind}.confusion_rate"] == pytest.approx(1 / 3)
        assert metric_info(f"{kind}.confusion_rate").direction == "lower"

"""Correctness under speed, on the benchmark's GPU and models (fp16, SD1.5 size).

* the fast path (precomputed ID work, CUDA-graph replay) against the plain eager SAA, for
  every identity count, boost on and off, and several layouts;
* two layouts replayed through ONE captured bucket, each against its own eager result (a
  stale mask or scale would fail this);
* the release-design baseline against the project's SAA: the baseline must compute the same
  function, or comparing their speed would mean nothing.

Errors are relative: ||a - b|| / ||b|| over the UNet output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.release_design import ReleaseContext
from model.fast.buckets import BucketStepRunner
from model.saa.context import IDContext

# Two-identity layouts (y0, x0, y1, x1), non-overlapping (the release's routing is undefined on overlaps).
LAYOUTS: dict[str, list[list[float]] | None] = {
    "strips": None,
    "boxes": [[0.1, 0.05, 0.7, 0.45], [0.2, 0.55, 0.9, 0.95]],
    "halves": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]],
}
TOLERANCE = 2e-2  # fp16 UNet output with random weights; typical errors are ~1e-3


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _cases(id_counts: list[int]):
    for n in id_counts:
        for boost in (False, True):
            for layout in (LAYOUTS if n == 2 else {"strips": None}):
                yield n, boost, layout


def _ctx(n: int, h: int, boost: bool, layout: str) -> IDContext:
    boxes = LAYOUTS[layout] if n == 2 else None
    ctx = IDContext(num_ids=n, latent_hw=(h, h), regions=None if boxes is None else torch.tensor(boxes))
    ctx.boost_active = boost
    return ctx


@torch.no_grad()
def plain_references(unet, latents: Tensor, t: Tensor, states: dict[int, Tensor], id_counts: list[int]) -> dict:
    """Eager outputs of the plain SAA processors (the reference everything else is held to)."""
    h = latents.shape[-1]
    refs = {}
    for n, boost, layout in _cases(id_counts):
        ctx = _ctx(n, h, boost, layout)
        refs[(n, boost, layout)] = unet(latents, t, encoder_hidden_states=states[n],
                                        cross_attention_kwargs={"id_context": ctx}).sample.clone()
    return refs


def _summary(errors: dict[str, float], extra: dict | None = None) -> dict:
    worst = max(errors.values()) if errors else float("nan")
    finite = all(e == e for e in errors.values())
    return {"max_rel_err": worst, "passed": bool(finite and worst < TOLERANCE), "tolerance": TOLERANCE,
            "cases": {k: round(v, 6) for k, v in errors.items()}, **(extra or {})}


@torch.no_grad()
def fast_vs_plain(unet, latents: Tensor, t: Tensor, states: dict[int, Tensor], refs: dict) -> dict:
    """All cases through one runner in sequence: buckets are reused across layouts and boost."""
    h = latents.shape[-1]
    runner = BucketStepRunner(unet, capture=latents.device.type == "cuda", precomputed=True)
    errors = {}
    for (n, boost, layout), ref in refs.items():
        out = runner(latents, t, states[n], _ctx(n, h, boost, layout))
        errors[f"ids={n} boost={boost} layout={layout}"] = rel_err(out, ref)
    return _summary(errors, {"buckets": runner.num_buckets, "captured_graphs": runner.captures})


@torch.no_grad()
def layout_swap(unet, latents: Tensor, t: Tensor, states2: Tensor) -> dict:
    """Layouts A, B, A through one captured bucket; each replay against a fresh eager plain result."""
    h = latents.shape[-1]
    runner = BucketStepRunner(unet, capture=latents.device.type == "cuda", precomputed=True)
    errors, outs = {}, []
    for i, layout in enumerate(("boxes", "halves", "boxes")):
        for boost in (False, True):
            got = runner(latents, t, states2, _ctx(2, h, boost, layout))
            want = unet(latents, t, encoder_hidden_states=states2,
                        cross_attention_kwargs={"id_context": _ctx(2, h, boost, layout)}).sample
            errors[f"{i}:{layout} boost={boost}"] = rel_err(got, want)
            outs.append(got)
    layouts_differ = rel_err(outs[0], outs[2])
    # a scheduler stepping on the host hands a CPU timestep: same bucket, same result
    host_t = runner(latents, t.cpu(), states2, _ctx(2, h, True, "boxes"))
    errors["host timestep"] = rel_err(host_t, outs[-1])
    res = _summary(errors, {"buckets": runner.num_buckets, "captured_graphs": runner.captures,
                            "rel_diff_between_layouts": round(layouts_differ, 6)})
    res["passed"] = bool(res["passed"] and runner.num_buckets == 1 and layouts_differ > 10 * res["max_rel_err"])
    return res


@torch.no_grad()
def release_vs_plain(unet, latents: Tensor, t: Tensor, states: dict[int, Tensor], refs: dict) -> dict:
    """The release design (installed in ``unet``) against the project's plain SAA outputs."""
    h = latents.shape[-1]
    errors = {}
    for (n, boost, layout), ref in refs.items():
        if n > 2:
            continue
        boxes = LAYOUTS[layout] if n == 2 else None
        ctx = ReleaseContext(num_ids=n, latent_hw=(h, h), bboxes=boxes or [], boost_active=boost)
        out = unet(latents, t, encoder_hidden_states=states[n], cross_attention_kwargs={"id_context": ctx}).sample
        errors[f"ids={n} boost={boost} layout={layout}"] = rel_err(out, ref)
    return _summary(errors)

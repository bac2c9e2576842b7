"""The fast path's gate a(q) fused with the gated add ``out += a(q) * id_out``: eager or torch.compile'd.

``gate_add_eager`` is the in-place kernels version; ``compiled_gate_add`` compiles the same
math without in-place ops (``_gate_add_functional``) into two kernels, shared by all layers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Same guard as model/saa/processor.py's min-max normalisation (a constant activation map).
_NORM_EPS = 1e-12


@functools.lru_cache(maxsize=64)


def _tau_below(tau: float) -> float:
    """Largest fp32 below fp32(tau): ``threshold(a, t, 0)`` zeroes a <= t, i.e. exactly a < tau."""
    t = torch.tensor(tau, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-math.inf)))


def gate_add_eager(out: Tensor, act: Tensor, id_out: Tensor, tau_below: float, gating: bool,
                   boost: tuple[Tensor, Tensor] | None) -> Tensor:
    """out += a(q) * id_out in place; a(q) of method.md from the raw activation ``act``.

    out [B, L, heads, d] (contiguous), act [B, L, 1] (q dtype), id_out [B, L, heads, d] (any
    strides), boost = (add [B, L, 1], mul [B, L, 1]) fp32 or None. Written for few kernels: the
    statistics come from one aminmax, the threshold is one ``threshold`` call.
    """
    gate: Tensor | None = None
    if gating:
        lo, hi = torch.aminmax(act, dim=1, keepdim=True)  # [B, 1, 1]
        lo = lo.float()
        span = torch.sub(hi, lo).clamp_min_(_NORM_EPS)
        gate = F.threshold(torch.sub(act, lo).div_(span), tau_below, 0.0)  # [B, L, 1] fp32
    if boost is not None:
        add, mul = boost
        gate = torch.addcmul(add, gate, mul) if gate is not None else add + mul
    if gate is None:
        return out.add_(id_out)
    return out.addcmul_(gate.unsqueeze(-1), id_out)


def _gate_add_functional(out: Tensor, act: Tensor, id_out: Tensor, boost_add: Tensor | None,
                         boost_mul: Tensor | None, tau_below: float, gating: bool) -> Tensor:
    """The same math without in-place ops (what torch.compile fuses into two kernels)."""
    gate = None
    if gating:
        a = act.float()
        lo = a.amin(dim=1, keepdim=True)
        hi = a.amax(dim=1, keepdim=True)
        a = (a - lo) / (hi - lo).clamp_min(_NORM_EPS)
        gate = torch.where(a <= tau_below, torch.zeros_like(a), a)
    if boost_add is not None:
        gate = boost_add + gate * boost_mul if gate is not None else boost_add + boost_mul
    if gate is None:
        return out + id_out
    return (out.float() + gate.unsqueeze(-1) * id_out.float()).to(out.dtype)


_COMPILED: dict[str, Callable] = {}


def compiled_gate_add() -> Callable:
    """torch.compile'd gate + add, shared by all layers (dynamic shapes: one compile per variant)."""
    if "gate_add" not in _COMPILED:
        _COMPILED["gate_add"] = torch.compile(_gate_add_functional, dynamic=True, fullgraph=True)
    return _COMPILED["gate_add"]

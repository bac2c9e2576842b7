"""Identity regions: the default layout, box validation, and the RegionMasks record of one query grid.

A region is a normalised box (y0, x0, y1, x1) per identity, [N, 4] for the whole batch or
[B, N, 4] per sample; ``IDContext`` turns them into ``RegionMasks`` per UNet level.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def default_regions(num_ids: int) -> Tensor:
    """[N, 4] equal vertical strips (y0, x0, y1, x1): the release's layout when the user gives none."""
    if num_ids < 1:
        raise ValueError(f"default_regions needs at least one identity, got num_ids={num_ids}")
    edges = torch.linspace(0.0, 1.0, num_ids + 1, dtype=torch.float32)  # [N + 1]
    zeros, ones = torch.zeros(num_ids), torch.ones(num_ids)
    return torch.stack([zeros, edges[:-1], ones, edges[1:]], dim=1)  # [N, 4]


def validate_regions(regions: Tensor, num_ids: int) -> Tensor:
    """Check shape and box sanity; returns the regions as a float tensor ([N, 4] or [B, N, 4]).

    Errors name the identity (and the sample for per-sample regions) so that an API caller
    knows which box to fix.
    """
    regions = torch.as_tensor(regions)
    if not regions.is_floating_point():
        regions = regions.float()
    if regions.dim() not in (2, 3) or regions.shape[-1] != 4 or regions.shape[-2] != num_ids:
        raise ValueError(
            f"regions must have shape [N, 4] or [B, N, 4] with N = num_ids = {num_ids}, got {tuple(regions.shape)}"
        )
    boxes = regions.detach().to("cpu", torch.float64)
    boxes = boxes.unsqueeze(0) if boxes.dim() == 2 else boxes  # [B', N, 4]
    finite = torch.isfinite(boxes).all(-1)  # [B', N]
    in_range = ((boxes >= 0.0) & (boxes <= 1.0)).all(-1)
    ordered = (boxes[..., 0] < boxes[..., 2]) & (boxes[..., 1] < boxes[..., 3])
    bad = ~(finite & in_range & ordered)
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        where = f"identity {i}" + (f" of sample {b}" if regions.dim() == 3 else "")
        y0, x0, y1, x1 = boxes[b, i].tolist()
        raise ValueError(
            f"region of {where} is invalid: (y0, x0, y1, x1) = ({y0:g}, {x0:g}, {y1:g}, {x1:g}); "
            "values must lie in [0, 1] with y0 < y1 and x0 < x1"
        )
    return regions


class RegionMasks(NamedTuple):
    """Masks of one query grid, cached on the IDContext. R = 1 (shared layout) or the batch size."""

    inside: Tensor  # [R, HW, N] bool: query cell centre lies in identity n's box
    inside_any: Tensor  # [R, HW] bool: union of all boxes (where the early-step boost adds)
    allowed: Tensor | None  # [R, 1, HW, n_id_tokens] bool for SDPA (True = may attend); None = all allowed


def masks_from_boxes(boxes: Tensor, q_h: int, q_w: int, num_id_tokens: int, routing: bool = True) -> RegionMasks:
    """Region masks of one query grid from boxes [R, N, 4], computed on the boxes' device.

    A query belongs to a box when its cell centre lies inside it; comparisons are in float64, so
    a box rebuilt on the host from returned coordinates gives the same masks. Inside some boxes a
    query may read only the containing identities' tokens, outside every box all of them.
    ``routing=False`` allows every identity everywhere, kept as a mask (not None) because the fast
    path copies it into a static buffer.
    """
    device = boxes.device
    boxes = boxes.to(torch.float64)
    num_ids = boxes.shape[1]
    ys = (torch.arange(q_h, dtype=torch.float64, device=device) + 0.5) / q_h  # [q_h] cell centres
    xs = (torch.arange(q_w, dtype=torch.float64, device=device) + 0.5) / q_w  # [q_w]
    y0, x0, y1, x1 = (boxes[..., i, None, None] for i in range(4))  # each [R, N, 1, 1]
    in_y = (ys[:, None] >= y0) & (ys[:, None] < y1)  # [R, N, q_h, 1]
    in_x = (xs[None, :] >= x0) & (xs[None, :] < x1)  # [R, N, 1, q_w]
    inside = (in_y & in_x).flatten(2).transpose(1, 2).contiguous()  # [R, HW, N]
    inside_any = inside.any(-1)  # [R, HW]
    allowed = None
    if num_ids > 1:
        per_id = inside | ~inside_any[..., None]  # [R, HW, N]
        if not routing:
            per_id = torch.ones_like(per_id)
        allowed = per_id.repeat_interleave(num_id_tokens // num_ids, dim=-1).unsqueeze(1)  # [R, 1, HW, N*K]
    return RegionMasks(inside=inside, inside_any=inside_any, allowed=allowed)

"""What ``layout: auto`` needs inside the UNet: ``ActivationRecorder`` (per-identity gate maps) and
``RoutedIDContext`` (routing by boxes that live on the device).

Both keep the auto layout off the host: the maps are accumulated on the device by the SAA
processors while the first denoising steps run, the rule (``model.saa.auto_layout``) turns them
into boxes on the device, and ``RoutedIDContext`` builds its region masks from those boxes on the
device, so switching from observation to routing needs no host-GPU sync (and, on the fast path,
is a copy into the bucket's static mask buffers, not a new capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.saa.context import IDContext
from model.saa.regions import RegionMasks, masks_from_boxes

# Guards the min-max normalisation against a constant activation map (as SAAAttnProcessor._gate).
_NORM_EPS = 1e-12


class ActivationRecorder:
    """Accumulates, per identity, SAA's gate a_i(q) at one query grid: [B, N, h, w] fp32 on the device.

    a_i(q) is the gate of method.md restricted to identity i's tokens: the sum over heads and
    i's K tokens of the raw ID scores (``q . mean_t K_i[t]`` up to a positive factor), min-max
    normalised over the queries of each sample and zeroed below tau. Every cross-attention at
    ``grid`` adds its map while the recorder is attached to the IDContext (the observation
    steps), so ``maps`` sums over those layers and steps; the rule only uses each map's shape.
    Holds no reference to any module: one per request (or one per fast-path bucket).
    """

    def __init__(self, batch: int, num_ids: int, num_tokens: int, grid: tuple[int, int], tau: float,
                 device: torch.device | str):
        self.num_ids, self.num_tokens, self.tau = int(num_ids), int(num_tokens), float(tau)
        self.grid = (int(grid[0]), int(grid[1]))
        self.maps = torch.zeros(batch, num_ids, *self.grid, device=device, dtype=torch.float32)  # [B, N, h, w]

    def like(self) -> "ActivationRecorder":
        """An empty recorder of the same configuration (the fast path's static copy)."""
        return ActivationRecorder(self.maps.shape[0], self.num_ids, self.num_tokens, self.grid, self.tau,
                                  self.maps.device)

    def same_config(self, other: "ActivationRecorder") -> bool:
        return (other.maps.shape == self.maps.shape and other.maps.device == self.maps.device
                and other.num_tokens == self.num_tokens and other.tau == self.tau and other.grid == self.grid)

    def reset(self) -> None:
        self.maps.zero_()

    def record(self, query: Tensor, key: Tensor, grid: tuple[int, int]) -> None:
        """Add one layer's maps. query [B, heads, HW, d], key [B, heads, N*K, d] raw ID keys."""
        if tuple(grid) != self.grid:
            return
        batch, heads, seq_len, head_dim = query.shape
        if batch != self.maps.shape[0]:
            raise ValueError(f"ActivationRecorder holds {self.maps.shape[0]} samples, the UNet batch is {batch}")
        q = query.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)  # [B, HW, inner] (a view)
        k = key.unflatten(2, (self.num_ids, self.num_tokens)).mean(3)  # [B, heads, N, d]
        k = k.transpose(1, 2).reshape(batch, self.num_ids, heads * head_dim)  # [B, N, inner]
        act = torch.bmm(k, q.transpose(1, 2)).float()  # [B, N, HW]
        lo = act.amin(dim=2, keepdim=True)
        hi = act.amax(dim=2, keepdim=True)
        act = (act - lo) / (hi - lo).clamp_min(_NORM_EPS)
        act = act.masked_fill(act < self.tau, 0.0)
        self.maps.add_(act.view_as(self.maps))


@dataclass(eq=False)
class RoutedIDContext(IDContext):
    """IDContext routed by ``device_regions`` [R, N, 4] (normalised boxes on the model's device).

    The boxes come from ``AutoLayoutRule`` and are valid by construction, so they are not
    re-validated on the host (that would read them back, i.e. sync); masks are built on the
    boxes' device with the cell-centre rule (the boxes lie on a 1/12 grid, so ``box_rule`` is not
    applied); ``routing=False`` allows every identity everywhere, as in IDContext. ``regions``
    stays None.
    """

    device_regions: Tensor | None = None

    def _build_region_masks(self, q_h: int, q_w: int, device: torch.device) -> RegionMasks:
        if self.device_regions is None:
            return super()._build_region_masks(q_h, q_w, device)
        masks = masks_from_boxes(self.device_regions, q_h, q_w, self.num_id_tokens, self.routing)
        return RegionMasks(*(None if t is None else t.to(device) for t in masks))


__all__ = ["ActivationRecorder", "RoutedIDContext"]

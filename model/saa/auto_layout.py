"""The ``layout: auto`` rule: per-identity activation maps -> one exclusive box per identity.

Why this rule (issue 20, docs/method.md "Automatic layout"):

* **Regions partition the image, like strips.** The candidates are the guillotine partitions of
  the image into N rectangles (recursive horizontal / vertical cuts on a ``cells`` x ``cells``
  grid), every side at least ``min_cells`` cells. Exclusivity (no two boxes overlap),
  connectivity (each region is one rectangle) and non-degeneracy (minimum side) hold by
  construction; N equal vertical strips are one of the candidates, so strips are the special
  case the rule falls back to when the maps say nothing.
* **One face, one identity.** Before scoring, identities claim peaks greedily, strongest first:
  a peak claimed by identity i removes every other identity's mass on that face (near the peak:
  i's cells at >= ``claim_level`` of it where the other responds less than i, and the other's
  own response around it up to its value at the peak; that mass is spread uniformly instead). A face that two identities
  respond to goes to the one that responds more strongly, and the other gains nothing by
  cutting into it.
* **Score = mass inside the assigned box.** Each identity's map is normalised to sum to 1 (an
  all-zero map, i.e. an identity the model has not drawn yet, is uniform: it asks for room, not
  for a place); a candidate scores the sum over identities of their mass inside their box, plus
  ``prior`` times the overlap with their own strip (ties go to strips), minus the fraction of
  each claimed face's core that its box cuts off (a boundary does not run through a face).
* **All on the device, static shapes.** Candidates are enumerated once per (N, grid) on the host
  and cached on the device; scoring is four gathers on an integral image and one argmax, so the
  rule can run inside the denoising loop (or a CUDA graph) without a host round trip.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_AUTO_IDS = 4  # the candidate set grows as N! x partitions: 45,576 candidates at N = 4
_EPS = 1e-12

Rect = tuple[int, int, int, int]  # (y0, x0, y1, x1) in grid cells, half-open


@functools.lru_cache(maxsize=256)
def _partitions(rect: Rect, n: int, min_cells: int) -> frozenset[frozenset[Rect]]:
    """Every guillotine partition of ``rect`` into ``n`` rectangles with sides >= ``min_cells``."""
    y0, x0, y1, x1 = rect
    if y1 - y0 < min_cells or x1 - x0 < min_cells:
        return frozenset()
    if n == 1:
        return frozenset({frozenset({rect})})
    out: set[frozenset[Rect]] = set()
    for k in range(1, n):
        for c in range(y0 + min_cells, y1 - min_cells + 1):  # horizontal cut at row c
            for top in _partitions((y0, x0, c, x1), k, min_cells):
                out.update(top | bottom for bottom in _partitions((c, x0, y1, x1), n - k, min_cells))
        for c in range(x0 + min_cells, x1 - min_cells + 1):  # vertical cut at column c
            for left in _partitions((y0, x0, y1, c), k, min_cells):
                out.update(left | right for right in _partitions((y0, c, y1, x1), n - k, min_cells))
    return frozenset(out)


def strip_cells(num_ids: int, cells: int) -> list[Rect]:
    """The N equal vertical strips in grid cells (``cells`` must be a multiple of N)."""
    width = cells // num_ids
    return [(0, i * width, cells, (i + 1) * width) for i in range(num_ids)]


@functools.lru_cache(maxsize=16)
def layout_candidates(num_ids: int, cells: int, min_cells: int) -> Tensor:
    """[C, N, 4] int64 candidate boxes (cells) per identity: every partition x every assignment.

    Deterministic order, strips first: an exact tie between candidates goes to strips, then to
    the lexicographically smallest assignment.
    """
    if not 1 <= num_ids <= MAX_AUTO_IDS:
        raise ValueError(f"the auto layout handles 1..{MAX_AUTO_IDS} identities, got {num_ids}")
    if cells % num_ids or min_cells * num_ids > cells * cells:
        raise ValueError(f"a {cells}x{cells} grid cannot hold {num_ids} strips of side >= {min_cells}")
    labelled = set()
    for part in _partitions((0, 0, cells, cells), num_ids, min_cells):
        labelled.update(itertools.permutations(sorted(part)))
    strips = tuple(strip_cells(num_ids, cells))
    if strips not in labelled:
        raise ValueError(f"strips of {cells // num_ids} cells are narrower than min_cells={min_cells}")
    labelled.discard(strips)
    return torch.tensor([strips] + sorted(labelled), dtype=torch.int64)  # [C, N, 4]


@functools.lru_cache(maxsize=64)
def _area_matrix(cells: int, size: int, device: torch.device) -> Tensor:
    """[cells, size] fraction of map row/column k that lies in grid cell g (rows sum to the mass kept).

    Cached per device: a host-to-device copy per request would wait for the GPU's queue (a sync)."""
    g = torch.arange(cells, dtype=torch.float64)
    k = torch.arange(size, dtype=torch.float64)
    lo = torch.maximum(g[:, None] / cells, k[None, :] / size)
    hi = torch.minimum((g[:, None] + 1) / cells, (k[None, :] + 1) / size)
    return ((hi - lo).clamp_min(0.0) * size).float().to(device)


@dataclass(frozen=True)
class AutoLayoutRule:
    """Maps [B, N, h, w] (non-negative, any scale) -> boxes [B, N, 4] normalised (y0, x0, y1, x1).

    ``cells``: the cut grid (12 holds strips for 1..4 identities); ``min_cells``: the shortest
    side of a region in cells (3 of 12 = a quarter of the image); a claimed face is the claimant's
    cells within ``claim_radius`` (half-side, fraction of the image) of its peak where its map is
    at least ``claim_level`` x the peak: other identities lose their mass there where they respond
    less; ``peak_ratio``: a peak counts as a claim only if it is this many times the uniform
    density; a claimed face's core (claimant's cells at >= ``core_level`` of its peak) cut by its
    box costs ``core_weight`` times the fraction cut; ``prior``: weight of the strip prior
    (0 < prior << 1: it breaks ties only).
    """

    cells: int = 12
    min_cells: int = 3
    claim_radius: float = 0.25
    claim_level: float = 0.05
    core_level: float = 0.1
    core_weight: float = 1.0
    peak_ratio: float = 2.0
    prior: float = 0.1

    def __call__(self, maps: Tensor) -> Tensor:
        return self.cell_boxes(maps).float() / self.cells

    # ------------------------------------------------------------------ steps
    def distributions(self, maps: Tensor) -> Tensor:
        """[B, N, h, w] -> [B, N, G, G] fp32: each identity's mass on the cut grid, summing to 1."""
        _, _, h, w = maps.shape
        g = self.cells
        a_y = _area_matrix(g, h, maps.device)  # [G, h]
        a_x = _area_matrix(g, w, maps.device)  # [G, w]
        m = a_y @ maps.float().clamp_min(0.0) @ a_x.T  # [B, N, G, G]
        total = m.sum(dim=(-2, -1), keepdim=True)
        return torch.where(total > _EPS, m / total.clamp_min(_EPS), torch.full_like(m, 1.0 / (g * g)))

    def claim(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy peak claims, strongest first: [B, N, G, G] -> (the same with other identities' mass
        around each claimed peak moved to the uniform part, each map still summing to 1; [B, N, G, G]
        bool: each identity's claimed face core, empty without a claim)."""
        batch, n, g, _ = p.shape
        device = p.device
        ids = torch.arange(n, device=device)
        cell = torch.arange(g, device=device)
        radius = int(round(self.claim_radius * g))
        keep = torch.ones_like(p, dtype=torch.bool)
        open_ = torch.ones(batch, n, dtype=torch.bool, device=device)
        taken = torch.zeros(batch, g, g, dtype=torch.bool, device=device)  # cells of faces already claimed
        cores = torch.zeros_like(p, dtype=torch.bool)
        thresh = self.peak_ratio / (g * g)
        for _ in range(n):  # static: one claim (or none) per identity
            cand = torch.where(keep & open_[:, :, None, None], p, torch.full_like(p, -1.0)).flatten(1)
            idx = cand.argmax(dim=1)  # [B] first maximum: ties go to the lower identity index
            claims = cand.gather(1, idx[:, None]).squeeze(1) > thresh  # [B]
            who, at = idx // (g * g), idx % (g * g)
            near_y = (cell[None, :] - (at // g)[:, None]).abs() <= radius  # [B, G]
            near_x = (cell[None, :] - (at % g)[:, None]).abs() <= radius
            box = (near_y[:, :, None] & near_x[:, None, :] & ~taken)[:, None]  # [B, 1, G, G]; earlier faces stay
            level = self.claim_level
            own = p[torch.arange(batch, device=device), who]  # [B, G, G] the claimant's map
            peak = own.flatten(1).gather(1, at[:, None])[:, :, None]  # [B, 1, 1]
            face = own >= level * peak  # the claimed face: the claimant's cells at >= claim_level of its peak
            # each other identity's response to that face: its cells around it that are no stronger than at the
            # claimed cell (a broad response to the same face), so its own peak elsewhere is never taken
            here = p.flatten(2).gather(2, at[:, None, None].expand(batch, n, 1))[..., None]  # [B, N, 1, 1]
            theirs = (p >= level * here) & (p <= here)  # [B, N, G, G]
            others = (ids[None, :] != who[:, None]) & claims[:, None]  # [B, N]
            # on the claimed face, another identity keeps only the cells where it responds more than the claimant
            # (two overlapping faces each keep their own side)
            mine = face[:, None] & (p <= own[:, None])
            keep &= ~(box & (mine | theirs) & others[:, :, None, None])
            taken |= box[:, 0] & face & claims[:, None, None]
            core = box[:, 0] & (own >= self.core_level * peak) & claims[:, None, None]  # [B, G, G]
            cores |= core[:, None] & (ids[None, :] == who[:, None])[:, :, None, None]
            open_ &= ids[None, :] != who[:, None]
        kept = p * keep
        lost = 1.0 - kept.sum(dim=(-2, -1), keepdim=True)
        return kept + lost / (g * g), cores

    def scores(self, p: Tensor, cores: Tensor | None = None) -> Tensor:
        """[B, N, G, G] distributions (and claimed face cores) -> [B, C] candidate scores.

        Score = (1 - prior) * sum_i mass_i(box_i) + prior * strip overlap - core_weight * sum_i (fraction of
        identity i's claimed face core outside box_i): a region boundary never cuts through a claimed face
        when a candidate that keeps it whole exists.
        """
        batch, n, g, _ = p.shape
        cand = _device_candidates(n, g, self.min_cells, p.device)  # [C, N, 4]
        y0, x0, y1, x1 = cand.unbind(-1)  # each [C, N]
        ids = torch.arange(n, device=p.device)[None, :]  # [1, N]

        def box_sums(m: Tensor) -> Tensor:
            """[B, N, G, G] -> [B, C, N]: the sum of m_i over candidate box c_i (integral image, four gathers)."""
            integral = torch.zeros(batch, n, g + 1, g + 1, device=p.device, dtype=torch.float32)
            integral[..., 1:, 1:] = m.float().cumsum(-2).cumsum(-1)
            flat = integral.flatten(2)  # [B, N, (G+1)^2]

            def at(y: Tensor, x: Tensor) -> Tensor:
                return flat[:, ids, y * (g + 1) + x]  # [B, C, N]

            return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)

        score = (1.0 - self.prior) * box_sums(p).sum(-1) + self.prior * _strip_prior(n, g, self.min_cells, p.device)
        if cores is not None:
            size = cores.flatten(2).sum(-1).float()  # [B, N] cells of each claimed core (0: no claim)
            outside = 1.0 - box_sums(cores) / size.clamp_min(1.0)[:, None, :]  # [B, C, N]
            score = score - self.core_weight * (outside * (size > 0)[:, None, :]).sum(-1)
        return score

    def cell_boxes(self, maps: Tensor) -> Tensor:
        """[B, N, h, w] -> [B, N, 4] int64 boxes in grid cells (the chosen candidate)."""
        if maps.dim() != 4:
            raise ValueError(f"maps must be [B, N, h, w], got {tuple(maps.shape)}")
        p, cores = self.claim(self.distributions(maps))
        best = self.scores(p, cores).argmax(dim=1)  # [B]
        return _device_candidates(maps.shape[1], self.cells, self.min_cells, maps.device)[best]


@functools.lru_cache(maxsize=32)
def _device_candidates(num_ids: int, cells: int, min_cells: int, device: torch.device) -> Tensor:
    """``layout_candidates`` copied to ``device`` once (not once per request)."""
    return layout_candidates(num_ids, cells, min_cells).to(device)


@functools.lru_cache(maxsize=32)
def _strip_prior(num_ids: int, cells: int, min_cells: int, device: torch.device) -> Tensor:
    """[C] sum over identities of the fraction of identity i's strip that its candidate box covers."""
    cand = layout_candidates(num_ids, cells, min_cells).double()  # [C, N, 4]
    strips = torch.tensor(strip_cells(num_ids, cells), dtype=torch.float64)  # [N, 4]
    dy = (torch.minimum(cand[..., 2], strips[:, 2]) - torch.maximum(cand[..., 0], strips[:, 0])).clamp_min(0)
    dx = (torch.minimum(cand[..., 3], strips[:, 3]) - torch.maximum(cand[..., 1], strips[:, 1])).clamp_min(0)
    area = (strips[:, 2] - strips[:, 0]) * (strips[:, 3] - strips[:, 1])  # [N]
    return (dy * dx / area).sum(-1).float().to(device)


def boxes_overlap(boxes: Tensor) -> Tensor:
    """[..., N, 4] -> [..., N, N] bool: boxes i and j (i != j) share area."""
    y0, x0, y1, x1 = boxes.unbind(-1)
    dy = torch.minimum(y1[..., :, None], y1[..., None, :]) - torch.maximum(y0[..., :, None], y0[..., None, :])
    dx = torch.minimum(x1[..., :, None], x1[..., None, :]) - torch.maximum(x0[..., :, None], x0[..., None, :])
    eye = torch.eye(boxes.shape[-2], dtype=torch.bool, device=boxes.device)
    return (dy > 0) & (dx > 0) & ~eye


__all__ = ["AutoLayoutRule", "MAX_AUTO_IDS", "layout_candidates", "strip_cells", "boxes_overlap"]

"""One request's ``layout: auto``: observe the first steps, switch to routed regions once, report them.

The sampler asks ``AutoLayoutRun.context_for_step(i)`` for the IDContext of step i:

* steps ``0 .. switch_step - 1`` (observation): the request's own context with every identity
  allowed everywhere (one full-image box each: no routing), no early-step boost, and an
  ``ActivationRecorder`` attached, so every SAA cross-attention at the chosen UNet level adds
  each identity's gate map;
* step ``switch_step``: ``AutoLayoutRule`` turns the recorded maps (conditional CFG half) into
  one box per identity, on the device, and a ``RoutedIDContext`` carrying those boxes is used
  from then on, with the early-step boost for the ``boost_steps`` steps after the switch (the
  boost anchors faces in their regions, and the regions only exist from the switch on).

The switch happens once, at a fixed step, and is a new context (new masks), never a new shape:
on the fast path it is a copy into the bucket's static mask buffers (model/fast/buckets.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from model.saa.auto_layout import MAX_AUTO_IDS, AutoLayoutRule
from model.saa.context import IDContext
from model.saa.layout_maps import ActivationRecorder, RoutedIDContext

LAYOUTS = ("auto", "strips")  # what a caller may ask for; "boxes" is implied by giving boxes
DEFAULT_SWITCH_STEP = 2
DEFAULT_MAP_LEVEL = 2  # 16 x 16 queries at SD1.5's 64 x 64 latents (the deepest level on smaller UNets)
# one colour per identity in the maps image (RGB)
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25))


@dataclasses.dataclass(frozen=True)
class AutoLayoutParams:
    """``switch_step``: steps observed before routing starts (clamped to the step count - 1);
    ``map_level``: UNet level whose query grid the maps are read at; ``rule``: maps -> boxes."""

    switch_step: int = DEFAULT_SWITCH_STEP
    map_level: int = DEFAULT_MAP_LEVEL
    rule: AutoLayoutRule = AutoLayoutRule()

    @classmethod
    def from_settings(cls, settings: Any) -> "AutoLayoutParams":
        """From ``model.saa.auto`` (model.config.AutoLayoutSettings)."""
        return cls(switch_step=settings.switch_step, map_level=settings.map_level,
                   rule=AutoLayoutRule(min_cells=settings.min_cells))


def resolve_layout(per_sample: Sequence[Sequence[Any]], layout: str | None,
                   error: type[ValueError] = ValueError) -> str:
    """The layout one pipeline call uses: "boxes", "strips" or "auto" (``error``, a ValueError, says why not).

    ``per_sample``: per image, the identities (anything with a ``bbox``). Default (None): boxes
    when any identity gives one, auto for 2..MAX_AUTO_IDS identities without boxes, else strips
    (one identity, or more than the rule handles). Every image of one call uses one layout.
    """
    if layout is not None and layout not in LAYOUTS:
        raise error(f"layout must be one of {', '.join(LAYOUTS)} (or left out), got {layout!r}")
    n = len(per_sample[0]) if per_sample else 0
    boxed = [(j, i) for j, ids in enumerate(per_sample) for i, ident in enumerate(ids) if ident.bbox is not None]
    if boxed:
        if layout is not None:
            j, i = boxed[0]
            where = f"identity {i}" + (f" of image {j}" if len(per_sample) > 1 else "")
            raise error(f"layout {layout!r} places the identities itself, but {where} gives a bbox; "
                             "give boxes or a layout, not both")
        return "boxes"
    if layout == "auto" and n > MAX_AUTO_IDS:
        raise error(f"layout 'auto' handles at most {MAX_AUTO_IDS} identities, got {n}; give boxes or "
                         "use layout 'strips'")
    if layout is None:
        return "auto" if 2 <= n <= MAX_AUTO_IDS else "strips"
    return "strips" if (layout == "auto" and n < 2) else layout


class AutoLayoutRun:
    """Per request: the observation context, the one switch to routed boxes, and what was used.

    ``ctx``: the sampler's IDContext for this call (batch = ``batch`` images, doubled with CFG,
    unconditional half first); its regions are replaced by full-image boxes for the observation.
    """

    def __init__(self, ctx: IDContext, *, batch: int, cfg: bool, num_steps: int, boost_steps: int, levels: int,
                 device: torch.device | str, params: Any = AutoLayoutParams()):
        # params: AutoLayoutParams, or the ``model.saa.auto`` settings it is made from
        params = params if isinstance(params, AutoLayoutParams) else AutoLayoutParams.from_settings(params)
        self.params = params
        self.batch, self.reps = batch, 2 if cfg else 1
        self.switch_step = max(0, min(params.switch_step, num_steps - 1))
        self.boost_steps = boost_steps
        h, w = (int(v) for v in ctx.latent_hw)
        for _ in range(min(params.map_level, levels - 1)):
            h, w = -(-h // 2), -(-w // 2)  # as IDContext.query_grid: each downsampling rounds up
        ctx.regions = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * ctx.num_ids)  # [N, 4]: no routing while observing
        self.recorder = ActivationRecorder(batch * self.reps, ctx.num_ids, ctx.num_tokens, (h, w), ctx.tau, device)
        ctx.recorder = self.recorder
        self.observe = ctx
        self.routed: RoutedIDContext | None = None
        self.boxes: Tensor | None = None  # [b, N, 4] normalised, on the device, after the switch

    def context_for_step(self, i: int) -> IDContext:
        if i < self.switch_step:
            self.observe.boost_active = False
            return self.observe
        if self.routed is None:
            self.routed = self._route()
        self.routed.boost_active = i < self.switch_step + self.boost_steps
        return self.routed

    def _route(self) -> RoutedIDContext:
        """Maps of the conditional half -> boxes (device) -> the routed context. No host sync."""
        self.observe.recorder = None
        maps = self.recorder.maps[(self.reps - 1) * self.batch:]  # [b, N, h, w]
        self.boxes = self.params.rule(maps)  # [b, N, 4]
        keep = {f.name: getattr(self.observe, f.name) for f in dataclasses.fields(IDContext)
                if f.init and f.name not in ("regions", "recorder", "boost_active")}
        return RoutedIDContext(**keep, device_regions=self.boxes.repeat(self.reps, 1, 1))

    # ------------------------------------------------------------------ what was used
    def region_lists(self) -> list[list[list[float]]]:
        """[b][N] boxes (y0, x0, y1, x1) as rounded floats (one device read, after the sampler)."""
        if self.boxes is None:
            raise RuntimeError("the auto layout has not switched yet (no denoising step ran)")
        return [[[round(float(v), 6) for v in box] for box in sample] for sample in self.boxes.cpu().tolist()]

    def results(self, results: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """Per-image identity results (dataclasses with a ``region``) with the regions actually used."""
        regions = self.region_lists()
        return [[dataclasses.replace(r, region=box) for r, box in zip(rs, boxes)]
                for rs, boxes in zip(results, regions)]

    def report(self, results: Sequence[Sequence[Any]]) -> tuple[list[list[Any]], dict[str, Any]]:
        """(results with the regions used, the output's layout fields): what the pipeline returns."""
        return self.results(results), {"layout": "auto", "layout_maps": self.maps()}

    def maps(self) -> Tensor:
        """[b, N, h, w] fp32 on the host: each identity's recorded map scaled to max 1."""
        maps = self.recorder.maps[(self.reps - 1) * self.batch:].float()
        return (maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).cpu()


def render_layout(maps: Tensor, boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> Image.Image:
    """One image's layout as a picture: identity i's map in colour i, its box outlined in colour i.

    maps [N, h, w] in [0, 1]; boxes [N] (y0, x0, y1, x1) normalised; size (width, height) px.
    """
    n = maps.shape[0]
    colours = torch.tensor([_PALETTE[i % len(_PALETTE)] for i in range(n)], dtype=torch.float32)  # [N, 3]
    rgb = torch.einsum("nhw,nc->hwc", maps.float().clamp(0, 1), colours).clamp(0, 255)  # [h, w, 3]
    img = Image.fromarray(rgb.round().to(torch.uint8).numpy()).resize(size, Image.NEAREST)
    draw = ImageDraw.Draw(img)
    width, height = size
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        draw.rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1],
                       outline=_PALETTE[i % len(_PALETTE)], width=max(1, min(size) // 64))
    return img


__all__ = ["AutoLayoutRun", "AutoLayoutParams", "resolve_layout", "render_layout", "LAYOUTS",
           "DEFAULT_MAP_LEVEL", "DEFAULT_SWITCH_STEP"]

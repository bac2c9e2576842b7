"""ReleaseKeypointEncoder: the research release's landmark CNN, ported so its weights load 1:1.

The release's keypoint encoder is a different network from ours (``model.imr.KeypointEncoder``):
18 Conv2d + BatchNorm2d + ReLU units, some residual, a 7x7 stem and a final 1x1 convolution to the
feature width, so no weight mapping can turn one into the other (docs/release.md). Its module
names (``blocks.{b}.{j}.conv_block.{0,1}``) are kept so a release state dict loads unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# Per block: units (in multiple, out multiple, kernel, stride, padding, residual), in units of
# ``channels`` (16 in the release); ``None`` as out multiple = the feature width.
_PLAN: tuple[tuple[tuple[int, int | None, int, int, int, bool], ...], ...] = (
    ((0, 1, 7, 1, 3, False),),
    ((1, 2, 3, 2, 1, False), (2, 2, 3, 1, 1, True), (2, 2, 3, 1, 1, True)),
    ((2, 4, 3, 2, 1, False), (4, 4, 3, 1, 1, True), (4, 4, 3, 1, 1, True), (4, 4, 3, 1, 1, True)),
    ((4, 8, 3, 2, 1, False), (8, 8, 3, 1, 1, True), (8, 8, 3, 1, 1, True)),
    ((8, 16, 3, 2, 1, False), (16, 16, 3, 1, 1, True), (16, 16, 3, 1, 1, True)),
    ((16, 32, 3, 2, 1, False), (32, 32, 3, 1, 1, True)),
    ((32, 32, 3, 1, 0, False), (32, None, 1, 1, 0, False)),
)
RELEASE_IMAGE_SIZE = 96


def release_keypoint_units(feature_dim: int, channels: int = 16) -> list[list[tuple[int, int, int, int, int, bool]]]:
    """The units of every block as (in, out, kernel, stride, padding, residual) channel counts."""
    return [[(1 if i == 0 else i * channels, feature_dim if o is None else o * channels, k, s, p, r)
             for i, o, k, s, p, r in block] for block in _PLAN]


class _Unit(nn.Module):
    """Conv -> BatchNorm (-> + input when residual) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, residual: bool):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_block(x)
        return F.relu(out + x if self.residual else out)


class ReleaseKeypointEncoder(nn.Module):
    """Rendered landmark image [B, 1, 96, 96] with values in [0, 1] -> feature [B, feature_dim] (non-negative).

    The release feeds ``Normalize(0.5, 0.5)`` output (values in [-1, 1]); this class applies that
    normalisation itself, so every caller keeps passing our {0, 1} dot images and the value range
    is a property of the weights, not of the pipeline. Only 96 px: the last convolution must see a
    3 x 3 map for the output to be one vector, as in the release. BatchNorm uses running statistics
    in eval mode (the release calls ``eval()`` on it).
    """

    def __init__(self, image_size: int = RELEASE_IMAGE_SIZE, feature_dim: int = 768, channels: int = 16):
        super().__init__()
        if image_size != RELEASE_IMAGE_SIZE:
            raise ValueError(f"ReleaseKeypointEncoder: the release's CNN needs {RELEASE_IMAGE_SIZE} px landmark "
                             f"images, got image_size={image_size} (set model.<profile>.imr.landmark_size: 96)")
        if feature_dim < 1 or channels < 1:
            raise ValueError(f"ReleaseKeypointEncoder: bad dims feature_dim={feature_dim} channels={channels}")
        self.image_size, self.feature_dim = image_size, feature_dim
        self.blocks = nn.ModuleList(nn.ModuleList(_Unit(*unit) for unit in block)
                                    for block in release_keypoint_units(feature_dim, channels))

    def forward(self, landmark_image: Tensor) -> Tensor:
        expected = (1, self.image_size, self.image_size)
        if landmark_image.ndim != 4 or tuple(landmark_image.shape[1:]) != expected:
            raise ValueError(f"ReleaseKeypointEncoder: expected [B, {', '.join(map(str, expected))}], "
                             f"got {list(landmark_image.shape)}")
        first = self.blocks[0][0].conv_block[0]
        x = landmark_image.to(first.weight.dtype) * 2.0 - 1.0  # Normalize(mean=0.5, std=0.5)
        for block in self.blocks:
            for unit in block:
                x = unit(x)
        return x.flatten(1)  # [B, feature_dim, 1, 1] -> [B, feature_dim]

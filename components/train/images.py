"""Shard pixels (uint8 HWC arrays) -> the float tensors that training and the frozen-feature cache feed the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def image_tensor(array: np.ndarray, size: int | None = None) -> "torch.Tensor":
    """uint8 [H, W, 3] (or [H, W]) -> float [C, size, size] in [0, 1]; resized (bicubic/bilinear) if needed."""
    import torch
    from PIL import Image

    if size is not None and (array.shape[0] != size or array.shape[1] != size):
        resample = Image.BICUBIC if array.ndim == 3 else Image.BILINEAR
        array = np.asarray(Image.fromarray(array).resize((size, size), resample))
    t = torch.from_numpy(np.array(array, copy=True)).float() / 255.0  # decoded PNGs are read-only
    return t.permute(2, 0, 1) if t.ndim == 3 else t[None]

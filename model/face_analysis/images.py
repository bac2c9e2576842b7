"""Image input for face analysis: decode files or bytes to RGB uint8 (load_image, pil_to_rgb) and check arrays.

Decoding failures become ``FaceAnalysisError`` with the decoder's reason; PIL is imported
inside the functions.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from model.face_analysis.face import FaceAnalysisError


def load_image(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a file path or encoded bytes to RGB uint8 [H, W, 3], honouring EXIF orientation.

    Phone photos store the camera's orientation in EXIF instead of rotating pixels; ignoring it
    would hand the detector a sideways face. Every decoding failure becomes FaceAnalysisError with
    the decoder's reason, so a bad upload is a clear 4xx/quarantine reason, never a traceback.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = f"<{len(source)} bytes>", io.BytesIO(bytes(source))
        if len(source) == 0:
            raise FaceAnalysisError(f"cannot read image {name}: empty data")
    else:
        name, fp = str(source), Path(source)
        if not fp.is_file():
            raise FaceAnalysisError(f"cannot read image {name}: no such file")
    try:
        with Image.open(fp) as im:
            im.load()  # decode now: truncated data fails here, inside the try
            rgb = pil_to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise FaceAnalysisError(f"cannot read image {name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise FaceAnalysisError(f"cannot read image {name}: too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FaceAnalysisError(f"cannot read image {name}: {exc}") from None
    return rgb  # [H, W, 3]


_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def pil_to_rgb(im) -> np.ndarray:
    """RGB uint8 [H, W, 3] of any PIL mode; shared by inference and ``dynamicid prepare``.

    PIL's own ``convert("RGB")`` gets two cases wrong for photos: it clips 16-bit grey to 255 (a
    white picture) and it drops alpha, exposing whatever colour the transparent pixels happen to
    store. Grey is scaled 65535 -> 255; transparency is composited over white.
    """
    from PIL import Image

    if im.mode in _WIDE_GREY_MODES:
        grey = np.asarray(im).astype(np.float64)  # [H, W], 0..65535
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)  # [H, W, 3]
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    """RGB uint8 [H, W, 3], C-contiguous (dlib and onnxruntime both need that)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = list(image.shape) if isinstance(image, np.ndarray) else type(image).__name__
        raise FaceAnalysisError(f"{what} must be an RGB array [H, W, 3], got {shape}")
    if image.dtype != np.uint8:
        raise FaceAnalysisError(f"{what} must be uint8, got {image.dtype}")
    if min(image.shape[:2]) < 8:
        raise FaceAnalysisError(f"{what} is too small to hold a face: {image.shape[1]}x{image.shape[0]}")
    return np.ascontiguousarray(image)

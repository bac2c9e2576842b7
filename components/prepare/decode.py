"""Decoding untrusted image bytes for ``dynamicid prepare``: content sniffing, header limits, then pixels.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from components.prepare.results import Reject

if TYPE_CHECKING:
    import numpy as np


# Formats prepare decodes, whatever the file's extension: the content is sniffed. Everything else
# PIL could open (GIF, TIFF, EPS -> Ghostscript, ...) is refused before any plugin decodes it.
# Phone JPEGs with a second picture (MPO) come through the JPEG opener.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP")
_MAGIC = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n")  # + RIFF....WEBP, checked below


def _is_allowed_magic(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb(im: "Any") -> "np.ndarray":
    """The conversion inference uses too, so training and serving see the same pixels."""
    from model.face_analysis.images import pil_to_rgb

    return pil_to_rgb(im)


def decode_image(data: bytes, max_pixels: int) -> "np.ndarray":
    """Bytes of an untrusted file -> RGB uint8 [H, W, 3], or Reject with the reason.

    Why this order: the cheap, allocation-free checks run on the header only (``Image.open`` is
    lazy), so a 20 kB PNG declaring 12000 x 12000 pixels is refused before a single row is
    inflated; only then are pixels decoded. EXIF orientation is applied as in
    ``model.face_analysis.images.load_image``.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Reject("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except UnidentifiedImageError:
        if _is_allowed_magic(data):
            raise Reject("unreadable", "corrupt or truncated header") from None
        raise Reject("not_an_image", f"content is not JPEG, PNG or WebP (starts with {data[:16]!r})") from None
    except Image.DecompressionBombError as err:  # PIL's own header check, above 2 x Image.MAX_IMAGE_PIXELS
        raise Reject("too_many_pixels", f"header check: {err}; not decoded") from None
    except Exception as err:  # noqa: BLE001 - a malformed header is the file's problem, never the run's
        raise Reject("unreadable", f"header: {type(err).__name__}: {err}") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise Reject("too_many_pixels", f"header check: {im.format} declares {w}x{h} = {w * h} pixels "
                                            f"> prepare.max_pixels {max_pixels}; not decoded")
        if w < 1 or h < 1:
            raise Reject("unreadable", f"header check: {im.format} declares {w}x{h} pixels")
        try:
            im.load()  # truncated data fails here
            return _to_rgb(ImageOps.exif_transpose(im))
        except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, struct.error ... from odd files
            raise Reject("unreadable", f"{type(err).__name__}: {err}") from None

"""Request images: base64 text -> RGB array, with every limit checked before pixels are decoded.

Order matters for safety: the encoded length bounds the decoded bytes before base64 decoding, and
the pixel count comes from the image header (PIL reads only the header on ``open``) before the
full decode, so a small file that claims 100k x 100k pixels (a decompression bomb) costs nothing.
A string is only ever base64-decoded: paths and URLs (file://, http://, s3://) are never opened.
A URL is refused by its scheme before decoding; a path (``/etc/passwd``, ``../x.png``, ``~/x``,
``\\\\host\\x``) is recognised when it is not valid base64 (a JPEG's base64 starts with ``/9j/``, so a
leading ``/`` alone proves nothing) and refused with the same reason, ``uri_not_allowed``, so the
caller learns why; either way it is only ever base64-decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Sequence

import numpy as np

from serving.errors import ServingError, bad_request, too_large

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}:")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")
_WHITESPACE = re.compile(r"\s")
_PATH = re.compile(r"^(?:\.{0,2}[/\\]|~[/\\]?|[A-Za-z]:[/\\])|(?:^|[/\\])\.\.(?:[/\\]|$)")
_MAX_PATH_CHARS = 4096
_URI_MESSAGE = "looks like a URL or path; the server never opens those: send the image bytes, base64-encoded"


def looks_like_path(text: str) -> bool:
    """A local path (absolute, relative with ./ ../, home, Windows drive, any ``..`` segment)."""
    return len(text) <= _MAX_PATH_CHARS and bool(_PATH.search(text))


def encoded_limit(max_bytes: int) -> int:
    """Longest base64 text (padded, no whitespace) that can decode to at most ``max_bytes`` bytes."""
    return 4 * -(-max_bytes // 3)


def b64decode_bounded(text: str, field: str, max_bytes: int) -> bytes:
    """Base64 text (optionally a ``data:image/...;base64,`` URL) -> bytes, rejecting URLs/paths,
    oversized payloads (before decoding) and anything that is not strict base64."""
    if not isinstance(text, str) or not text:
        raise bad_request("invalid_base64", "expected a non-empty base64 string", field)
    if text.startswith("data:"):
        m = _DATA_URL.match(text)
        if not m:
            raise bad_request("invalid_base64", "a data URL must look like data:image/<type>;base64,<data>", field)
        text = text[m.end():]
    elif _SCHEME.match(text):
        raise bad_request("uri_not_allowed", _URI_MESSAGE, field)
    if _WHITESPACE.search(text):  # line-wrapped base64 (e.g. from `base64` without -w0)
        text = "".join(text.split())
    padding = len(text) - len(text.rstrip("="))
    approx = len(text) * 3 // 4 - padding
    if len(text) > encoded_limit(max_bytes):
        raise too_large("image_too_large", f"about {approx} bytes after decoding, the limit is {max_bytes} "
                        "(serve.max_image_bytes)", field)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request("invalid_base64", f"not valid base64 ({err})", field) from None
    if len(raw) > max_bytes:
        raise too_large("image_too_large", f"{len(raw)} bytes, the limit is {max_bytes} (serve.max_image_bytes)", field)
    return raw


def check_header(raw: bytes, field: str, max_pixels: int, formats: Sequence[str]) -> tuple[int, int]:
    """(width, height) from the header alone; rejects unknown formats and too many pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:  # lazy: parses the header, decodes no pixels
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        raise bad_request("not_an_image", "not a recognised image (send PNG, JPEG or WebP bytes)", field) from None
    except Image.DecompressionBombError as err:  # PIL's own, far higher, limit fired first
        m = re.search(r"\((\d+) pixels\)", str(err))
        claimed = f"{m.group(1)} pixels" if m else "too many pixels"
        raise too_large("too_many_pixels", f"image header claims {claimed}, the limit is {max_pixels} "
                        "(serve.max_image_pixels)", field) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise bad_request("not_an_image", f"cannot read the image header ({err})", field) from None
    if fmt not in formats:
        raise bad_request("unsupported_format", f"{fmt} images are not accepted; use one of {', '.join(formats)}", field)
    if w * h > max_pixels:
        raise too_large("too_many_pixels", f"{w}x{h} = {w * h} pixels, the limit is {max_pixels} "
                        "(serve.max_image_pixels)", field)
    return w, h


def decode_image(text: str, field: str, max_bytes: int, max_pixels: int, formats: Sequence[str]) -> np.ndarray:
    """Base64 image -> RGB uint8 [H, W, 3] (EXIF orientation applied), or a ServingError naming ``field``."""
    from model.face_analysis.face import FaceAnalysisError
    from model.face_analysis.images import load_image

    try:
        raw = b64decode_bounded(text, field, max_bytes)
        check_header(raw, field, max_pixels, formats)
    except ServingError as err:
        if err.reason == "invalid_base64" and isinstance(text, str) and looks_like_path(text):
            raise bad_request("uri_not_allowed", _URI_MESSAGE, field) from None
        raise
    try:
        return load_image(raw)
    except FaceAnalysisError as err:
        raise bad_request("not_an_image", str(err).replace(f"<{len(raw)} bytes>", "image"), field) from None


# zlib level of the PNGs the server returns. PIL's default (6) took 51-73 ms per 512 px image on an H100 host, most
# of the served latency's gap over the in-process pipeline (docs/benchmarks.md, "Served speed over HTTP"); level 1
# is 4-5x faster on natural 512 px photos for 10-20 % more bytes, and the pixels are the same (PNG is lossless).
PNG_COMPRESS_LEVEL = 1


def encode_png(image) -> str:
    """PIL image -> base64 PNG text (what both protocols return), written at ``PNG_COMPRESS_LEVEL``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = ["decode_image", "looks_like_path", "b64decode_bounded", "check_header", "encode_png", "encoded_limit", "ServingError"]

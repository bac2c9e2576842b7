"""A fuzzed raw data set for ``dynamicid prepare``: good face photos in awkward encodings mixed with
hostile files (tests/test_reliability_data.py).

Every file is written here byte by byte where PIL would refuse or hide the point (PNG headers that
lie about their size, 16-bit PNGs, GIF headers), so the test does not depend on what an encoder
chooses. ``FuzzSet`` says what prepare must do with each path, as prepare reports the path.

Good files are all the same real face (insightface's Tom Hanks photo) in different encodings; each
carries a distinct PNG text chunk / JPEG quality so that no two are byte duplicates.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

MAGENTA = (255, 0, 255)  # colour stored under transparent pixels: must never reach the prepared image


@dataclass
class FuzzSet:
    root: Path
    good: dict[str, np.ndarray] = field(default_factory=dict)  # path -> expected RGB [H, W, 3] after decoding
    tolerance: dict[str, float] = field(default_factory=dict)  # path -> max mean |decoded - expected| (lossy codecs)
    bad: dict[str, str] = field(default_factory=dict)  # path -> reject reason
    kind: dict[str, str] = field(default_factory=dict)  # path -> what the file is (for the docs table)
    outside: list[Path] = field(default_factory=list)  # files outside the root that links point to

    def add_good(self, rel: str, expected: np.ndarray, kind: str, tol: float = 0.0) -> None:
        self.good[rel], self.tolerance[rel], self.kind[rel] = expected, tol, kind

    def add_bad(self, rel: str, reason: str, kind: str) -> None:
        self.bad[rel], self.kind[rel] = reason, kind


# --------------------------------------------------------------------------------------------
# Encoders


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, rows, level: int = 9) -> bytes:
    """A PNG whose IHDR says width x height; ``rows`` yields each scanline's bytes (no filter byte).
    Rows are compressed as they come, so a bomb never exists uncompressed here either."""
    comp = zlib.compressobj(level)
    idat = b"".join(comp.compress(b"\x00" + row) for row in rows) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png16(array: np.ndarray) -> bytes:
    """16-bit PNG of a uint16 [H, W] (grey) or [H, W, 3] (RGB) array."""
    colour = 0 if array.ndim == 2 else 2
    big = array.astype(">u2")
    return png_from_rows(array.shape[1], array.shape[0], 16, colour, (big[y].tobytes() for y in range(big.shape[0])))


def png(image: Image.Image, variant: str, **kw) -> bytes:
    info = PngInfo()
    info.add_text("variant", variant)  # distinct bytes, same pixels
    buf = io.BytesIO()
    image.save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF0 frame header claiming another size (the scan data stays small)."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def gif_header(width: int, height: int) -> bytes:
    """A GIF89a whose screen and image descriptor claim width x height, with a token LZW stream."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + image + b"\x02\x02\x4c\x01\x00\x3b"


# --------------------------------------------------------------------------------------------
# The set


def _framed(face: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB canvas with the face in the middle and magenta around it, alpha: 255 on the face, 0 around)."""
    h, w = face.shape[:2]
    rgb = np.empty((h + 2 * pad, w + 2 * pad, 3), np.uint8)
    rgb[:] = MAGENTA
    rgb[pad:pad + h, pad:pad + w] = face
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[pad:pad + h, pad:pad + w] = 255
    return rgb, alpha


def _white_outside(face_rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(alpha[:, :, None] == 255, face_rgb, np.uint8(255))


def build_fuzz_set(root: Path, face_photo: Path, outside_dir: Path) -> FuzzSet:
    """Write the fuzzed set below ``root`` (identity folders ``hanks/`` and ``bad/``, plus a
    non-UTF-8 folder); links point into ``outside_dir`` and to /etc/passwd."""
    fz = FuzzSet(root)
    good, bad = root / "hanks", root / "bad"
    for d in (good, bad, root / ".pool", outside_dir):
        d.mkdir(parents=True, exist_ok=True)
    with Image.open(face_photo) as im:
        face_im = im.convert("RGB")
    face = np.asarray(face_im)  # [112, 112, 3]
    grey = np.asarray(face_im.convert("L"))  # [112, 112]

    def put(rel: str, data: bytes) -> Path:
        (root / rel).write_bytes(data)
        return root / rel

    # Good: ordinary and awkward encodings of one face.
    put("hanks/orig.png", png(face_im, "orig"))
    fz.add_good("hanks/orig.png", face, "RGB PNG")
    put("hanks/as_jpeg.jpg", jpeg(face_im, 95))
    fz.add_good("hanks/as_jpeg.jpg", face, "baseline JPEG", tol=4.0)
    put("hanks/png_named.jpg", png(face_im, "png named .jpg"))
    fz.add_good("hanks/png_named.jpg", face, "PNG content named .jpg (content sniffed)")
    put("hanks/jpeg_named.png", jpeg(face_im, 90))
    fz.add_good("hanks/jpeg_named.png", face, "JPEG content named .png (content sniffed)", tol=4.0)
    put("hanks/cmyk.jpg", jpeg(face_im.convert("CMYK"), 94))
    fz.add_good("hanks/cmyk.jpg", face, "CMYK JPEG", tol=4.0)
    put("hanks/grey16.png", png16(grey.astype(np.uint16) * 257))
    fz.add_good("hanks/grey16.png", np.repeat(grey[:, :, None], 3, axis=2), "16-bit greyscale PNG")
    put("hanks/rgb16.png", png16(face.astype(np.uint16) * 257))
    fz.add_good("hanks/rgb16.png", face, "16-bit RGB PNG")
    rgb, alpha = _framed(face, 24)
    put("hanks/rgba.png", png(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "rgba"))
    fz.add_good("hanks/rgba.png", _white_outside(rgb, alpha), "RGBA PNG, transparent magenta frame")
    g_frame, _ = _framed(np.repeat(grey[:, :, None], 3, axis=2), 24)
    g_frame = g_frame[:, :, 1].copy()  # magenta's green is 0: black under the transparent frame
    put("hanks/la.png", png(Image.fromarray(np.dstack([g_frame, alpha]), "LA"), "la"))
    fz.add_good("hanks/la.png", _white_outside(np.repeat(g_frame[:, :, None], 3, axis=2), alpha),
                "LA (grey + alpha) PNG, transparent frame")
    quant = face_im.quantize(colors=200)  # indices < 200; 255 = transparent magenta
    palette = np.array(quant.getpalette()[:600] + [0] * (765 - 600) + list(MAGENTA), np.uint8).reshape(256, 3)
    idx = np.full(alpha.shape, 255, np.uint8)
    idx[24:136, 24:136] = np.asarray(quant)
    p_im = Image.fromarray(idx, "P")
    p_im.putpalette(palette.reshape(-1).tolist())
    put("hanks/p_trns.png", png(p_im, "palette", transparency=255))
    fz.add_good("hanks/p_trns.png", _white_outside(palette[idx], alpha), "palette PNG with a transparent index (tRNS)")
    put("hanks/ünï cödé 😀.png", png(face_im, "unicode"))
    fz.add_good("hanks/ünï cödé 😀.png", face, "valid UTF-8 name with spaces and an emoji")
    (root / ".pool" / "face.png").write_bytes(png(face_im, "pool"))  # hidden folder: not listed itself
    (good / "link_in.png").symlink_to(Path("..") / ".pool" / "face.png")
    fz.add_good("hanks/link_in.png", face, "symlink to a file inside the root (followed)")
    locked = put("hanks/locked.png", png(face_im, "locked"))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root (CAP_DAC_OVERRIDE) reads mode-000 files: then it is a good file
        fz.add_good("hanks/locked.png", face, "chmod 000 file, readable by this user (root)")
    else:
        fz.add_bad("hanks/locked.png", "read_error", "chmod 000 file (PermissionError)")
    (good / "zz_dup_link.png").symlink_to("orig.png")
    fz.add_bad("hanks/zz_dup_link.png", "duplicate", "symlink inside the root to another listed image")

    # Bad: truncated, empty, forged sizes, bombs, wrong content, odd file types, links out.
    full = jpeg(face_im, 92)
    for name, cut in (("2", 2), ("100", 100), ("half", len(full) // 2), ("tail64", len(full) - 64)):
        put(f"bad/trunc_{name}.jpg", full[:cut])
        fz.add_bad(f"bad/trunc_{name}.jpg", "unreadable", f"JPEG truncated to {cut} of {len(full)} bytes")
    put("bad/corrupt.png", b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(600))
    fz.add_bad("bad/corrupt.png", "unreadable", "PNG signature followed by random bytes")
    for name in ("zero.jpg", "zero.png"):
        put(f"bad/{name}", b"")
        fz.add_bad(f"bad/{name}", "empty_file", "zero-byte file")
    put("bad/huge_dims.png", png_from_rows(100_000, 100_000, 8, 2, iter([b"\x00" * 30])))
    fz.add_bad("bad/huge_dims.png", "too_many_pixels", "PNG header claiming 100000x100000 (PIL's own header check)")
    put("bad/huge_dims.jpg", jpeg_with_size(full, 9000, 9000))
    fz.add_bad("bad/huge_dims.jpg", "too_many_pixels", "JPEG SOF claiming 9000x9000 = 81 MP (prepare.max_pixels)")
    put("bad/bomb.png", png_from_rows(12_000, 12_000, 1, 0, (bytes(1500) for _ in range(12_000))))
    fz.add_bad("bad/bomb.png", "too_many_pixels", "decompression bomb: 1-bit PNG 12000x12000 (144 MP) in ~20 kB")
    put("bad/bomb_gif.png", gif_header(12_000, 12_000))
    fz.add_bad("bad/bomb_gif.png", "not_an_image", "GIF header claiming 12000x12000, named .png")
    put("bad/text.jpg", b"just some text, not a picture\n")
    fz.add_bad("bad/text.jpg", "not_an_image", "text file named .jpg")
    put("bad/eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    fz.add_bad("bad/eps.jpg", "not_an_image", "EPS (PostScript) named .jpg: never handed to Ghostscript")
    (bad / "dir.jpg").mkdir()
    fz.add_bad("bad/dir.jpg", "not_a_file", "directory named dir.jpg")
    os.mkfifo(bad / "fifo.jpg")
    fz.add_bad("bad/fifo.jpg", "not_a_file", "FIFO named fifo.jpg (reading it would block)")
    outside_face = outside_dir / "face.png"
    outside_face.write_bytes(png(face_im, "outside"))
    fz.outside.append(outside_face)
    (bad / "outside.png").symlink_to(outside_face)
    fz.add_bad("bad/outside.png", "unsafe_path", "symlink to a good face outside the root")
    (bad / "passwd.jpg").symlink_to("/etc/passwd")
    fz.add_bad("bad/passwd.jpg", "unsafe_path", "symlink to /etc/passwd")
    (bad / "dangling.png").symlink_to("missing.png")
    fz.add_bad("bad/dangling.png", "read_error", "dangling symlink inside the root")
    raw_root = os.fsencode(str(root))
    with open(raw_root + b"/bad/\xff\xfe.jpg", "wb") as fh:  # not UTF-8: a good face under a bad name
        fh.write(jpeg(face_im, 91))
    fz.add_bad("bad/\\xff\\xfe.jpg", "bad_filename", "file name bytes b'\\xff\\xfe.jpg' (not UTF-8)")
    os.mkdir(raw_root + b"/\xc3(")
    with open(raw_root + b"/\xc3(/face.png", "wb") as fh:
        fh.write(png(face_im, "bad folder"))
    fz.add_bad("\\xc3(/face.png", "bad_filename", "identity folder name bytes b'\\xc3(' (not UTF-8)")
    return fz


# Annotation records whose "image" leaves the root; the last one, normalised naively, would hit a
# real file (hanks/orig.png) with keypoints that are garbage.
ESCAPING_ANNOTATIONS = ("../../etc/passwd", "/etc/passwd", "../outside/face.png", "/hanks/orig.png")


def escaping_annotations() -> str:
    kps = [[1.0, 1.0], [2.0, 1.0], [1.5, 2.0], [1.0, 3.0], [2.0, 3.0]]
    return "".join(json.dumps({"image": p, "kps": kps, "box": [0, 0, 3, 3]}) + "\n" for p in ESCAPING_ANNOTATIONS)

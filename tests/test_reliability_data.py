"""Hostile input through ``dynamicid prepare`` (issue 9, data): a fuzzed raw set (tests/fuzz_data.py)
of truncated JPEGs, empty files, forged sizes, decompression bombs, wrong extensions, CMYK / 16-bit /
alpha images, links out of the root, FIFOs, directories and non-UTF-8 names named like images, a
mode-000 file, and annotation records pointing out of the root. Every bad file must be quarantined
with its own reason, every good file prepared (with sane pixels), the run must exit 0 and a rerun
must change nothing. Real dlib models, real files, the real CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.cli import main as cli_main
from components.core.config import params_from_dict
from components.core.shards import PreparedData
from components.prepare.decode import decode_image
from components.prepare.stage import prepare
from tests.fuzz_data import (
    ESCAPING_ANNOTATIONS,
    MAGENTA,
    build_fuzz_set,
    escaping_annotations,
)

REPO = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 120  # a blocking read (FIFO) must fail the test, not hang the suite
DETAIL = {  # reason -> words its detail must contain (what makes the reason specific)
    "unsafe_path": "points outside the input root", "bad_filename": "not valid UTF-8",
    "not_a_file": "named like an image",
    "too_many_pixels": "header check", "not_an_image": "not JPEG, PNG or WebP", "empty_file": "0 bytes",
    "duplicate": "same bytes as hanks/orig.png",
}


def _alarm(signum, frame):
    raise TimeoutError(f"prepare did not finish within {RUN_LIMIT_S} s (a read blocked?)")


def _cli_prepare(raw: Path, out: Path, cache: Path) -> int:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(RUN_LIMIT_S)
    try:
        sets = [f"storage.cache_dir={cache}", "prepare.workers=1", "prepare.detection_check=0"]
        return cli_main([a for kv in sets for a in ("-S", kv)] + ["prepare", "--input", str(raw), "--output", str(out),
                                                                  "--no-progress"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, single_face_photo):
    base = tmp_path_factory.mktemp("fuzz")
    fz = build_fuzz_set(base / "raw", single_face_photo, base / "outside")
    (fz.root / "annotations.jsonl").write_text(escaping_annotations())
    code = _cli_prepare(fz.root, base / "out", base / "cache")
    yield fz, base, code
    (fz.root / "hanks" / "locked.png").chmod(0o644)  # let tmp_path cleanup remove it


def _rejects(out: Path) -> list[dict]:
    raw = (out / "rejects.jsonl").read_bytes()
    text = raw.decode("utf-8")  # strict: the quarantine list is valid UTF-8 ...
    rows = [json.loads(line) for line in text.splitlines()]
    for row in rows:  # ... and no field carries a lone surrogate from a non-UTF-8 name
        assert all(isinstance(v, str) and v.encode("utf-8") for v in row.values()), row
    return rows


def test_every_bad_file_quarantined_with_its_reason_every_good_file_prepared(fuzzed):
    fz, base, code = fuzzed
    out = base / "out"
    assert code == 0
    rows = _rejects(out)
    got = {r["image"]: r["reason"] for r in rows}
    assert got == fz.bad  # every bad file, each with the reason of its kind, and nothing else
    details = {r["image"]: r["detail"] for r in rows}
    for image, reason in fz.bad.items():
        if reason in DETAIL:
            assert DETAIL[reason] in details[image], (image, details[image])
    assert "not decoded" in details["bad/bomb.png"] and "12000x12000" in details["bad/bomb.png"]
    assert "9000x9000" in details["bad/huge_dims.jpg"] and "10000000000 pixels" in details["bad/huge_dims.png"]
    assert "FIFO" in details["bad/fifo.jpg"] and "directory" in details["bad/dir.jpg"]
    assert details["bad/passwd.jpg"].startswith("symlink to /etc/passwd")
    assert "b'bad/\\xff\\xfe.jpg'" in details["bad/\\xff\\xfe.jpg"]
    assert "truncated" in details["bad/trunc_half.jpg"] and "truncated" in details["bad/trunc_tail64.jpg"]
    data = PreparedData(out)
    assert sorted(r["image"] for r in data.index) == sorted(fz.good)
    report = json.loads((out / "data_report.json").read_text())
    assert (report["counts"]["accepted"], report["counts"]["rejected"]) == (len(fz.good), len(fz.bad))
    assert report["rejects"] == dict(sorted(Counter(fz.bad.values()).items()))
    # Annotation records naming ../ or absolute paths are refused as lines, never joined to a file:
    # "/hanks/orig.png" with garbage keypoints did not turn the real hanks/orig.png into a reject.
    ann = report["side_files"]["annotations.jsonl"]
    assert (ann["records"], ann["unsafe_paths"], ann["bad_lines"]) == (0, len(ESCAPING_ANNOTATIONS), 4)
    assert {s["image"] for s in data.index} >= {"hanks/orig.png"}
    assert len(fz.bad) >= 21 and len(fz.good) >= 12


def test_converted_pixels_are_sane(fuzzed):
    """CMYK, 16-bit and alpha images decode to the expected RGB (transparent -> white, 16 -> 8 bit by
    /257), the stored training pixels are those pixels resized, and every good copy still embeds
    as the same person as the plain PNG."""
    fz, base, _ = fuzzed
    data = PreparedData(base / "out")
    samples = {r["image"]: data.sample(i) for i, r in enumerate(data.index)}
    reference = samples["hanks/orig.png"].embedding
    for rel, expected in fz.good.items():
        decoded = decode_image((fz.root / rel).read_bytes(), 64_000_000)  # [H, W, 3]
        assert decoded.shape == expected.shape and decoded.dtype == np.uint8, rel
        err = np.abs(decoded.astype(np.int16) - expected).mean()
        assert err <= fz.tolerance[rel], (rel, err)
        assert not np.all(decoded == np.array(MAGENTA, np.uint8), axis=-1).any(), rel  # no colour under alpha
        side = expected.shape[0]  # every good image is square: the training image is all of it
        stored = samples[rel].pixels.astype(np.int16)
        resized = np.asarray(Image.fromarray(expected).resize((64, 64), Image.BICUBIC), np.int16)
        assert np.abs(stored - resized).mean() <= fz.tolerance[rel] + 0.5, (rel, side)
        dist = float(np.linalg.norm(samples[rel].embedding - reference))
        assert dist < 0.6, (rel, dist)  # dlib's same-person threshold
    rgba = decode_image((fz.root / "hanks/rgba.png").read_bytes(), 64_000_000)
    assert (rgba[:24] == 255).all() and (rgba[:, -24:] == 255).all()  # the transparent frame is white


def test_rerun_is_consistent(fuzzed, tmp_path):
    fz, base, _ = fuzzed
    out = base / "out"
    files = ("rejects.jsonl", "index.parquet", "manifest.json", "data_report.json")
    before = {f: (out / f).read_bytes() for f in files}
    params = params_from_dict({"storage": {"cache_dir": str(base / "cache")},
                               "prepare": {"workers": 1, "detection_check": 0}})
    again = prepare(fz.root, out, params, progress=False)
    assert (again["analysed"], again["up_to_date"], again["accepted"]) == (0, True, len(fz.good))
    assert {f: (out / f).read_bytes() for f in files} == before
    # A fresh output directory from the same input writes the same bytes.
    assert _cli_prepare(fz.root, tmp_path / "out2", base / "cache") == 0
    assert {f: (tmp_path / "out2" / f).read_bytes() for f in files} == before


CHILD = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
from components.core.config import params_from_dict
from components.prepare.settings import item_settings
from components.prepare.item import ItemProcessor
from components.prepare.results import WorkItem
from components.prepare.source import LocalSource
import PIL.Image, PIL.PngImagePlugin, PIL.JpegImagePlugin, PIL.WebPImagePlugin

root, work = Path(sys.argv[1]), Path(sys.argv[2])
params = params_from_dict({"storage": {"cache_dir": str(work)}})
proc = ItemProcessor(item_settings(params, work), LocalSource(root))
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
limit = vm + 96 * 2**20  # 96 MiB of address space above what is mapped now
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {}
try:
    np.ones(144 * 2**20, np.uint8)  # what decoding the 1-bit bomb to 8-bit grey alone would take
    out["control"] = "allocated"
except MemoryError:
    out["control"] = "MemoryError"
for rel in sys.argv[3:]:
    out[rel] = proc(WorkItem(rel, rel, (root / rel).stat().st_size, "fp", None, "", False))["meta"]
print(json.dumps(out))
"""


def test_bombs_are_refused_from_the_header_under_a_memory_limit(fuzzed, tmp_path):
    """The per-image code of prepare under RLIMIT_AS = current mappings + 96 MiB: decoding the
    144 MP bomb would need 144 MiB for grey plus 432 MiB for RGB, so a reject (not a MemoryError
    turned into analysis_failed / unreadable) proves nothing was decoded."""
    fz, _, _ = fuzzed
    bombs = ["bad/bomb.png", "bad/huge_dims.png", "bad/huge_dims.jpg"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(fz.root), str(tmp_path / "cache"), *bombs], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("control") == "MemoryError"  # the limit is tight enough to stop a decode
    for rel in bombs:
        assert (res[rel]["status"], res[rel]["reason"]) == ("reject", "too_many_pixels"), res[rel]
        assert res[rel]["detail"].startswith("header check") and "not decoded" in res[rel]["detail"]
    assert (fz.root / "bad/bomb.png").stat().st_size < 64_000  # small on disk, 144 MP declared


def test_side_files_and_annotation_paths_cannot_leave_the_root(tmp_path):
    from components.prepare.source import ANNOTATIONS, LocalSource, SourceIndex

    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"image": "a/x.png", "kps": [[0, 0]] * 5}) + "\n")
    root = tmp_path / "raw"
    root.mkdir()
    (root / ANNOTATIONS).symlink_to(secret)  # a side file linked out of the root is not read
    assert LocalSource(root).lines(ANNOTATIONS) is None
    (root / ANNOTATIONS).unlink()
    (root / ANNOTATIONS).write_text(escaping_annotations() + json.dumps({"image": "a/../b/x.png", "kps": []}) + "\n")
    src = LocalSource(root)
    index = SourceIndex(tmp_path / "index.sqlite")
    stats = index.sync_side_file(ANNOTATIONS, "fp", src.lines(ANNOTATIONS))
    assert (stats["records"], stats["unsafe_paths"]) == (1, len(ESCAPING_ANNOTATIONS))  # a/../b stays inside
    assert index.annotation("b/x.png") is not None
    assert all(index.annotation(p.lstrip("/")) is None for p in ESCAPING_ANNOTATIONS)
    index.close()

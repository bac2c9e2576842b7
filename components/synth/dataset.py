"""``dynamicid synth``: writing the synthetic face test-bed (layout, manifest, reruns) and the CLI hook.

A deterministic test-bed in the accepted input layout.

Why it exists: the embedded default (tiny profile, CPU, no network) must train and evaluate
DynamicID without downloading a face data set. The test-bed mimics what stage 2 needs
(VariFace / KDEF style: many images per person in varied motion) and what stage 1 needs
(one face per image with a caption), with exact annotations because every landmark comes
from the same 3-D geometry that is rendered.

Layout written under ``out``::

    id_0000/0000.png ... id_0047/0034.png   one folder per identity
    annotations.jsonl                       one JSON object per good image (schema below)
    captions.jsonl                          {"image", "caption"} per good image
    bad_samples/*.png                       deliberately bad files (see synth_manifest.json)
    synth_manifest.json                     params key, sha256 of every file, bad-sample list

Annotation schema (image path relative to ``out``)::

    {"image": "id_0003/0012.png", "identity": "id_0003",
     "box": [x0, y0, x1, y1], "kps": [[x, y] x 5], "landmarks": [[x, y] x 68],
     "landmark_format": "68", "pose": {"yaw", "pitch", "roll"}, "expression": "happy",
     "attributes": {...identity factors...}}

Conventions (documented here because every consumer depends on them):

* Pixel coordinates follow OpenCV / insightface / dlib: an integer coordinate is a pixel
  centre, the image spans [-0.5, size - 0.5).
* ``kps`` are in the ArcFace template order and "left"/"right" are as seen in the image:
  eye on the image left (the person's right eye), eye on the image right, nose tip, mouth
  corner on the image left, mouth corner on the image right.
* ``landmarks`` are iBUG-68 (0-16 jaw from image left to image right, 17-26 brows, 27-35
  nose, 36-47 eyes, 48-67 mouth). Jaw points 0-16 lie on the visible outline of the face,
  from eye level on the image left, under the chin, to eye level on the image right, as
  iBUG annotators place them.
* ``box`` is the tight box around the 68 landmarks and a mid-forehead point (hairline
  height), i.e. forehead-to-chin and cheek-to-cheek like a face detector's box.
* ``pose`` in degrees, head relative to the camera, applied as yaw, then pitch, then roll:
  yaw > 0: the person turns their head to THEIR left, so the nose moves to the image right;
  pitch > 0: the person looks up (the nose moves up in the image);
  roll > 0: the head tilts so that its top moves to the image right (clockwise as seen).
  Captions say "turned to their left/right" with the same meaning.

The package, lowest module first: ``identities`` (factors, seeded sampling), ``captions``,
``geometry`` (3-D heads, placement, exact annotations), ``textures`` and ``render`` (pixels),
``samples`` (one image: plan, pixels, PNG bytes), ``files`` (names, hashes, atomic writes),
``bad_samples``, ``face_checks`` (dlib's view of the result), and this module (writing + CLI).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.synth.bad_samples import BAD_KINDS, BAD_REASONS, _bad_sample_bytes
from components.synth.face_checks import measure_faces
from components.synth.files import (
    ANNOTATIONS,
    BAD_DIR,
    CAPTIONS,
    MANIFEST,
    _pool_size,
    image_path,
    read_manifest,
    sha256_bytes,
    sha256_file,
    write_if_changed,
)
from components.synth.render import render
from components.synth.samples import plan_sample, png_bytes

if TYPE_CHECKING:  # heavy imports stay inside functions (the CLI imports this module)
    from components.core.config import Params
    from components.core.config.data import SynthParams

log = logging.getLogger(__name__)

# Bump when the rendered bytes change: it is part of the manifest key, so a rerun with new
# code re-renders instead of trusting stale hashes.
RENDER_VERSION = "synth-1"


def _identity_job(seed: int, identity: int, images: int, size: int, ss: int, out_dir: str,
                  known: dict[str, str] | None) -> list[dict[str, Any]]:
    """Plan (and, unless already on disk with the known hash, render and write) one identity's images.

    Runs in a worker process; returns one entry per image: annotation record, caption,
    sha256 and whether the file was written.
    """
    out = Path(out_dir)
    entries = []
    for j in range(images):
        rel = image_path(identity, j)
        pl, record, text = plan_sample(seed, identity, j, size)
        digest = (known or {}).get(rel)
        wrote = False
        if digest is None or sha256_file(out / rel) != digest:
            data = png_bytes(render([pl], size, pl.motion.background, ss=ss))
            digest = sha256_bytes(data)
            wrote = write_if_changed(out / rel, data)
        entries.append({"image": rel, "record": {"image": rel, **record}, "caption": text, "sha256": digest,
                        "wrote": wrote})
    return entries


def manifest_key(params: "SynthParams") -> str:
    """Everything that decides the bytes of the test-bed (not the worker count)."""
    blob = json.dumps({"generator": RENDER_VERSION, "identities": params.identities,
                       "images_per_identity": params.images_per_identity, "size": params.size,
                       "seed": params.seed, "bad_samples": params.bad_samples,
                       "supersample": params.supersample}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


_OUR_NAMES = (ANNOTATIONS, CAPTIONS, MANIFEST, BAD_DIR)


def _foreign_entries(out_dir: Path) -> list[str]:
    """Top-level entries that this generator would never write (refuse to write over real data)."""
    import re

    if not out_dir.exists():
        return []
    return sorted(p.name for p in out_dir.iterdir()
                  if p.name not in _OUR_NAMES and not re.fullmatch(r"id_\d{4,}", p.name) and not p.name.startswith("."))


def _verify(out_dir: Path, files: dict[str, str]) -> bool:
    return all(sha256_file(out_dir / rel) == digest for rel, digest in files.items())


def synthesize(out_dir: Path, params: "SynthParams", *, progress: bool = True,
               check_faces: bool | None = None) -> dict[str, Any]:
    """Write (or bring up to date) the synthetic test-bed under ``out_dir``; returns a summary.

    A rerun with the same params finds every file with its recorded hash and does no work;
    files that are missing or changed are re-rendered (only those), files of a previous,
    larger run that the manifest lists are removed. ``check_faces`` (default
    ``params.check_faces``) also runs dlib's detector and recognizer on the result.
    """
    from components.core.errors import UserError

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"synth: {out_dir} exists and is not a directory")
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise UserError(f"synth: {out_dir} holds files the generator did not write ({', '.join(foreign[:5])}); "
                        "choose an empty directory or one written by `dynamicid synth`")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = manifest_key(params)
    old = read_manifest(out_dir)
    known = old["files"] if old and old.get("key") == key else None
    summary: dict[str, Any] = {
        "out": str(out_dir), "identities": params.identities,
        "images": params.identities * params.images_per_identity, "bad_samples": params.bad_samples,
        "size": params.size,
    }
    if known is not None and _verify(out_dir, known):
        summary.update(written=0, up_to_date=True, files=len(known))
        log.info("synth: %s is up to date (%d files)", out_dir, len(known))
    else:
        summary.update(_generate(out_dir, params, key, known, old, progress), up_to_date=False)
    if params.check_faces if check_faces is None else check_faces:
        summary["faces"] = measure_faces(out_dir, workers=params.workers, progress=progress)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _generate(out_dir: Path, params: "SynthParams", key: str, known: dict[str, str] | None,
              old: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    n_id, n_img = params.identities, params.images_per_identity
    workers = _pool_size(params.workers, n_id, n_id * n_img)
    results: dict[int, list[dict[str, Any]]] = {}
    args = [(params.seed, i, n_img, params.size, params.supersample, str(out_dir), known) for i in range(n_id)]
    with tqdm(total=n_id * n_img, unit="img", desc="synth", disable=not progress) as bar:
        if workers <= 1:
            for i, a in enumerate(args):
                results[i] = _identity_job(*a)
                bar.update(n_img)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: safe even when the caller holds threads (torch, dlib), unlike fork.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(_identity_job, *a): i for i, a in enumerate(args)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(n_img)
    entries = [e for i in range(n_id) for e in results[i]]
    files = {e["image"]: e["sha256"] for e in entries}
    written = sum(e["wrote"] for e in entries)

    bad = []
    first = (out_dir / entries[0]["image"]).read_bytes()
    for k, kind in enumerate(BAD_KINDS[: params.bad_samples]):
        rel = f"{BAD_DIR}/{k:02d}_{kind}.png"
        data = _bad_sample_bytes(kind, params.seed, k, params.size, params.supersample, first)
        written += write_if_changed(out_dir / rel, data)
        files[rel] = sha256_bytes(data)
        item = {"image": rel, "kind": kind, "reason": BAD_REASONS[kind]}
        if kind == "duplicate":
            item["duplicate_of"] = entries[0]["image"]
        bad.append(item)

    for name, rows in ((ANNOTATIONS, [e["record"] for e in entries]),
                       (CAPTIONS, [{"image": e["image"], "caption": e["caption"]} for e in entries])):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        written += write_if_changed(out_dir / name, data)
        files[name] = sha256_bytes(data)

    removed = _remove_stale(out_dir, set(files), old)
    manifest = {
        "generator": RENDER_VERSION, "key": key,
        "params": {"identities": n_id, "images_per_identity": n_img, "size": params.size, "seed": params.seed,
                   "bad_samples": params.bad_samples, "supersample": params.supersample},
        "counts": {"identities": n_id, "images": len(entries), "bad_samples": len(bad)},
        "conventions": {
            "pixels": "OpenCV: integer coordinates are pixel centres",
            "kps": "eye on the image left, eye on the image right, nose tip, mouth corner image left, image right",
            "landmarks": "iBUG-68",
            "pose": "degrees; yaw > 0: head turned to the person's left (nose to the image right); "
                    "pitch > 0: looking up; roll > 0: top of the head to the image right",
        },
        "bad_samples": bad,
        "files": files,
    }
    written += write_if_changed(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return {"written": written, "removed": removed, "files": len(files)}


def _remove_stale(out_dir: Path, keep: set[str], old: dict[str, Any] | None) -> int:
    """Delete files an earlier run listed that this run does not write (e.g. fewer identities)."""
    removed = 0
    for rel in (old or {}).get("files", {}):
        if rel not in keep and (out_dir / rel).is_file():
            (out_dir / rel).unlink()
            removed += 1
            parent = (out_dir / rel).parent
            if parent != out_dir and not any(parent.iterdir()):
                parent.rmdir()
    return removed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the deterministic synthetic face test-bed (embedded default data)",
        description=(
            "Render a synthetic face data set in the accepted input layout, so that the embedded\n"
            "profile trains and evaluates without downloading faces:\n"
            "  <out>/id_NNNN/NNNN.png    one folder per identity (KDEF-like: 5 expressions x 7 poses)\n"
            "  <out>/annotations.jsonl   box, 5 kps, iBUG-68 landmarks, pose, expression, identity factors\n"
            "  <out>/captions.jsonl      one caption per image\n"
            "  <out>/bad_samples/        deliberately bad files for prepare's quarantine (listed in\n"
            "                            synth_manifest.json, never in annotations.jsonl)\n"
            "Sizes come from the synth: section of params.yaml (identities, images_per_identity,\n"
            "size, seed, bad_samples, supersample, workers, check_faces)."
        ),
        epilog=(
            "Same params give byte-identical files; a rerun skips every file that already holds\n"
            "the right content (no work, mtimes unchanged).\n"
            "Pose convention: yaw > 0 = head turned to the person's left (nose to the image right),\n"
            "pitch > 0 = looking up, roll > 0 = top of the head to the image right.\n"
            "Example: dynamicid -S synth.identities=8 synth --out /tmp/faces --check-faces"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: data.raw from params)")
    p.add_argument("--check-faces", action="store_true", default=None,
                   help="after writing, measure dlib face detection (overall, per |yaw|) and recognition "
                   "(same vs different identity distance) and add them to the printed summary "
                   "(default: synth.check_faces)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, params: "Params") -> int:
    from components.core.errors import UserError

    out = args.out or params.data.raw
    if "://" in str(out):
        raise UserError(f"synth writes a local directory; got {out!r} (pass --out DIR, then push it with dvc)")
    summary = synthesize(Path(out), params.synth, progress=not args.no_progress, check_faces=args.check_faces)
    print(json.dumps(summary, indent=2))
    return 0

"""How real face tools see the test-bed (``--check-faces``): dlib detection rates and identity separation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.synth.files import ANNOTATIONS, _pool_size, read_manifest
from components.synth.identities import EXPRESSIONS

if TYPE_CHECKING:
    import numpy as np


def dlib_model_dir() -> Path:
    """Folder of face_recognition_models' .dat files, found without importing the package.

    (Its ``__init__`` imports pkg_resources, which recent setuptools no longer ships.)
    """
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        from components.core.errors import UserError

        raise UserError("synth --check-faces needs the face-recognition-models package (pip install "
                        "face-recognition-models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _faces_job(out_dir: str, records: list[dict[str, Any]], bad: list[dict[str, Any]]) -> dict[str, Any]:
    """dlib HOG detection (upsample 1) and 128-d descriptors for a chunk of images (worker process)."""
    import dlib
    import numpy as np
    from PIL import Image

    models = dlib_model_dir()
    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
    out: dict[str, Any] = {"hits": [], "descriptors": [], "bad": []}
    for rec in records:
        img = np.asarray(Image.open(Path(out_dir) / rec["image"]).convert("RGB"))
        x0, y0, x1, y1 = rec["box"]
        match = None
        for det in detector(img, 1):
            cx, cy = (det.left() + det.right()) / 2, (det.top() + det.bottom()) / 2
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                match = det
                break
        out["hits"].append(match is not None)
        if match is not None:
            desc = encoder.compute_face_descriptor(img, shape(img, match))
            out["descriptors"].append((rec["identity"], np.asarray(desc, dtype=np.float32)))
    for item in bad:
        try:
            img = np.asarray(Image.open(Path(out_dir) / item["image"]).convert("RGB"))
            faces = len(detector(img, 1))
        except Exception:  # noqa: BLE001 - unreadable is the point of some bad samples
            faces = None
        out["bad"].append({"image": item["image"], "kind": item["kind"], "faces": faces})
    return out


def measure_faces(out_dir: Path, *, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """How real face tools see the test-bed: dlib HOG detection rate (overall, per |yaw| and per
    expression) and whether dlib's 128-d recognizer separates identities (mean same- vs
    different-identity distance, 1-NN identification accuracy)."""
    import numpy as np
    from tqdm import tqdm

    out_dir = Path(out_dir)
    records = [json.loads(line) for line in (out_dir / ANNOTATIONS).read_text().splitlines() if line]
    bad = (read_manifest(out_dir) or {}).get("bad_samples", [])
    by_id: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_id.setdefault(rec["identity"], []).append(rec)
    chunks = list(by_id.values())
    n_workers = _pool_size(workers, len(chunks), len(records))
    parts: list[dict[str, Any]] = []
    with tqdm(total=len(records), unit="img", desc="faces", disable=not progress) as bar:
        jobs = [(str(out_dir), c, bad if i == 0 else []) for i, c in enumerate(chunks)]
        if n_workers <= 1:
            for job in jobs:
                parts.append(_faces_job(*job))
                bar.update(len(job[1]))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for job, part in zip(jobs, pool.map(_faces_job, *zip(*jobs))):
                    parts.append(part)
                    bar.update(len(job[1]))
    hits = np.array([h for p in parts for h in p["hits"]])
    ordered = [r for c in chunks for r in c]
    yaw = np.array([abs(r["pose"]["yaw"]) for r in ordered])
    pitch = np.array([r["pose"]["pitch"] for r in ordered])
    expr = np.array([r["expression"] for r in ordered])

    def rate(mask) -> dict[str, Any]:
        return {"images": int(mask.sum()), "rate": round(float(hits[mask].mean()), 4) if mask.any() else None}

    bins = {"|yaw|<10": yaw < 10, "10<=|yaw|<25": (yaw >= 10) & (yaw < 25), "|yaw|>=25": yaw >= 25}
    result: dict[str, Any] = {
        "detector": "dlib HOG frontal, upsample 1",
        "detection_rate": round(float(hits.mean()), 4) if hits.size else None,
        "frontal_detection_rate": rate((yaw < 10) & (np.abs(pitch) < 8))["rate"],
        "by_abs_yaw": {k: rate(m) for k, m in bins.items()},
        "by_pitch": {"looking down": rate(pitch <= -8), "level": rate(np.abs(pitch) < 8), "looking up": rate(pitch >= 8)},
        "by_expression": {e: rate(expr == e) for e in EXPRESSIONS},
        "bad_samples": [b for p in parts for b in p["bad"]],
    }
    result["recognition"] = _recognition_stats([d for p in parts for d in p["descriptors"]])
    return result


def _recognition_stats(descriptors: list[tuple[str, "np.ndarray"]]) -> dict[str, Any]:
    """Mean same- vs different-identity descriptor distance and leave-one-out 1-NN accuracy."""
    import numpy as np

    if len(descriptors) < 2:
        return {"faces": len(descriptors)}
    names = np.array([n for n, _ in descriptors])
    emb = np.stack([d for _, d in descriptors]).astype(np.float64)  # [N, 128]
    sq = np.square(emb).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * emb @ emb.T, 0.0))  # [N, N]
    same = names[:, None] == names[None, :]
    off = ~np.eye(len(names), dtype=bool)
    np.fill_diagonal(dist, np.inf)
    nn = names[dist.argmin(1)]
    return {
        "faces": len(names),
        "same_identity_mean": round(float(dist[same & off].mean()), 4) if (same & off).any() else None,
        "different_identity_mean": round(float(dist[~same].mean()), 4) if (~same).any() else None,
        "same_below_0.6": round(float((dist[same & off] < 0.6).mean()), 4) if (same & off).any() else None,
        "different_below_0.6": round(float((dist[~same] < 0.6).mean()), 4) if (~same).any() else None,
        "nn_identification_accuracy": round(float((nn == names).mean()), 4),
    }

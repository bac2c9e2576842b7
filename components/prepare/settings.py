"""Per-image analysis settings of ``dynamicid prepare``: ItemSettings from params, their params key, the work directory.

The params key identifies everything a result depends on besides the file and its annotation
(prepare version, face backend and its model files, sizes, limits): part of every result key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.core.config import Params
    from components.prepare.results import ItemSettings


def _backend_spec(face, backend: str) -> dict[str, Any]:
    """What identifies the face models (part of the result key): versions / pack files."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(*names: str) -> str | None:
        for n in names:
            try:
                return version(n)
            except PackageNotFoundError:
                continue
        return None

    if backend == "dlib":
        return {"detector": face.dlib.detector, "upsample": face.dlib.upsample,
                "dlib": ver("dlib-bin", "dlib"), "models": ver("face-recognition-models")}
    pack = (Path(face.insightface.root).expanduser() / "models" / face.insightface.name).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in pack.glob("*.onnx")) if pack.is_dir() else []
    return {"pack": str(pack), "det_size": face.insightface.det_size, "files": files,
            "insightface": ver("insightface")}


def item_settings(params: "Params", work_dir: Path) -> "ItemSettings":
    from components.prepare.results import PREPARE_VERSION, ItemSettings

    pp, active = params.prepare, params.model.active
    backend = params.face.resolved_backend(params.model.profile)
    spec = {
        "version": PREPARE_VERSION, "backend": backend, "models": _backend_spec(params.face, backend),
        "image_size": pp.image_size or active.resolution, "crop_size": pp.crop_size or active.face_crop_size,
        "landmark_size": active.imr.landmark_size, "min_face_size": params.face.min_face_size,
        "one_face": pp.one_face, "max_pixels": pp.max_pixels,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    face = params.face.model_copy(update={"backend": backend})
    return ItemSettings(
        face=face.model_dump(mode="json"), profile=params.model.profile, image_size=spec["image_size"],
        crop_size=spec["crop_size"], landmark_size=spec["landmark_size"], min_face_size=params.face.min_face_size,
        one_face=pp.one_face, max_bytes=int(pp.max_file_mb * 1024 * 1024),
        max_pixels=pp.max_pixels, work_dir=str(work_dir), params_key=key,
    )


def work_dir_for(params: "Params") -> Path:
    return Path(params.prepare.work_dir or Path(params.storage.cache_dir) / "prepare").expanduser()

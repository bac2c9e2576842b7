"""The ``release`` compatibility mode: inference conventions under which imported weights compute what the research
release computes (release-checkpoint.md, section 5, "Run-time conventions").

Each function here is called from one small hook in the pipeline (model/pipeline.py) and returns our own
convention unchanged in ``dynamicid`` mode, so the project's behaviour is untouched. What ``release`` changes:

* region boxes are truncated to query cells (``int(edge * grid)``), not tested at cell centres;
* gating off also turns off routing and the early-step boost (plain attention over all ID tokens);
* the CLIP image features come from the whole reference image (``CLIPImageProcessor``: shortest side to the
  encoder's size, bicubic, centre crop), and the unconditional branch uses zero *normalised* pixel values
  (a mean-colour image, not a black one);
* landmark images are drawn in the whole image's frame (scaled to 96 px, truncated, one pixel per point).
  Their value range ([-1, 1]) belongs to the release keypoint encoder, which normalises its input itself.

Not reproduced, because the release is broken there (docs/release.md): ArcFace is fed BGR, as insightface
expects (the release passes RGB); a query inside two boxes attends to every identity whose box holds it (the
release's softmax gives NaN there); a face is required (the release silently uses a zero embedding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.config import SAAParams

MODES = ("dynamicid", "release")


def resolve_mode(setting: str, checkpoint_mode: str) -> str:
    """``model.saa.compat`` (auto | dynamicid | release) and the checkpoint's recorded mode -> the mode used."""
    mode = checkpoint_mode if setting == "auto" else setting
    if mode not in MODES:
        raise ValueError(f"unknown compatibility mode {mode!r}; one of {MODES}")
    return mode


def mode_of(pipe: Any) -> str:
    """The mode a pipeline runs in: ``model.saa.compat``, where ``auto`` means what its checkpoint records."""
    return resolve_mode(pipe.model_params.saa.compat, getattr(pipe.dynamicid, "compat", "dynamicid"))


def context_options(mode: str, saa: SAAParams) -> dict[str, Any]:
    """Extra ``IDContext`` fields: release boxes are truncated to cells, and without gating there is no routing."""
    if mode != "release":
        return {}
    return {"box_rule": "truncate", "routing": bool(saa.gating)}


def boost_steps(mode: str, saa: SAAParams) -> int:
    """Denoising steps with the region boost: none in release mode with gating off (the release skips it)."""
    return 0 if mode == "release" and not saa.gating else int(saa.boost_steps)


def uncond_clip_image(mode: str, size: int, device: torch.device | str) -> Tensor:
    """[1, 3, S, S] in [0, 1]: the image whose CLIP features the unconditional tokens use.

    Ours is black. The release feeds zero ``pixel_values``, i.e. zero *after* CLIP normalisation: the
    image equal to the CLIP mean, which ``clip_image_features`` normalises to exactly zero.
    """
    if mode != "release":
        return torch.zeros(1, 3, size, size, device=device)
    from model.dynamicid import CLIP_MEAN

    return torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1).expand(1, 3, size, size).contiguous()


def clip_input(image: np.ndarray, size: int) -> Tensor:
    """RGB uint8 [H, W, 3] -> [3, S, S] in [0, 1] as ``CLIPImageProcessor()`` crops it: shortest side to ``size``
    (PIL bicubic, the long side truncated as transformers does), then a centre crop of ``size``."""
    from PIL import Image

    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size]
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255.0  # a writable copy


def landmark_image(landmarks: np.ndarray, image_hw: tuple[int, int], size: int) -> np.ndarray:
    """[L, 2] x, y pixels of a whole image -> [1, S, S] float32 {0, 1}: the release's rendering.

    The release resizes the whole image to 512 x 512, scales the points by S / 512 and truncates them, and
    sets one pixel per point that lies strictly inside the frame. Scaling straight from the image's own size
    is the same map.
    """
    h, w = (int(v) for v in image_hw[:2])
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    xs = np.trunc(pts[:, 0] * size / w).astype(np.int64)
    ys = np.trunc(pts[:, 1] * size / h).astype(np.int64)
    keep = (xs > 0) & (xs < size) & (ys > 0) & (ys < size)
    out = np.zeros((1, size, size), dtype=np.float32)
    out[0, ys[keep], xs[keep]] = 1.0
    return out


def analysis_inputs(mode: str, image: np.ndarray, landmarks: np.ndarray, crop: Tensor,
                    landmark_img: np.ndarray) -> tuple[Tensor, np.ndarray]:
    """The CLIP input [3, S, S] and source landmark image [1, L, L] of one analysed reference photo: ours (the
    face crop and its frame, as given) or, in release mode, the whole image's (``clip_input``, ``landmark_image``)."""
    if mode != "release":
        return crop, landmark_img
    return clip_input(image, int(crop.shape[-1])), landmark_image(landmarks, image.shape[:2], landmark_img.shape[-1])


def target_landmarks(pipe: Any, who: str, size: int, driving: np.ndarray | None, landmarks: Any,
                     frame: tuple[np.ndarray, tuple[int, int]] | None) -> np.ndarray | None:
    """The target landmark image of a driving photo (RGB uint8) or of ``landmarks`` coordinates (None: neither),
    in the pipeline's mode: ours (``model.motion_targets.landmark_target``: the face-crop frame) or the release's
    (the whole image's frame). ``frame`` is the reference face's (box, image size); ``landmarks`` are pixels of
    that image. Errors are ValueErrors naming ``who``."""
    from model.motion_targets import check_landmarks, driving_face, landmark_target

    if driving is None and landmarks is None:  # no target asked: no face analyzer (training hosts may lack dlib)
        return None
    analyzer, min_size = pipe.analyzer(), pipe.face_params.min_face_size
    if mode_of(pipe) != "release":
        return landmark_target(analyzer, who, size, driving_image=driving, landmarks=landmarks, frame=frame,
                               min_face_size=min_size)
    if driving is not None:
        face = driving_face(analyzer, driving, who, min_size)
        return landmark_image(face.landmarks, driving.shape[:2], size)
    if frame is None:
        raise ValueError(f"{who}: landmarks: they are pixels of the reference image, and this identity has none "
                         "(give a driving_image instead)")
    return landmark_image(check_landmarks(landmarks, int(analyzer.landmark_count), who), frame[1], size)

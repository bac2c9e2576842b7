"""Expression and head-pose readers for generated faces, independent of the rule that labels the training prompts.

For unannotated photos the training prompts' expression and pose words come from landmark geometry
(model.motion.estimate_expression and the landmark head pose); scoring edits with that same rule would reward a
model for moving landmarks the way the rule likes, not for showing the asked expression. The ``trained`` reader
learns from ground truth instead: a small CNN over face-crop pixels (no landmarks), fitted to the expression and
pose labels that prepare took from annotation records (docs/data.md), for the test bed the renderer's ground truth.
It learns from the prepared training split and never sees the evaluated people: their images are its held-out
validation, read on the detector's boxes as scoring reads generated faces, and reported with every evaluation. It
refuses prepared data whose labels came from the landmark rule (data_report.json provenance). ``landmarks`` keeps
the labelling rule, for comparison.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)

CROP = 48          # the reader's input side (faces in the tiny profile's 64 px images are ~35 px)
MARGIN = 0.1       # box growth of the crop: the face with little background
POSE_SCALE = 30.0  # degrees per unit of the pose head's output
VERSION = 2


@dataclass(frozen=True)
class MotionReading:
    """What a reader sees on one face (None: not read)."""

    expression: str | None
    yaw: float | None
    pitch: float | None


class LandmarkRule:
    """The labelling rule itself (not independent; kept to compare with the trained reader)."""

    name = "landmarks"
    meta: dict[str, Any] = {"kind": "landmarks"}

    def read(self, image: np.ndarray, face) -> MotionReading:
        from model.motion import estimate_expression

        yaw, pitch, _ = face.pose
        try:
            expression = estimate_expression(face.landmarks)
        except ValueError as err:
            log.debug("expression not measurable: %s", err)
            expression = None
        return MotionReading(expression, float(yaw), float(pitch))


class MotionNet(nn.Module):
    """[B, 3, 48, 48] face crops in [0, 1] -> expression logits [B, E] and (yaw, pitch) / POSE_SCALE [B, 2]."""

    def __init__(self, expressions: int, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width, 2 * width, 4 * width]
        for c_in, c_out in zip(channels[:-1], channels[1:]):  # 48 -> 24 -> 12 -> 6
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # [B, 4 * width]
        self.expression = nn.Linear(4 * width, expressions)
        self.pose = nn.Linear(4 * width, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.expression(h), self.pose(h)


def crop_input(image: np.ndarray, box: Sequence[float], jitter: np.ndarray | None = None) -> np.ndarray:
    """[3, CROP, CROP] float32 in [0, 1]: the square face crop around ``box`` (x0, y0, x1, y1), optionally shifted
    and scaled by ``jitter`` = (dx, dy, ds) in units of the box side (training augmentation)."""
    from PIL import Image

    from model.face_analysis.face import face_crop_box

    x0, y0, x1, y1 = (float(v) for v in box)
    if jitter is not None:
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2 + jitter[0] * side, (y0 + y1) / 2 + jitter[1] * side
        half = side * (1 + jitter[2]) / 2
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    left, top, right, bottom = face_crop_box(np.array([x0, y0, x1, y1]), image.shape[:2], margin=MARGIN)
    crop = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right, :3])).resize((CROP, CROP),
                                                                                            Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0


class TrainedReader:
    """The trained reader: expression = argmax class, pose = regression, on the detected face's crop."""

    def __init__(self, net: MotionNet, classes: list[str], meta: dict[str, Any]):
        self.net = net.eval()
        self.classes = classes
        self.meta = meta
        self.name = f"trained-{meta['fingerprint']}"

    @torch.no_grad()
    def predict(self, crops: np.ndarray) -> tuple[list[str], np.ndarray]:
        """[N, 3, CROP, CROP] -> (expressions, [N, 2] yaw and pitch in degrees)."""
        logits, pose = self.net(torch.from_numpy(np.ascontiguousarray(crops)))
        return [self.classes[i] for i in logits.argmax(-1).tolist()], (pose * POSE_SCALE).numpy()

    def read(self, image: np.ndarray, face) -> MotionReading:
        names, pose = self.predict(crop_input(image, face.bbox)[None])
        return MotionReading(names[0], float(pose[0, 0]), float(pose[0, 1]))


@dataclass
class Examples:
    """Labelled face images: RGB images, face boxes, ground-truth labels and identities."""

    images: list[np.ndarray]
    boxes: np.ndarray        # [N, 4] x0, y0, x1, y1 in pixels
    expressions: list[str]
    pose: np.ndarray         # [N, 2] yaw, pitch in degrees
    identities: list[str]


def ground_truth_labels(data) -> None:
    """Raise ValueError unless every prepared sample's expression and pose came from annotation records (for the
    test bed: the renderer's ground truth) rather than from the landmark rule (data_report.json provenance)."""
    path = data.root / "data_report.json"
    if not path.exists():
        raise ValueError(f"{path} missing: cannot tell where the expression and pose labels came from")
    prov = json.loads(path.read_text()).get("provenance") or {}
    for key in ("expression_source", "pose_source"):
        other = {k: v for k, v in (prov.get(key) or {}).items() if k != "annotation"}
        if not prov.get(key) or other:
            raise ValueError(f"{key} of the prepared data is {prov.get(key) or 'unknown'}: labels from the landmark "
                             f"rule would teach the reader the labelling rule, not the truth")


def prepared_examples(data, split: str) -> Examples:
    """Every sample of a prepared split: its training image, face box and labels."""
    images, boxes, expressions, pose, identities = [], [], [], [], []
    for identity, positions in sorted(data.identities(split).items()):
        for pos in positions:
            s = data.sample(pos)
            h, w = s.pixels.shape[:2]
            y0, x0, y1, x1 = (float(v) for v in s.face_box)
            images.append(s.pixels[..., :3])
            boxes.append([x0 * w, y0 * h, x1 * w, y1 * h])
            expressions.append(s.expression)
            pose.append([s.yaw, s.pitch])
            identities.append(identity)
    return Examples(images, np.array(boxes, dtype=np.float64).reshape(-1, 4), expressions,
                    np.array(pose, dtype=np.float32).reshape(-1, 2), identities)


def fit(examples: Examples, train: np.ndarray, *, epochs: int = 25, seed: int = 0,
        shuffle_labels: bool = False) -> tuple[MotionNet, list[str]]:
    """Fit a MotionNet on the ``train`` indices with box jitter and mirror augmentation (a mirrored face keeps its
    expression and negates its yaw). ``shuffle_labels`` breaks the image-label link (the control in the tests)."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(examples.expressions))
    labels = np.array([classes.index(e) for e in examples.expressions])[train]
    pose = examples.pose[train] / POSE_SCALE
    if shuffle_labels:
        perm = rng.permutation(len(train))
        labels, pose = labels[perm], pose[perm]
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = MotionNet(len(classes))
    torch.random.set_rng_state(torch_state)  # fitting must not shift the caller's random stream
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    batch = 64
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen).numpy()
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            jit = rng.uniform([-0.08, -0.08, -0.12], [0.08, 0.08, 0.12], size=(len(idx), 3))
            x = np.stack([crop_input(examples.images[train[i]], examples.boxes[train[i]], j) for i, j in zip(idx, jit)])
            y_pose = pose[idx].copy()
            flip = rng.random(len(idx)) < 0.5
            x[flip] = x[flip][..., ::-1]
            y_pose[flip, 0] *= -1
            x = x * rng.uniform(0.8, 1.2, size=(len(idx), 1, 1, 1)).astype(np.float32)
            logits, out = net(torch.from_numpy(np.ascontiguousarray(x.clip(0, 1))))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels[idx])) + \
                nn.functional.mse_loss(out, torch.from_numpy(y_pose))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), classes


def validate(reader: TrainedReader, examples: Examples, idx: np.ndarray, analyzer) -> dict[str, float]:
    """The reader on held-out images as scoring sees them: crops around the detector's box. Returns expression
    accuracy (chance = 1 / classes), mean |yaw| and |pitch| errors, and how many images the detector found."""
    from model.face_analysis.face import FaceAnalysisError, pick_face

    crops, keep = [], []
    for i in idx:
        try:
            face = pick_face(analyzer.detect(examples.images[i]), who="validation image")
        except FaceAnalysisError:
            continue
        crops.append(crop_input(examples.images[i], face.bbox))
        keep.append(i)
    if not keep:
        return {"images": float(len(idx)), "detected": 0.0}
    names, pose = reader.predict(np.stack(crops))
    truth = examples.pose[keep]
    return {"images": float(len(idx)), "detected": float(len(keep)),
            "expression_accuracy": float(np.mean([n == examples.expressions[i] for n, i in zip(names, keep)])),
            "expression_chance": 1.0 / len(reader.classes),
            "yaw_mae": float(np.mean(np.abs(pose[:, 0] - truth[:, 0]))),
            "pitch_mae": float(np.mean(np.abs(pose[:, 1] - truth[:, 1])))}


def trained_reader(data, heldout_split: str, analyzer, cache_dir: str | Path) -> TrainedReader:
    """Fit (once; cached under ``cache_dir`` by the prepared data's hash) and validate the trained reader.

    It learns from the prepared data's training split only; the held-out split, whose people the evaluation
    generates, is its validation (on the detector's boxes, as scoring reads generated faces)."""
    ground_truth_labels(data)
    fp = hashlib.sha256(json.dumps({"data": data.manifest.get("data_hash"), "heldout": heldout_split, "crop": CROP,
                                    "margin": MARGIN, "v": VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / f"motion-reader-{fp}"
    if (path / "meta.json").exists():
        meta = json.loads((path / "meta.json").read_text())
        net = MotionNet(len(meta["classes"]))
        net.load_state_dict(torch.load(path / "net.pt", weights_only=True))
        return TrainedReader(net, meta["classes"], meta)
    train = prepared_examples(data, "train")
    if not train.images:
        raise ValueError("the prepared data has no training split to learn from")
    log.info("fitting the motion reader on %d training images of %d people", len(train.images),
             len(set(train.identities)))
    net, classes = fit(train, np.arange(len(train.images)))
    meta = {"kind": "trained", "fingerprint": fp, "classes": classes, "data_hash": data.manifest.get("data_hash"),
            "train_images": len(train.images), "train_people": len(set(train.identities))}
    reader = TrainedReader(net, classes, meta)
    held = prepared_examples(data, heldout_split)
    meta["validation"] = {"split": heldout_split, "people": len(set(held.identities)),
                          **validate(reader, held, np.arange(len(held.images)), analyzer)} if held.images else {}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), tmp / "net.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process cached the same reader first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return reader


def motion_reader(params: "Params", data, analyzer):
    """The reader evaluate.motion_reader names: ``trained`` (fitted to the prepared data's ground-truth labels)
    or ``landmarks`` (the labelling rule, for comparison)."""
    from components.core.errors import UserError

    if params.evaluate.motion_reader == "landmarks":
        return LandmarkRule()
    try:
        return trained_reader(data, params.evaluate.split, analyzer, params.storage.cache_dir)
    except ValueError as err:
        raise UserError(f"evaluate.motion_reader trained: {err}; label the data with annotations.jsonl "
                        f"(docs/data.md) or set evaluate.motion_reader: landmarks (not independent)") from None

"""Evaluation metrics of DynamicID (method.md, "Evaluation") as plain functions over embeddings, faces
and images: similarity, face assignment, pose error, aggregation, CLIP-T. Only numpy is imported at module
level; scipy (Hungarian assignment) and torch/transformers (CLIP-T) are imported where they are used. The
names and directions of the metrics are in components.core.metric_catalogue.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from components.core.metric_catalogue import (
    EDIT,
    MULTI,
    SINGLE,
    EditTarget,
    MetricInfo,
    edit_target,
    higher_is_better,
    metric_info,
)

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- identity similarity


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (0 if either is the zero vector)."""
    return float(unit(a) @ unit(b))


def similarity_matrix(refs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[R, D] reference and [F, D] face embeddings -> [R, F] cosine similarities."""
    if len(refs) == 0 or len(faces) == 0:
        return np.zeros((len(refs), len(faces)))
    r = np.asarray(refs, dtype=np.float64).reshape(len(refs), -1)
    f = np.asarray(faces, dtype=np.float64).reshape(len(faces), -1)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return r @ f.T


@dataclass
class Assignment:
    """Best one-to-one matching of generated faces to references (Hungarian, max total similarity).

    face[i] is the face index matched to reference i (None: no face left for it, counted 0);
    similarity[i] is that pair's cosine (0 when unmatched); confused[i] says whether the matched
    face is more similar to some other reference than to its own (None when unmatched).
    """

    face: list[int | None]
    similarity: np.ndarray  # [R]
    confused: list[bool | None]

    @property
    def detected(self) -> list[bool]:
        return [f is not None for f in self.face]


def assign_faces(sim: np.ndarray) -> Assignment:
    """Hungarian assignment on an [R, F] similarity matrix (scipy.optimize.linear_sum_assignment).

    With fewer faces than references some references stay unmatched and score 0, so a model
    that drops a person is penalised exactly like a missed detection in the single-ID case.
    """
    from scipy.optimize import linear_sum_assignment

    sim = np.asarray(sim, dtype=np.float64)
    r = sim.shape[0]
    face: list[int | None] = [None] * r
    score = np.zeros(r)
    confused: list[bool | None] = [None] * r
    if sim.size:
        rows, cols = linear_sum_assignment(sim, maximize=True)
        for i, j in zip(rows.tolist(), cols.tolist()):
            face[i] = j
            score[i] = sim[i, j]
            others = np.delete(sim[:, j], i)
            confused[i] = bool(others.size and others.max() > sim[i, j])
    return Assignment(face=face, similarity=score, confused=confused)


# --------------------------------------------------------------------------- editability


def pose_error(measured: tuple[float, float], target: tuple[float, float]) -> float:
    """Mean absolute yaw/pitch error in degrees (the usual head-pose MAE, without roll: prompts never ask for roll)."""
    return float((abs(measured[0] - target[0]) + abs(measured[1] - target[1])) / 2.0)


# --------------------------------------------------------------------------- aggregation


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the measured values; None when nothing was measured (reported as "not measured")."""
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _put(out: dict[str, float | None], name: str, values: Sequence[float | None], people: Sequence[str]) -> None:
    """``name`` = mean over people of the measured values, with ``name_low`` / ``name_high``: the 95 % interval
    that resamples people (components.core.stats); no interval from fewer than two people."""
    from components.core.stats import clustered_interval

    kept = [(float(v), str(p)) for v, p in zip(values, people) if v is not None]
    if not kept:
        out[name] = None
        return
    iv = clustered_interval([v for v, _ in kept], [p for _, p in kept])
    out[name] = iv.mean
    if iv.people > 1:
        out[f"{name}_low"], out[f"{name}_high"] = iv.low, iv.high


def _paired(a_rows: Sequence[dict], b_rows: Sequence[dict], key, column: str) -> tuple[list, list]:
    """a - b of ``column`` per pair (the row of b with the same ``key``), with the person of each pair."""
    lookup = {key(r): r for r in b_rows}
    values, people = [], []
    for r in a_rows:
        other = lookup.get(key(r))
        if other is None or r[column] is None or other[column] is None:
            continue
        values.append(float(r[column]) - float(other[column]))
        people.append(r["identity"])
    return values, people


def _flag(v: bool | None) -> float | None:
    return None if v is None else float(bool(v))


def aggregate(rows: Sequence[dict]) -> dict[str, float | None]:
    """Per-sample rows (components.evaluate.scoring) -> flat ``kind.leaf`` metrics, each a mean over held-out
    people with its 95 % person-bootstrap interval as ``kind.leaf_low`` / ``kind.leaf_high``.

    A missed face is a row with detected = False and similarity 0; contrasts (identity lift, CLIP-T delta, edit
    gains) are paired per case (same person, prompt and seed) before they are averaged.
    """
    out: dict[str, float | None] = {}
    for kind in sorted({r["kind"] for r in rows}):
        krows = [r for r in rows if r["kind"] == kind]
        by = {v: [r for r in krows if r["variant"] == v] for v in {r["variant"] for r in krows}}
        main = by.get("edit" if kind in ("edit", "drive") else "id", [])
        who = [r["identity"] for r in main]
        out[f"{kind}.people"] = float(len(set(who)))
        _put(out, f"{kind}.id_similarity", [r["id_similarity"] for r in main], who)
        if kind in ("edit", "drive"):
            unedited = by.get("unedited", [])
            job = lambda r: r["job"]  # noqa: E731 - an edit and its unedited row share the job
            _put(out, f"{kind}.detection_rate", [float(r["detected"]) for r in main], who)
            _put(out, f"{kind}.pose_error", [r["pose_error"] for r in main], who)
            _put(out, f"{kind}.expression_agreement", [r["expression_agree"] for r in main], who)
            _put(out, f"{kind}.baseline_pose_error", [r["pose_error"] for r in unedited],
                 [r["identity"] for r in unedited])
            _put(out, f"{kind}.baseline_expression_agreement", [r["expression_agree"] for r in unedited],
                 [r["identity"] for r in unedited])
            _put(out, f"{kind}.pose_error_gain", *_paired(unedited, main, job, "pose_error"))
            _put(out, f"{kind}.expression_agreement_gain", *_paired(main, unedited, job, "expression_agree"))
            continue
        base = by.get("baseline", [])
        key = lambda r: (r["identity"], r["prompt"], r["seed"], r["group"])  # noqa: E731
        _put(out, f"{kind}.copy_paste", [r["copy_paste"] for r in main], who)
        _put(out, f"{kind}.clip_t", [r["clip_t"] for r in main], who)
        _put(out, f"{kind}.baseline_clip_t", [r["clip_t"] for r in base], [r["identity"] for r in base])
        _put(out, f"{kind}.clip_t_delta", *_paired(main, base, key, "clip_t"))
        if kind == "single":
            shuffled = by.get("shuffled", [])
            _put(out, "single.detection_rate", [float(r["detected"]) for r in main], who)
            _put(out, "single.identification_rate", [_flag(r["identified"]) for r in main], who)
            out["single.identification_chance"] = 1.0 / len(set(who)) if who else None
            _put(out, "single.baseline_id_similarity", [r["id_similarity"] for r in base],
                 [r["identity"] for r in base])
            _put(out, "single.shuffled_id_similarity", [r["id_similarity"] for r in shuffled],
                 [r["identity"] for r in shuffled])
            pair = lambda r: (r["identity"], r["prompt"], r["seed"])  # noqa: E731
            _put(out, "single.id_lift", *_paired(main, shuffled, pair, "id_similarity"))
        else:
            _put(out, f"{kind}.confusion_rate", [_flag(r["confused"]) for r in main], who)
            _put(out, f"{kind}.missing_rate", [0.0 if r["detected"] else 1.0 for r in main], who)
    return {k: (None if v is None else round(float(v), 6)) for k, v in out.items()}


def nest(flat: dict[str, float | None]) -> dict[str, dict[str, float]]:
    """``{"single.id_similarity": x}`` -> ``{"single": {"id_similarity": x}}``, dropping unmeasured (None)
    values: DVC shows nested JSON metrics as dotted names, and a null would read as a number."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if value is None:
            continue
        kind, leaf = key.split(".", 1)
        out.setdefault(kind, {})[leaf] = value
    return out


def flatten_metrics(nested: dict) -> dict[str, float]:
    """Inverse of nest (accepts already-flat dotted keys too)."""
    out: dict[str, float] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif node is not None:
            out[prefix] = float(node)

    walk("", nested)
    return out


# --------------------------------------------------------------------------- CLIP-T


def tiny_clip_fingerprint(tiny) -> str:
    """Hash of what defines the seeded tiny CLIP (so the cached copy is never stale)."""
    from model.backbone import TINY_WORDS

    blob = json.dumps({"seed": tiny.seed, "text": tiny.text.model_dump(), "vision": tiny.vision.model_dump(),
                       "resolution": tiny.resolution, "words": TINY_WORDS, "v": 1}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def tiny_clip_dir(tiny, cache_dir: str | Path) -> Path:
    """A small CLIPModel + processor built in code (seeded) and saved once under cache_dir.

    The tiny profile has no real CLIP; this one only exercises the CLIP-T code path (its
    scores are random-projection similarities, not text alignment). It reuses the tiny base's
    tokenizer so prompts tokenize the same way, and it is loaded back with the same
    ``from_pretrained(local_files_only=True)`` call that loads a real CLIP in the sd15 profile.
    """
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from model.backbone import TEXT_MAX_LENGTH, build_tiny_tokenizer

    path = Path(cache_dir).expanduser() / f"tiny-clip-{tiny_clip_fingerprint(tiny)}"
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tiny_tokenizer()
    size = tiny.resolution
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=tiny.text.hidden_size,
                         intermediate_size=tiny.text.intermediate_size, num_hidden_layers=tiny.text.num_hidden_layers,
                         num_attention_heads=tiny.text.num_attention_heads, max_position_embeddings=TEXT_MAX_LENGTH,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=tiny.vision.hidden_size, intermediate_size=tiny.vision.intermediate_size,
                           num_hidden_layers=tiny.vision.num_hidden_layers,
                           num_attention_heads=tiny.vision.num_attention_heads, image_size=size,
                           patch_size=tiny.vision.patch_size),
        projection_dim=tiny.text.hidden_size,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(tiny.seed)
    model = CLIPModel(cfg)
    torch.random.set_rng_state(gen_state)  # building the scorer must not shift the caller's random stream
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok,
    )
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


class ClipScorer:
    """CLIP-T: cosine of CLIP's projected image and text embeddings (the paper's text alignment).

    Reported as the raw cosine (not x100 and not CLIPScore's 2.5 * max(cos, 0)), so a number can be
    recomputed from any CLIP checkpoint with two lines.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from model.loading import quiet_hf_progress

        quiet_hf_progress()
        self.path = Path(path)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.path, local_files_only=True)

    def score(self, images: Sequence["Image.Image"], texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """[N] CLIP-T of images[i] with texts[i]."""
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            imgs = [im.convert("RGB") for im in images[start:start + batch_size]]
            txt = list(texts[start:start + batch_size])
            inputs = self.processor(text=txt, images=imgs, return_tensors="pt", padding=True, truncation=True)
            with torch.no_grad():
                res = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            # image_embeds / text_embeds are already L2-normalised projections: [b, P] each.
            out.append((res.image_embeds * res.text_embeds).sum(-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def clip_model_path(params) -> Path:
    """The CLIP used for CLIP-T: evaluate.clip_model (local dir or s3:// URI, downloaded once into the
    cache), or the seeded tiny CLIP in the tiny profile; the sd15 profile must name a real one."""
    ev = params.evaluate
    if ev.clip_model:
        from components.core.storage import resolve_local

        return Path(resolve_local(ev.clip_model, params.storage.cache_dir, params.storage))
    if params.model.profile != "tiny":
        raise ValueError(
            "evaluate.clip_model is null, but the sd15 profile needs a real CLIP for CLIP-T: set it to a "
            "CLIPModel directory in Hugging Face layout (local path or s3:// URI), e.g. openai/clip-vit-large-patch14"
        )
    return tiny_clip_dir(params.model.tiny, params.storage.cache_dir)


__all__ = [
    "MetricInfo", "SINGLE", "MULTI", "EDIT", "metric_info", "higher_is_better", "cosine", "similarity_matrix",
    "Assignment", "assign_faces", "pose_error", "EditTarget", "edit_target", "mean_or_none",
    "aggregate", "nest", "flatten_metrics", "ClipScorer", "clip_model_path", "tiny_clip_dir",
]

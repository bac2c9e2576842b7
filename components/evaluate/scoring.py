"""Scoring of the generated evaluation set: per-sample rows (SAMPLE_COLUMNS), from faces detected once per image.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from components.evaluate.evalset import EvalSet, Job
from components.evaluate.generation import Generated

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)


SAMPLE_COLUMNS = (
    "kind", "variant", "job", "group", "identity", "person", "prompt", "seed", "edit", "detected", "id_similarity",
    "region_similarity", "confused", "clip_t", "target_expression", "expression", "expression_agree", "target_yaw",
    "target_pitch", "yaw", "pitch", "pose_error", "grid", "grid_row",
)


class FaceCache:
    """Detect faces once per generated image (baselines are shared by many cases). Keyed by object
    identity, so it must live no longer than the images it has seen (one per measurement)."""

    def __init__(self, analyzer):
        self.analyzer = analyzer
        self._faces: dict[int, list] = {}

    def faces(self, image: "Image.Image") -> list:
        import numpy as np

        key = id(image)
        if key not in self._faces:
            self._faces[key] = self.analyzer.detect(np.asarray(image.convert("RGB")))
        return self._faces[key]

    def region_embedding(self, image: "Image.Image", region: Sequence[float]) -> "np.ndarray | None":
        import numpy as np

        from components.evaluate.metrics import region_box
        from model.face_analysis.face import FaceAnalysisError

        arr = np.asarray(image.convert("RGB"))
        left, top, right, bottom = region_box(region, arr.shape[:2])
        try:
            return self.analyzer.embed_aligned(np.ascontiguousarray(arr[top:bottom, left:right]))
        except FaceAnalysisError as err:
            log.debug("region crop not embeddable: %s", err)
            return None


def _row(kind: str, variant: str, job_index: int, job: Job, evalset: EvalSet, person: int, **values) -> dict:
    ref = evalset.references[job.refs[person]]
    row = {c: None for c in SAMPLE_COLUMNS}
    row.update(kind=kind, variant=variant, job=job_index,
               group="+".join(evalset.references[r].identity for r in job.refs), identity=ref.identity,
               person=person, prompt=job.prompt, seed=job.seed, edit=job.edit or "")
    row.update(values)
    return row


def _match(faces: list, evalset: EvalSet, job: Job):
    """Hungarian assignment of detected faces to the job's references."""
    import numpy as np

    from components.evaluate.metrics import assign_faces, similarity_matrix

    refs = np.stack([evalset.references[r].embedding for r in job.refs])
    embs = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, refs.shape[1]))
    return assign_faces(similarity_matrix(refs, embs))


def _edit_values(face, target, estimator: str) -> dict:
    """Requested motion measured on a detected face (None where not requested or not measurable)."""
    from components.evaluate.metrics import pose_error
    from model.motion import estimate_expression

    out: dict[str, Any] = {"target_expression": target.expression, "target_yaw": target.yaw if target.pose_requested
                           else None, "target_pitch": target.pitch if target.pose_requested else None}
    if face is None:
        return out
    yaw, pitch, _ = face.pose
    out.update(yaw=round(float(yaw), 3), pitch=round(float(pitch), 3))
    if target.pose_requested:
        out["pose_error"] = pose_error((yaw, pitch), (target.yaw, target.pitch))
    if target.expression is not None and estimator == "landmarks":
        try:
            measured = estimate_expression(face.landmarks)
        except ValueError as err:
            log.debug("expression not measurable: %s", err)
        else:
            out.update(expression=measured, expression_agree=float(measured == target.expression))
    return out


def score(evalset: EvalSet, generated: list[Generated], baselines: dict, faces: FaceCache, clip,
          estimator: str) -> list[dict]:
    """Per-sample rows: one per (generated image, person) and variant (see SAMPLE_COLUMNS)."""
    from tqdm import tqdm

    from components.core.metric_catalogue import edit_target
    from components.evaluate.metrics import cosine

    images = [g.image for g in generated] + [baselines[k] for k in evalset.baselines()]
    texts = [j.prompt for j in evalset.jobs] + [k[0] for k in evalset.baselines()]
    clip_t = clip.score(images, texts)
    job_clip = clip_t[:len(generated)]
    base_clip = dict(zip(evalset.baselines(), clip_t[len(generated):]))
    single_index = {(j.refs, j.prompt, j.seed): i for i, j in enumerate(evalset.jobs) if j.kind == "single"}
    rows: list[dict] = []
    for i, (job, gen) in enumerate(tqdm(list(zip(evalset.jobs, generated)), desc="evaluate: scoring", unit="img")):
        detected = faces.faces(gen.image)
        if job.kind == "edit":
            ref = evalset.references[job.refs[0]]
            target = edit_target(job.edit)
            face = detected[0] if detected else None
            sim = cosine(face.embedding, ref.embedding) if face is not None else 0.0
            rows.append(_row("edit", "edit", i, job, evalset, 0, detected=face is not None, id_similarity=sim,
                             clip_t=float(job_clip[i]), **_edit_values(face, target, estimator)))
            j0 = single_index[(job.refs, job.prompt, job.seed)]
            plain = generated[j0].image
            pf = faces.faces(plain)
            pface = pf[0] if pf else None
            rows.append(_row("edit", "unedited", i, job, evalset, 0, detected=pface is not None,
                             id_similarity=cosine(pface.embedding, ref.embedding) if pface is not None else 0.0,
                             clip_t=float(job_clip[j0]), **_edit_values(pface, target, estimator)))
            continue
        match = _match(detected, evalset, job)
        base_img = baselines[(job.prompt, job.seed)]
        base_match = _match(faces.faces(base_img), evalset, job)
        for p, r in enumerate(job.refs):
            ref_emb = evalset.references[r].embedding
            emb = faces.region_embedding(gen.image, gen.regions[p])
            base_emb = faces.region_embedding(base_img, gen.regions[p])
            multi = job.kind != "single"
            rows.append(_row(job.kind, "id", i, job, evalset, p, detected=match.detected[p],
                             id_similarity=float(match.similarity[p]),
                             region_similarity=cosine(emb, ref_emb) if emb is not None else None,
                             confused=match.confused[p] if multi else None, clip_t=float(job_clip[i])))
            rows.append(_row(job.kind, "baseline", i, job, evalset, p, detected=base_match.detected[p],
                             id_similarity=float(base_match.similarity[p]),
                             region_similarity=cosine(base_emb, ref_emb) if base_emb is not None else None,
                             confused=base_match.confused[p] if multi else None,
                             clip_t=float(base_clip[(job.prompt, job.seed)])))
    return rows

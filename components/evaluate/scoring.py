"""Scoring of the generated evaluation set: per-sample rows (SAMPLE_COLUMNS), from faces detected once per image.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from components.evaluate.evalset import EvalSet, Job
from components.evaluate.generation import Generated

if TYPE_CHECKING:
    from PIL import Image

    from components.core.metric_catalogue import EditTarget

log = logging.getLogger(__name__)


SAMPLE_COLUMNS = (
    "kind", "variant", "job", "group", "identity", "person", "prompt", "seed", "edit", "detected", "id_similarity",
    "identified", "copy_paste", "confused", "clip_t", "target_expression", "expression", "expression_agree",
    "target_yaw", "target_pitch", "yaw", "pitch", "pose_error", "grid", "grid_row",
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


def _row(kind: str, variant: str, job_index: int, job: Job, evalset: EvalSet, person: int, **values) -> dict:
    ref = evalset.references[job.refs[person]]
    row = {c: None for c in SAMPLE_COLUMNS}
    row.update(kind=kind, variant=variant, job=job_index,
               group="+".join(evalset.references[r].identity for r in job.refs), identity=ref.identity,
               person=person, prompt=job.prompt, seed=job.seed,
               edit=job.edit or ("" if job.driver is None else f"landmarks of {evalset.drivers[job.driver].key}"))
    row.update(values)
    return row


def _match(faces: list, evalset: EvalSet, refs_idx: tuple[int, ...]):
    """Hungarian assignment of detected faces to the given references."""
    import numpy as np

    from components.evaluate.metrics import assign_faces, similarity_matrix

    refs = np.stack([evalset.references[r].embedding for r in refs_idx])
    embs = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, refs.shape[1]))
    return assign_faces(similarity_matrix(refs, embs))


def _edit_values(image: "Image.Image", face, target, reader) -> dict:
    """Requested motion read on a detected face by ``reader`` (None where not requested or not readable)."""
    import numpy as np

    from components.evaluate.metrics import pose_error

    out: dict[str, Any] = {"target_expression": target.expression, "target_yaw": target.yaw if target.pose_requested
                           else None, "target_pitch": target.pitch if target.pose_requested else None}
    if face is None:
        return out
    seen = reader.read(np.asarray(image.convert("RGB")), face)
    if seen.yaw is not None and seen.pitch is not None:
        out.update(yaw=round(seen.yaw, 3), pitch=round(seen.pitch, 3))
        if target.pose_requested:
            out["pose_error"] = pose_error((seen.yaw, seen.pitch), (target.yaw, target.pitch))
    if target.expression is not None and seen.expression is not None:
        out.update(expression=seen.expression, expression_agree=float(seen.expression == target.expression))
    return out


def _copy_paste(face, ref) -> float | None:
    """Similarity to the reference photo minus the mean similarity to the person's other photos (None without a
    face or without other photos)."""
    import numpy as np

    from components.evaluate.metrics import cosine, similarity_matrix

    if face is None or ref.others is None or not len(ref.others):
        return None
    return cosine(face.embedding, ref.embedding) - float(np.mean(similarity_matrix(ref.others, face.embedding[None])))


def _identified(face, evalset: EvalSet, own: int) -> bool:
    """Top-1 identification among all held-out references (a missed face is not identified)."""
    import numpy as np

    from components.evaluate.metrics import similarity_matrix

    if face is None:
        return False
    sims = similarity_matrix(evalset.embeddings, face.embedding[None])[:, 0]
    return bool(int(np.argmax(sims)) == own)


def _single_row(i: int, job: Job, evalset: EvalSet, image, faces: "FaceCache", clip_t: float, variant: str,
                 own: int) -> dict:
    """One row of a single-person image scored against reference ``own`` (its own, or the control's target)."""
    detected = faces.faces(image)
    match = _match(detected, evalset, (own,))
    face = detected[match.face[0]] if match.face[0] is not None else None
    ref = evalset.references[own]
    values = dict(detected=face is not None, id_similarity=float(match.similarity[0]), clip_t=clip_t)
    if variant == "id":
        values.update(identified=_identified(face, evalset, own), copy_paste=_copy_paste(face, ref))
    row = _row("single", variant, i, job, evalset, 0, **values)
    row.update(identity=ref.identity, group=ref.identity)
    return row


def driver_target(driver) -> "EditTarget":
    """What a landmark edit asks for: the driving photo's labelled expression and head pose."""
    from components.core.metric_catalogue import EditTarget

    return EditTarget(text=f"landmarks of {driver.key}", expression=driver.expression, yaw=driver.yaw,
                      pitch=driver.pitch, pose_requested=True)


def score(evalset: EvalSet, generated: list[Generated], baselines: dict, faces: FaceCache, clip,
          reader) -> list[dict]:
    """Per-sample rows: one per (generated image, person) and variant (see SAMPLE_COLUMNS).

    single: ``id`` (own photo), ``shuffled`` (another person's photo, same prompt and seed, compared with this
    person's reference) and ``baseline`` (ID off); multi<N>: ``id`` and ``baseline`` per person after matching;
    edit (text) and drive (a driving photo's landmarks): ``edit`` and ``unedited`` (the single image of the same
    person, prompt and seed), both read against what the edit asks for.
    """
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
        if job.kind == "single":
            own = job.refs[0]
            rows.append(_single_row(i, job, evalset, gen.image, faces, float(job_clip[i]), "id", own))
            rows.append(_single_row(i, job, evalset, baselines[(job.prompt, job.seed)], faces,
                                     float(base_clip[(job.prompt, job.seed)]), "baseline", own))
            continue
        if job.kind == "shuffled":
            rows.append(_single_row(i, job, evalset, gen.image, faces, float(job_clip[i]), "shuffled",
                                     int(job.against)))
            continue
        detected = faces.faces(gen.image)
        if job.kind in ("edit", "drive"):
            ref = evalset.references[job.refs[0]]
            target = edit_target(job.edit) if job.kind == "edit" else driver_target(evalset.drivers[job.driver])
            face = detected[0] if detected else None
            sim = cosine(face.embedding, ref.embedding) if face is not None else 0.0
            rows.append(_row(job.kind, "edit", i, job, evalset, 0, detected=face is not None, id_similarity=sim,
                             clip_t=float(job_clip[i]), **_edit_values(gen.image, face, target, reader)))
            j0 = single_index[(job.refs, job.prompt, job.seed)]
            plain = generated[j0].image
            pf = faces.faces(plain)
            pface = pf[0] if pf else None
            rows.append(_row(job.kind, "unedited", i, job, evalset, 0, detected=pface is not None,
                             id_similarity=cosine(pface.embedding, ref.embedding) if pface is not None else 0.0,
                             clip_t=float(job_clip[j0]), **_edit_values(plain, pface, target, reader)))
            continue
        match = _match(detected, evalset, job.refs)
        base_match = _match(faces.faces(baselines[(job.prompt, job.seed)]), evalset, job.refs)
        for p, r in enumerate(job.refs):
            face = detected[match.face[p]] if match.face[p] is not None else None
            rows.append(_row(job.kind, "id", i, job, evalset, p, detected=match.detected[p],
                             id_similarity=float(match.similarity[p]), confused=match.confused[p],
                             copy_paste=_copy_paste(face, evalset.references[r]), clip_t=float(job_clip[i])))
            rows.append(_row(job.kind, "baseline", i, job, evalset, p, detected=base_match.detected[p],
                             id_similarity=float(base_match.similarity[p]), confused=base_match.confused[p],
                             clip_t=float(base_clip[(job.prompt, job.seed)])))
    return rows

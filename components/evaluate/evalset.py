"""The fixed evaluation set of ``dynamicid evaluate``: references from the test split, the cases, and the set's hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from components.core.config import Params

log = logging.getLogger(__name__)


COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


@dataclass
class Reference:
    """One test identity's fixed reference photo and its recognizer embedding."""

    identity: str
    key: str
    image: "np.ndarray"      # [H, W, 3] uint8, given to the pipeline as the person's photo
    embedding: "np.ndarray"  # [D] L2-normalised, from the configured recognizer
    others: "np.ndarray | None" = None  # [K, D] embeddings of other photos of the same person (copy-paste score)
    other_keys: tuple[str, ...] = ()
    expression: str | None = None  # the reference photo's labelled expression (a landmark edit asks for another)


@dataclass
class Driver:
    """A held-out photo whose face's landmarks are a landmark edit's target, with its labelled motion."""

    identity: str
    key: str
    image: "np.ndarray"  # [H, W, 3] uint8, given to the pipeline as driving_image
    expression: str
    yaw: float
    pitch: float


@dataclass(frozen=True)
class Job:
    """One generation with ID injection on: which references, prompt, seed, optional edit.

    A ``shuffled`` job is the identity control of the single case of reference ``against``: the same prompt and
    seed with another held-out person's photo (``refs``), measured against ``against``'s reference.
    """

    kind: str                # single | shuffled | multi<N>[_boxes|_strips] | edit | drive
    refs: tuple[int, ...]    # indices into EvalSet.references whose photos are given to the pipeline
    prompt: str
    seed: int
    edit: str | None = None
    against: int | None = None  # shuffled only: the reference the image is compared with
    driver: int | None = None   # drive only: index into EvalSet.drivers
    layout: str | None = None   # multi only: "boxes" (user_boxes) | "strips"; None = the pipeline's default (auto)


@dataclass
class EvalSet:
    references: list[Reference]
    jobs: list[Job]
    definition: dict[str, Any]
    hash: str
    drivers: list[Driver] = field(default_factory=list)

    @cached_property
    def embeddings(self) -> "np.ndarray":
        """[N, D] reference embeddings, in reference order (identification compares a face with all of them)."""
        import numpy as np

        return np.stack([r.embedding for r in self.references])

    def baselines(self) -> list[tuple[str, int]]:
        """Unique (prompt, seed) pairs generated with ID injection off. The ID-off image does not
        depend on the identities (test_pipeline: id_scale 0 equals plain text-to-image), so one
        baseline serves every case with that prompt and seed."""
        seen: dict[tuple[str, int], None] = {}
        for j in self.jobs:
            if j.kind not in ("edit", "shuffled", "drive"):
                seen.setdefault((j.prompt, j.seed), None)
        return list(seen)


def count_word(n: int) -> str:
    return COUNT_WORDS.get(n, str(n))


def prepared_data(params: "Params"):
    from components.core.errors import UserError
    from components.core.shards import PreparedData
    from components.core.storage import resolve_local

    try:
        return PreparedData(resolve_local(params.data.prepared, params.storage.cache_dir, params.storage))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data.prepared: {err}") from None


def _detect(params: "Params", analyzer, image: "np.ndarray", who: str):
    from model.face_analysis.face import pick_face

    return pick_face(analyzer.detect(image), who=who, min_size=params.face.min_face_size)


def _reference_image(params: "Params", sample) -> "np.ndarray":
    image = sample.face_crop if params.evaluate.reference_image == "face_crop" else sample.pixels
    if image.ndim == 2 or image.shape[-1] != 3:
        image = image[..., :3] if image.ndim == 3 else image[..., None].repeat(3, -1)
    return image


def _pick_references(params: "Params", data, analyzer, other_photos: int = 3) -> list[Reference]:
    """First usable image (in (identity, image) order) of each held-out identity (the first num_identities of them
    when it is set), and up to ``other_photos`` further photos of the same person for the copy-paste score."""
    import numpy as np

    from components.core.errors import UserError
    from model.face_analysis.face import FaceAnalysisError

    ev = params.evaluate
    ids = data.identities(ev.split)
    if not ids:
        raise UserError(f"data.prepared {data.root}: split {ev.split!r} has no identities "
                        f"(evaluate.split; prepare holds out prepare.test_fraction of identities)")
    refs: list[Reference] = []
    for identity in sorted(ids):
        ref: Reference | None = None
        others, keys = [], []
        for pos in ids[identity]:
            sample = data.sample(pos)
            image = _reference_image(params, sample)
            try:
                face = _detect(params, analyzer, image, f"reference {identity}")
            except FaceAnalysisError as err:
                log.warning("evaluation set: skipping %s (%s)", sample.image, err)
                continue
            if ref is None:
                ref = Reference(identity=identity, key=sample.key, image=image, embedding=face.embedding,
                                expression=sample.expression)
            else:
                others.append(face.embedding)
                keys.append(sample.key)
                if len(others) == other_photos:
                    break
        if ref is not None:
            ref.others = np.stack(others) if others else None
            ref.other_keys = tuple(keys)
            refs.append(ref)
        if ev.num_identities and len(refs) == ev.num_identities:
            break
    if ev.num_identities and len(refs) < ev.num_identities:
        log.warning("evaluation set: %d usable test identities, evaluate.num_identities asks for %d",
                    len(refs), ev.num_identities)
    if not refs:
        raise UserError(f"no test identity of {data.root} has a reference face the detector finds")
    return refs


def _pick_drivers(params: "Params", data, analyzer, refs: list[Reference]) -> list[Driver | None]:
    """Per reference i, a driving photo of the next held-out person (i + 1 mod N) whose labelled expression differs
    from reference i's photo and whose head is turned (|yaw| >= 15): a landmark edit that asks for a visible
    change. The first such photo (in position order) the detector finds a face on; None when there is none."""
    from model.face_analysis.face import FaceAnalysisError

    ids = data.identities(params.evaluate.split)
    out: list[Driver | None] = []
    for i, ref in enumerate(refs):
        other = refs[(i + 1) % len(refs)].identity
        found = None
        for pos in ids.get(other, []):
            s = data.sample(pos)
            if s.expression == ref.expression or abs(float(s.yaw)) < 15.0:
                continue
            image = _reference_image(params, s)
            try:
                _detect(params, analyzer, image, f"driving photo {s.key}")
            except FaceAnalysisError:
                continue
            found = Driver(other, s.key, image, s.expression, float(s.yaw), float(s.pitch))
            break
        out.append(found)
    return out


def build_eval_set(params: "Params", analyzer, *, clip_id: str, reader_id: str = "landmarks") -> EvalSet:
    """The fixed evaluation set: references from the test split, then the cases in a fixed order.

    Multi-ID group g of size n takes references g*n, g*n+1, ... (cyclically), so groups overlap as
    little as the number of references allows. The hash covers everything the numbers depend on
    except the checkpoint: references (content keys, so new training data alone does not change
    it), cases, generation settings, recognizer and CLIP, so two reports with the same hash
    measured the same thing.
    """
    from components.core.errors import UserError

    ev = params.evaluate
    data = prepared_data(params)
    refs = _pick_references(params, data, analyzer)
    n_refs = len(refs)
    jobs: list[Job] = [Job("single", (i,), p, s) for i in range(n_refs) for p in ev.prompts for s in ev.seeds]
    if n_refs > 1:  # the identity control: the next person's photo (a derangement), same prompt and seed
        jobs += [Job("shuffled", ((i + 1) % n_refs,), p, s, against=i)
                 for i in range(n_refs) for p in ev.prompts for s in ev.seeds]
    for n in ev.multi_id:
        if n > n_refs:
            raise UserError(f"evaluate.multi_id asks for {n} identities per image, but only {n_refs} test "
                            f"identities have a usable reference (evaluate.num_identities = {ev.num_identities}, "
                            f"0 = all)")
        groups: list[tuple[int, ...]] = []
        for g in range(ev.multi_groups):
            grp = tuple((g * n + k) % n_refs for k in range(n))
            if grp not in groups:
                groups.append(grp)
        jobs += [Job(f"multi{n}" + (f"_{lay}" if lay else ""), grp, p.replace("{count}", count_word(n)), s,
                     layout=lay)
                 for lay in (None, *ev.layouts) for grp in groups for p in ev.multi_prompts for s in ev.seeds]
    jobs += [Job("edit", (i,), ev.prompts[0], s, e) for i in range(n_refs) for e in ev.edits for s in ev.seeds]
    drivers: list[Driver] = []
    if ev.landmark_edits and n_refs > 1:
        for i, drv in enumerate(_pick_drivers(params, data, analyzer, refs)):
            if drv is not None:
                drivers.append(drv)
                jobs += [Job("drive", (i,), ev.prompts[0], s, driver=len(drivers) - 1) for s in ev.seeds]
    backend = params.face.resolved_backend(params.model.profile)
    definition = {
        "version": 2,
        "split": ev.split,
        "reference_image": ev.reference_image,
        "references": [{"identity": r.identity, "key": r.key, "others": list(r.other_keys)} for r in refs],
        "jobs": [{"kind": j.kind, "refs": list(j.refs), "prompt": j.prompt, "seed": j.seed, "edit": j.edit,
                  **({"against": j.against} if j.against is not None else {}),
                  **({"driver": drivers[j.driver].key} if j.driver is not None else {}),
                  **({"layout": j.layout} if j.layout is not None else {})} for j in jobs],
        "generation": {"steps": ev.steps, "guidance_scale": ev.guidance_scale, "id_scale": resolved_id_scale(params),
                       "negative_prompt": ev.negative_prompt, "profile": params.model.profile,
                       "resolution": params.model.active.resolution},
        "recognizer": {"backend": backend,
                       "pack": params.face.insightface.name if backend == "insightface" else "dlib-resnet-v1"},
        "clip": clip_id,
        "motion_reader": reader_id,
    }
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return EvalSet(references=refs, jobs=jobs, definition=definition, hash=digest, drivers=drivers)


def user_boxes(n: int) -> list[tuple[float, float, float, float]]:
    """The "user boxes" of the layout comparison: n head-and-shoulders boxes side by side, (y0, x0, y1, x1).

    What a user draws for "n people in a row": each box 80 % of its column wide, from 15 % to 75 % of the
    height, so unlike strips they leave margins (where no identity is routed and the early boost is off).
    """
    return [(0.15, (i + 0.1) / n, 0.75, (i + 0.9) / n) for i in range(n)]


def resolved_id_scale(params: "Params") -> float:
    ev = params.evaluate
    return float(params.model.saa.id_scale if ev.id_scale is None else ev.id_scale)

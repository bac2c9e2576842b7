"""The fixed evaluation set of ``dynamicid evaluate``: references from the test split, the cases, and the set's hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Job:
    """One generation with ID injection on: which references, prompt, seed, optional edit."""

    kind: str                # single | multi<N> | edit
    refs: tuple[int, ...]    # indices into EvalSet.references
    prompt: str
    seed: int
    edit: str | None = None


@dataclass
class EvalSet:
    references: list[Reference]
    jobs: list[Job]
    definition: dict[str, Any]
    hash: str

    def baselines(self) -> list[tuple[str, int]]:
        """Unique (prompt, seed) pairs generated with ID injection off. The ID-off image does not
        depend on the identities (test_pipeline: id_scale 0 equals plain text-to-image), so one
        baseline serves every case with that prompt and seed."""
        seen: dict[tuple[str, int], None] = {}
        for j in self.jobs:
            if j.kind != "edit":
                seen.setdefault((j.prompt, j.seed), None)
        return list(seen)


def count_word(n: int) -> str:
    return COUNT_WORDS.get(n, str(n))


def _prepared(params: "Params"):
    from components.core.errors import UserError
    from components.core.shards import PreparedData
    from components.core.storage import resolve_local

    try:
        return PreparedData(resolve_local(params.data.prepared, params.storage.cache_dir, params.storage))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data.prepared: {err}") from None


def _pick_references(params: "Params", data, analyzer) -> list[Reference]:
    """First usable image (in (identity, image) order) of the first num_identities test identities."""
    from components.core.errors import UserError
    from model.face_analysis.face import FaceAnalysisError, pick_face

    ev = params.evaluate
    ids = data.identities(ev.split)
    if not ids:
        raise UserError(f"data.prepared {data.root}: split {ev.split!r} has no identities "
                        f"(evaluate.split; prepare holds out prepare.test_fraction of identities)")
    refs: list[Reference] = []
    for identity in sorted(ids):
        for pos in ids[identity]:
            sample = data.sample(pos)
            image = sample.face_crop if ev.reference_image == "face_crop" else sample.pixels
            if image.ndim == 2 or image.shape[-1] != 3:
                image = image[..., :3] if image.ndim == 3 else image[..., None].repeat(3, -1)
            try:
                face = pick_face(analyzer.detect(image), who=f"reference {identity}",
                                 min_size=params.face.min_face_size)
            except FaceAnalysisError as err:
                log.warning("evaluation set: skipping %s (%s)", sample.image, err)
                continue
            refs.append(Reference(identity=identity, key=sample.key, image=image, embedding=face.embedding))
            break
        if len(refs) == ev.num_identities:
            break
    if len(refs) < ev.num_identities:
        log.warning("evaluation set: %d usable test identities, evaluate.num_identities asks for %d",
                    len(refs), ev.num_identities)
    if not refs:
        raise UserError(f"no test identity of {data.root} has a reference face the detector finds")
    return refs


def build_eval_set(params: "Params", analyzer, *, clip_id: str) -> EvalSet:
    """The fixed evaluation set: references from the test split, then the cases in a fixed order.

    Multi-ID group g of size n takes references g*n, g*n+1, ... (cyclically), so groups overlap as
    little as the number of references allows. The hash covers everything the numbers depend on
    except the checkpoint: references (content keys, so new training data alone does not change
    it), cases, generation settings, recognizer and CLIP, so two reports with the same hash
    measured the same thing.
    """
    from components.core.errors import UserError

    ev = params.evaluate
    data = _prepared(params)
    refs = _pick_references(params, data, analyzer)
    n_refs = len(refs)
    jobs: list[Job] = [Job("single", (i,), p, s) for i in range(n_refs) for p in ev.prompts for s in ev.seeds]
    for n in ev.multi_id:
        if n > n_refs:
            raise UserError(f"evaluate.multi_id asks for {n} identities per image, but only {n_refs} test "
                            f"identities have a usable reference (evaluate.num_identities = {ev.num_identities})")
        groups: list[tuple[int, ...]] = []
        for g in range(ev.multi_groups):
            grp = tuple((g * n + k) % n_refs for k in range(n))
            if grp not in groups:
                groups.append(grp)
        jobs += [Job(f"multi{n}", grp, p.replace("{count}", count_word(n)), s)
                 for grp in groups for p in ev.multi_prompts for s in ev.seeds]
    jobs += [Job("edit", (i,), ev.prompts[0], s, e) for i in range(n_refs) for e in ev.edits for s in ev.seeds]
    backend = params.face.resolved_backend(params.model.profile)
    definition = {
        "version": 1,
        "split": ev.split,
        "reference_image": ev.reference_image,
        "references": [{"identity": r.identity, "key": r.key} for r in refs],
        "jobs": [{"kind": j.kind, "refs": list(j.refs), "prompt": j.prompt, "seed": j.seed, "edit": j.edit}
                 for j in jobs],
        "generation": {"steps": ev.steps, "guidance_scale": ev.guidance_scale, "id_scale": resolved_id_scale(params),
                       "negative_prompt": ev.negative_prompt, "profile": params.model.profile,
                       "resolution": params.model.active.resolution},
        "recognizer": {"backend": backend,
                       "pack": params.face.insightface.name if backend == "insightface" else "dlib-resnet-v1"},
        "clip": clip_id,
        "expression_estimator": ev.expression_estimator,
    }
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return EvalSet(references=refs, jobs=jobs, definition=definition, hash=digest)


def resolved_id_scale(params: "Params") -> float:
    ev = params.evaluate
    return float(params.model.saa.id_scale if ev.id_scale is None else ev.id_scale)

"""``dynamicid evaluate``: measure a checkpoint the way the paper does, on a fixed evaluation set.

The evaluation set is built from the prepared test split (identities never seen in training):
one fixed reference photo per identity, a fixed prompt list and fixed seeds. Every case is
generated twice with the same noise, once with ID injection on and once off (the baseline), so
each report shows what the ID path adds. Metrics (components.evaluate.metrics, defined in
docs/evaluation.md): single-ID identity similarity (+ detection failures, + layout-region crop
similarity), CLIP-T, multi-ID per-person similarity after Hungarian matching and identity
confusion, and editability (head-pose error, expression agreement, identity kept).

Outputs under ``--output`` (default params evaluate.output), each a separate DVC out::

    metrics.json     DVC metrics (nested: {"single": {"id_similarity": ...}, ...}); unmeasured values omitted
    samples.csv      one row per (generated image, person): the numbers behind every metric
    eval_set.json    the evaluation set definition and its hash
    report.json      lineage (checkpoint digest, data version, git commit, params hash), MLflow run,
                     the champion's metrics on the same set (when a champion exists)
    grids/*.png      reference | generated | baseline (or unedited | edited) per case

Everything is also logged to one MLflow run (metrics, params, lineage tags, the files above).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from components.core.config import Params

log = logging.getLogger(__name__)

COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
SAMPLE_COLUMNS = (
    "kind", "variant", "job", "group", "identity", "person", "prompt", "seed", "edit", "detected", "id_similarity",
    "region_similarity", "confused", "clip_t", "target_expression", "expression", "expression_agree", "target_yaw",
    "target_pitch", "yaw", "pitch", "pose_error", "grid", "grid_row",
)


# --------------------------------------------------------------------------- evaluation set


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
    from model.face_analysis import FaceAnalysisError, pick_face

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


# --------------------------------------------------------------------------- generation


@dataclass
class Generated:
    image: "Image.Image"
    regions: list[list[float]]  # per person (y0, x0, y1, x1) the pipeline used


def generate(pipe, evalset: EvalSet, params: "Params") -> tuple[list[Generated], dict[tuple[str, int], "Image.Image"]]:
    """Run every case (ID on) and every baseline (ID off), batched by identity count."""
    from tqdm import tqdm

    from model.pipeline import IdentityInput

    ev = params.evaluate
    id_scale = resolved_id_scale(params)
    common = dict(negative_prompt=ev.negative_prompt, num_inference_steps=ev.steps,
                  guidance_scale=ev.guidance_scale)
    buckets: dict[int, list[int]] = {}
    for idx, job in enumerate(evalset.jobs):
        buckets.setdefault(len(job.refs), []).append(idx)
    batches = [idxs[i:i + ev.batch_size] for idxs in buckets.values() for i in range(0, len(idxs), ev.batch_size)]
    base_keys = evalset.baselines()
    base_batches = [base_keys[i:i + ev.batch_size] for i in range(0, len(base_keys), ev.batch_size)]
    results: list[Generated | None] = [None] * len(evalset.jobs)
    baselines: dict[tuple[str, int], Image.Image] = {}
    with tqdm(total=len(evalset.jobs) + len(base_keys), desc="evaluate: generating", unit="img") as bar:
        for batch in batches:
            jobs = [evalset.jobs[i] for i in batch]
            ids = [[IdentityInput(image=evalset.references[r].image, expression=j.edit) for r in j.refs] for j in jobs]
            out = pipe([j.prompt for j in jobs], ids, seed=[j.seed for j in jobs], id_scale=id_scale, **common)
            for b, i in enumerate(batch):
                results[i] = Generated(out.images[b], [r.region for r in out.identities[b]])
            bar.update(len(batch))
        for keys in base_batches:
            out = pipe([k[0] for k in keys], [], seed=[k[1] for k in keys], **common)
            baselines.update(zip(keys, out.images))
            bar.update(len(keys))
    return [r for r in results if r is not None], baselines


# --------------------------------------------------------------------------- scoring


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
        from model.face_analysis import FaceAnalysisError

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

    from components.evaluate.metrics import cosine
    from components.core.metric_catalogue import edit_target

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


# --------------------------------------------------------------------------- grids


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def write_grids(evalset: EvalSet, generated: list[Generated], baselines: dict, rows: list[dict], out_dir: Path,
                grid_rows: int, cell: int) -> list[Path]:
    """PNG pages per kind: references | generated (ID on) | baseline (ID off); for edits
    reference | unedited | edited. A caption under each row gives prompt, seed and similarities."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    font = _font()
    caption_h, header_h = 28, 16
    by_job: dict[int, list[dict]] = {}
    for r in rows:
        by_job.setdefault(r["job"], []).append(r)
    single_index = {(j.refs, j.prompt, j.seed): i for i, j in enumerate(evalset.jobs) if j.kind == "single"}
    written: list[Path] = []
    kinds = list(dict.fromkeys(j.kind for j in evalset.jobs))
    for kind in kinds:
        idxs = [i for i, j in enumerate(evalset.jobs) if j.kind == kind]
        n = len(evalset.jobs[idxs[0]].refs)
        titles = ([f"reference {k + 1}" for k in range(n)] +
                  (["unedited", "edited"] if kind == "edit" else ["generated", "ID off"]))
        for page, start in enumerate(range(0, len(idxs), grid_rows)):
            chunk = idxs[start:start + grid_rows]
            sheet = Image.new("RGB", (cell * len(titles), header_h + len(chunk) * (cell + caption_h)), "white")
            draw = ImageDraw.Draw(sheet)
            for c, t in enumerate(titles):
                draw.text((c * cell + 3, 2), t, fill="black", font=font)
            name = f"{kind}-{page:03d}.png"
            for row_no, i in enumerate(chunk):
                job = evalset.jobs[i]
                y = header_h + row_no * (cell + caption_h)
                tiles = [Image.fromarray(evalset.references[r].image) for r in job.refs]
                if kind == "edit":
                    tiles += [generated[single_index[(job.refs, job.prompt, job.seed)]].image, generated[i].image]
                else:
                    tiles += [generated[i].image, baselines[(job.prompt, job.seed)]]
                for c, tile in enumerate(tiles):
                    sheet.paste(tile.convert("RGB").resize((cell, cell), Image.BICUBIC), (c * cell, y))
                jr = by_job[i]
                first = next(r for r in jr if r["variant"] in ("id", "edit"))
                sims = "/".join(f"{r['id_similarity']:.2f}" for r in jr if r["variant"] in ("id", "edit"))
                base = "/".join(f"{r['id_similarity']:.2f}" for r in jr if r["variant"] in ("baseline", "unedited"))
                label = job.edit if kind == "edit" else job.prompt
                draw.text((3, y + cell + 1), f"seed {job.seed}  sim {sims} (base {base})  clip {first['clip_t']:.3f}",
                          fill="black", font=font)
                draw.text((3, y + cell + 14), label[:90], fill="dimgray", font=font)
                for r in jr:
                    r["grid"], r["grid_row"] = name, row_no
            sheet.save(out_dir / name)
            written.append(out_dir / name)
    return written


# --------------------------------------------------------------------------- one measurement


@dataclass
class Measurement:
    metrics: dict[str, float | None]
    rows: list[dict]
    generated: list[Generated]
    baselines: dict


def measure(pipe, evalset: EvalSet, params: "Params", clip, faces: FaceCache) -> Measurement:
    """Generate the evaluation set with one pipeline and compute every metric."""
    from components.evaluate.metrics import aggregate

    pipe.set_progress(False)
    generated, baselines = generate(pipe, evalset, params)
    rows = score(evalset, generated, baselines, faces, clip, params.evaluate.expression_estimator)
    return Measurement(metrics=aggregate(rows), rows=rows, generated=generated, baselines=baselines)


def counts(evalset: EvalSet, rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {"references": len(evalset.references), "images": len(evalset.jobs),
                           "baseline_images": len(evalset.baselines())}
    for kind in dict.fromkeys(j.kind for j in evalset.jobs):
        out[f"{kind}.cases"] = sum(1 for j in evalset.jobs if j.kind == kind)
    out["edit.pose_measured"] = sum(1 for r in rows if r["variant"] == "edit" and r["pose_error"] is not None)
    out["edit.expression_measured"] = sum(1 for r in rows if r["variant"] == "edit"
                                          and r["expression_agree"] is not None)
    return out


# --------------------------------------------------------------------------- checkpoint + champion


def resolve_checkpoint(uri: str, params: "Params", scratch: Path) -> Path:
    """A checkpoint directory from a local dir, an s3:// URI or a registry URI (models:/..., runs:/...)."""
    from components.core.errors import UserError
    from components.core.storage import StorageError, resolve_local
    from model.checkpoint import CheckpointError, find_checkpoint

    try:
        if uri.startswith(("models:/", "runs:/")):
            from components.core.registry import download_checkpoint

            return download_checkpoint(uri, scratch / "model")
        return find_checkpoint(resolve_local(uri, params.storage.cache_dir, params.storage))
    except (CheckpointError, StorageError, FileNotFoundError) as err:
        raise UserError(f"checkpoint {uri}: {err}") from None


def champion_on_this_set(params: "Params", evalset: EvalSet, candidate_digest: str, candidate: Measurement,
                         clip, faces: FaceCache, scratch: Path) -> dict | None:
    """The champion's metrics on this evaluation set: from its registry tags when it was measured
    on the same set, else measured now (download it from the registry and run the same cases)."""
    from components.core import registry
    from components.core.errors import UserError
    from components.core.runtime import pipeline_from_params
    from model.checkpoint import CheckpointError

    name, alias = params.mlflow.registered_model, params.gate.champion_alias
    mv = registry.alias_version(registry.client(), name, alias)
    if mv is None:
        log.info("no %s@%s in the registry: nothing to compare with", name, alias)
        return None
    info = {"version": str(mv.version), "alias": alias, "eval_set_hash": evalset.hash}
    if mv.tags.get("eval_set_hash") == evalset.hash:
        return {**info, "source": "registry tags", "metrics": registry.version_metrics(mv)}
    log.info("champion v%s was measured on another evaluation set: measuring it on this one", mv.version)
    ckpt = registry.download_checkpoint(f"models:/{name}/{mv.version}", scratch / "champion")
    if registry.checkpoint_digest(ckpt) == candidate_digest:
        return {**info, "source": "same checkpoint", "metrics": candidate.metrics}
    try:
        pipe = pipeline_from_params(params, ckpt, face_analyzer=faces.analyzer)
    except CheckpointError as err:
        raise UserError(f"champion v{mv.version} cannot be evaluated with these params: {err}") from None
    m = measure(pipe, evalset, params, clip, FaceCache(faces.analyzer))  # a fresh cache: new images
    return {**info, "source": "measured", "metrics": m.metrics}


# --------------------------------------------------------------------------- outputs


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(SAMPLE_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else (round(r[k], 6) if isinstance(r[k], float) else r[k]))
                        for k in SAMPLE_COLUMNS})


def lineage(params: "Params") -> dict[str, str]:
    from components.core.config import params_hash
    from components.core.tracking import data_version, git_commit

    return {"git_commit": git_commit(), "params_hash": params_hash(params),
            "data_version": data_version(params.data.prepared)}


def evaluate(params: "Params", checkpoint: str, output: str | Path) -> dict:
    """Evaluate one checkpoint; write the outputs and the MLflow run; return report.json's content."""
    from components.core import registry
    from components.core.errors import UserError
    from components.core.config import flatten
    from components.evaluate.metrics import ClipScorer, clip_model_path, nest, tiny_clip_fingerprint
    from components.core.runtime import pipeline_from_params
    from components.core.tracking import loggable_params, public_uri, setup_mlflow, tracking_uri
    from model.checkpoint import CheckpointError
    from model.face_analysis import FaceAnalysisError, build_face_analyzer

    t0 = time.time()
    out = Path(output)
    mlflow = setup_mlflow(params)
    with tempfile.TemporaryDirectory(prefix="dynamicid-eval-") as tmp:
        scratch = Path(tmp)
        ckpt = resolve_checkpoint(checkpoint, params, scratch)
        digest = registry.checkpoint_digest(ckpt)
        try:
            analyzer = build_face_analyzer(params.face, params.model.profile)
            clip_path = clip_model_path(params)
        except (FaceAnalysisError, ValueError) as err:
            raise UserError(str(err)) from None
        clip_id = (f"tiny-clip-{tiny_clip_fingerprint(params.model.tiny)}" if not params.evaluate.clip_model
                   else params.evaluate.clip_model)
        evalset = build_eval_set(params, analyzer, clip_id=clip_id)
        log.info("evaluation set %s: %d references, %d cases, %d baselines", evalset.hash[:12],
                 len(evalset.references), len(evalset.jobs), len(evalset.baselines()))
        try:
            pipe = pipeline_from_params(params, ckpt, face_analyzer=analyzer)
        except CheckpointError as err:
            raise UserError(f"checkpoint {checkpoint}: {err}") from None
        clip = ClipScorer(clip_path, device=str(pipe.device))
        faces = FaceCache(analyzer)
        result = measure(pipe, evalset, params, clip, faces)
        del pipe
        champion = (champion_on_this_set(params, evalset, digest, result, clip, faces, scratch)
                    if params.evaluate.compare_champion else None)

    out.mkdir(parents=True, exist_ok=True)
    grids = write_grids(evalset, result.generated, result.baselines, result.rows, out / "grids",
                        params.evaluate.grid_rows, cell=max(96, min(params.model.active.resolution, 256)))
    (out / "metrics.json").write_text(json.dumps(nest(result.metrics), indent=2, sort_keys=True) + "\n")
    write_csv(out / "samples.csv", result.rows)
    (out / "eval_set.json").write_text(json.dumps({"hash": evalset.hash, **evalset.definition}, indent=2) + "\n")
    tags = {**lineage(params), "eval_set_hash": evalset.hash, "checkpoint_digest": digest,
            "checkpoint": public_uri(str(checkpoint)), "profile": params.model.profile,
            "face_backend": params.face.resolved_backend(params.model.profile), "dynamicid.stage": "evaluate"}
    report: dict[str, Any] = {
        "checkpoint": public_uri(str(checkpoint)), "checkpoint_dir": str(ckpt), "checkpoint_digest": digest,
        "eval_set_hash": evalset.hash, **{k: tags[k] for k in ("git_commit", "params_hash", "data_version",
                                                                "profile", "face_backend")},
        "counts": counts(evalset, result.rows), "champion": champion,
        "not_measured": sorted(k for k, v in result.metrics.items() if v is None),
        "grids": [str(p.relative_to(out)) for p in grids],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with mlflow.start_run(run_name="evaluate", tags=tags) as run:
        ev_params = {k: v for k, v in flatten(params).items() if k.startswith(("evaluate.", "model.", "face."))}
        mlflow.log_params({k: str(v)[:500] for k, v in loggable_params(ev_params).items()})
        mlflow.log_metrics({k: v for k, v in result.metrics.items() if v is not None})
        report["mlflow"] = {"tracking_uri": public_uri(tracking_uri(params)), "run_id": run.info.run_id,
                            "experiment_id": run.info.experiment_id}
        report["duration_s"] = round(time.time() - t0, 1)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        mlflow.log_artifacts(str(out))
    return report


def _fmt(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.4f}"


def summary_table(metrics: dict[str, float | None]) -> str:
    width = max(len(k) for k in metrics) if metrics else 10
    return "\n".join(f"  {k:<{width}}  {_fmt(v)}" for k, v in sorted(metrics.items()))


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure a checkpoint on the fixed evaluation set (identity, CLIP-T, multi-ID, editability)",
        description="Generate the fixed evaluation set (test-split identities, params evaluate.prompts / seeds / "
        "edits) with ID injection on and off, compute the metrics of docs/evaluation.md, and write metrics.json, "
        "samples.csv, eval_set.json, report.json and grids/*.png; everything is logged to one MLflow run. "
        "When the registry has a champion, its metrics on the same set go into report.json for the gate.",
    )
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint dir, s3:// URI or models:/name@alias (default: params evaluate.checkpoint)")
    p.add_argument("--output", default=None, help="output directory (default: params evaluate.output)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace, params: "Params") -> int:
    ckpt = args.checkpoint or params.evaluate.checkpoint
    output = args.output or params.evaluate.output
    report = evaluate(params, ckpt, output)
    from components.evaluate.metrics import flatten_metrics

    metrics = flatten_metrics(json.loads((Path(output) / "metrics.json").read_text()))
    print(f"evaluated {ckpt} on evaluation set {report['eval_set_hash'][:12]} "
          f"({report['counts']['images']} images + {report['counts']['baseline_images']} baselines, "
          f"{report['duration_s']} s):")
    print(summary_table({**metrics, **{k: None for k in report["not_measured"]}}))
    if report["champion"]:
        print(f"champion v{report['champion']['version']} on the same set: {report['champion']['source']}")
    print(f"wrote {output}/metrics.json, samples.csv, report.json, grids/; MLflow run {report['mlflow']['run_id']}")
    return 0


__all__ = ["Reference", "Job", "EvalSet", "build_eval_set", "generate", "score", "measure", "evaluate",
           "write_grids", "resolve_checkpoint", "register", "run_evaluate"]

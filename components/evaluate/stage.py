"""``dynamicid evaluate``: measure a checkpoint on a fixed evaluation set of people never seen in training.

The evaluation set is built from the prepared test split: one fixed reference photo per held-out person, a
fixed prompt list and fixed seeds. Every single-person case is generated three times with the same noise: with
the person's photo, with another held-out person's photo (the identity control) and with ID injection off.
Metrics (components.evaluate.metrics, defined in docs/evaluation.md) are read back from the generated images
with the configured face recognizer and CLIP, each a mean over people with a 95 % interval that resamples
people: identity similarity, identity lift over the control, top-1 identification, detection rate, copy-paste,
CLIP-T; multi-ID similarity after Hungarian matching, confusion and missing faces; edit pose error and
expression agreement against the unedited image.

Outputs under ``--output`` (default params evaluate.output), each a separate DVC out::

    metrics.json     DVC metrics (nested: {"single": {"id_lift": ..., "id_lift_low": ...}}); unmeasured omitted
    samples.csv      one row per (generated image, person, variant): the numbers behind every metric
    eval_set.json    the evaluation set definition and its hash
    report.json      lineage (checkpoint digest, data version, git commit, params hash), MLflow run, counts,
                     the checkpoint's learning-check records (with whether they belong to these weights) and its
                     provenance (the stage that wrote it, its compatibility mode, an imported release's sources)
    grids/*.png      reference | generated | another person's photo | ID off (edits: unedited | edited)

Everything is also logged to one MLflow run (metrics, params, lineage tags, the files above).

The parts: components.evaluate.evalset (the set), .generation, .scoring, .grids, .measure (one measurement,
the checkpoint and its learning-check records); this module writes the outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.evaluate.estimators import motion_reader
from components.evaluate.evalset import EvalSet, build_eval_set, prepared_data
from components.evaluate.grids import write_grids
from components.evaluate.measure import learning_check_records, measure, resolve_checkpoint
from components.evaluate.scoring import SAMPLE_COLUMNS, FaceCache

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- outputs


def counts(evalset: EvalSet, rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {"references": len(evalset.references), "images": len(evalset.jobs),
                           "baseline_images": len(evalset.baselines())}
    for kind in dict.fromkeys(j.kind for j in evalset.jobs):
        out[f"{kind}.cases"] = sum(1 for j in evalset.jobs if j.kind == kind)
    out["people"] = len(evalset.references)
    for kind in ("edit", "drive"):
        out[f"{kind}.pose_measured"] = sum(1 for r in rows if r["kind"] == kind and r["variant"] == "edit"
                                           and r["pose_error"] is not None)
    out["edit.expression_measured"] = sum(1 for r in rows if r["kind"] == "edit" and r["variant"] == "edit"
                                          and r["expression_agree"] is not None)
    return out


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
    from components.core.config import flatten
    from components.core.errors import UserError
    from components.core.runtime import pipeline_from_params
    from components.core.tracking import (
        loggable_params,
        public_uri,
        setup_mlflow,
        tracking_uri,
    )
    from components.evaluate.metrics import (
        ClipScorer,
        clip_model_path,
        nest,
        tiny_clip_fingerprint,
    )
    from model.checkpoint import CheckpointError
    from model.face_analysis.backends import build_face_analyzer
    from model.face_analysis.face import FaceAnalysisError

    from model.loading import quiet_hf_progress

    quiet_hf_progress()  # before any transformers processor class is imported (the tiny CLIP is built below)
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
        try:
            reader = motion_reader(params, prepared_data(params), analyzer)
        except FaceAnalysisError as err:
            raise UserError(str(err)) from None
        evalset = build_eval_set(params, analyzer, clip_id=clip_id, reader_id=reader.name)
        log.info("evaluation set %s: %d references, %d cases, %d baselines", evalset.hash[:12],
                 len(evalset.references), len(evalset.jobs), len(evalset.baselines()))
        try:
            pipe = pipeline_from_params(params, ckpt, face_analyzer=analyzer)
        except CheckpointError as err:
            raise UserError(f"checkpoint {checkpoint}: {err}") from None
        clip = ClipScorer(clip_path, device=str(pipe.device))
        faces = FaceCache(analyzer)
        result = measure(pipe, evalset, params, clip, faces, reader)
        del pipe
        checks = learning_check_records(ckpt)
        provenance = registry.checkpoint_provenance(ckpt)

    out.mkdir(parents=True, exist_ok=True)
    grids = write_grids(evalset, result.generated, result.baselines, result.rows, out / "grids",
                        params.evaluate.grid_rows, cell=max(96, min(params.model.active.resolution, 256)))
    (out / "metrics.json").write_text(json.dumps(nest(result.metrics), indent=2, sort_keys=True) + "\n")
    write_csv(out / "samples.csv", result.rows)
    (out / "eval_set.json").write_text(json.dumps({"hash": evalset.hash, **evalset.definition}, indent=2) + "\n")
    tags = {**lineage(params), "eval_set_hash": evalset.hash, "checkpoint_digest": digest,
            "checkpoint": public_uri(str(checkpoint)), "profile": params.model.profile,
            "face_backend": params.face.resolved_backend(params.model.profile), "dynamicid.stage": "evaluate",
            **registry.provenance_tags(provenance)}
    report: dict[str, Any] = {
        "checkpoint": public_uri(str(checkpoint)), "checkpoint_dir": str(ckpt), "checkpoint_digest": digest,
        "eval_set_hash": evalset.hash, **{k: tags[k] for k in ("git_commit", "params_hash", "data_version",
                                                                "profile", "face_backend")},
        "counts": counts(evalset, result.rows), "learning_checks": checks, "checkpoint_provenance": provenance,
        "motion_reader": reader.meta,
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
    """One line per metric, its 95 % interval over people beside it (the _low / _high entries folded in)."""
    shown = {k: v for k, v in metrics.items() if not (k.endswith(("_low", "_high")) and k.rsplit("_", 1)[0] in metrics)}
    width = max(len(k) for k in shown) if shown else 10
    lines = []
    for k, v in sorted(shown.items()):
        low, high = metrics.get(f"{k}_low"), metrics.get(f"{k}_high")
        iv = f"  [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        lines.append(f"  {k:<{width}}  {_fmt(v)}{iv}".rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure a checkpoint on the fixed evaluation set (identity, CLIP-T, multi-ID, editability)",
        description="Generate the fixed evaluation set (held-out people of the test split, params evaluate.prompts "
        "/ seeds / edits / landmark_edits) with each person's photo, with another person's photo (the control) and "
        "with ID injection off, plus text edits and edits to another held-out person's landmarks (a driving photo); "
        "read the metrics of docs/evaluation.md back from the images, each with a 95% interval "
        "over people; write metrics.json, samples.csv, eval_set.json, report.json (with the checkpoint's "
        "learning-check records) and grids/*.png; everything is logged to one MLflow run.",
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
    for stage, rec in report["learning_checks"].items():
        state = "passed" if rec.get("passed") else "failed"
        bound = "" if rec.get("weights_match") else " (measured on other weights)"
        print(f"learning check {stage}: {state}{bound}")
    print(f"wrote {output}/metrics.json, samples.csv, report.json, grids/; MLflow run {report['mlflow']['run_id']}")
    return 0


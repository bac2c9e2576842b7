"""``dynamicid register``: the promotion gate, then an atomic registry publish.

The gate (components.evaluate.gate) checks the candidate's evaluation (metrics.json + report.json written by
``dynamicid evaluate``) against params ``gate``: the learning checks recorded in the checkpoint (on these very
weights), absolute minimums / maximums, intervals over people that must lie above a bound, and allowed regression
against one fixed reference record (``gate.reference``; never the previous champion, so losses cannot add up).
A candidate that fails is not registered: the command names each failed criterion with its value, interval and
threshold and exits 1 (0 with ``--decision-file``, which then carries the decision). A candidate that passes
becomes a new version of the registered model (pyfunc, see components.register.publish) with lineage tags (for
imported research-release weights also the release files' sha256, in the tags and the description), gets
the ``candidate`` alias, and with ``--promote`` (or params gate.promote) the ``champion`` alias too, only after its
artefacts have been verified. ``--save-reference`` writes the evaluation as a reference record to pin.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.evaluate.gate import check_gate, format_table, why

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="gate an evaluated checkpoint and register it in the MLflow model registry",
        description="Check the candidate's evaluation against params gate: the checkpoint's learning checks, "
        "absolute minimums / maximums, 95% intervals over people that must lie above a bound (e.g. the identity "
        "lift above 0) and allowed regression vs the fixed reference record gate.reference. Pass: register a new "
        "version (pyfunc model with the checkpoint, lineage tags), verify it, set the candidate alias, and with "
        "--promote the champion alias. Fail: nothing is registered; each failed criterion is named with its "
        "value, interval and threshold; exit status 1.",
    )
    p.add_argument("--metrics", default=None,
                   help="metrics.json of the evaluation; report.json must be next to it "
                   "(default: <params evaluate.output>/metrics.json)")
    p.add_argument("--checkpoint", default=None, help="checkpoint to register (default: the evaluated one); "
                   "it must be byte-identical to what was evaluated")
    p.add_argument("--promote", action="store_true", help="also move the champion alias (or params gate.promote)")
    p.add_argument("--check-only", action="store_true", help="run the gate, register nothing")
    p.add_argument("--decision-file", default=None,
                   help="write true/false here; a failed gate then exits 0 (the file carries the decision)")
    p.add_argument("--version-file", default=None,
                   help="write the registered version number here ('none' when nothing was registered)")
    p.add_argument("--save-reference", default=None, metavar="PATH",
                   help="also write this evaluation as a reference record (JSON) to pin with gate.reference; "
                   "written whatever the gate decides, since a team may pin a known-weak baseline on purpose")
    p.set_defaults(func=run_register)


def load_evaluation(metrics_path: Path) -> tuple[dict[str, float], dict[str, Any]]:
    from components.core.errors import UserError
    from components.evaluate.metrics import flatten_metrics

    report_path = metrics_path.parent / "report.json"
    for path in (metrics_path, report_path):
        if not path.exists():
            raise UserError(f"{path} not found: run `dynamicid evaluate` first")
    try:
        metrics = flatten_metrics(json.loads(metrics_path.read_text()))
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"unreadable evaluation output in {metrics_path.parent}: {err}") from None
    for key in ("checkpoint_digest", "eval_set_hash"):
        if key not in report:
            raise UserError(f"{report_path}: no {key}; rerun `dynamicid evaluate`")
    return metrics, report


def load_reference(params: "Params") -> dict[str, Any] | None:
    """The fixed reference record named by gate.reference (local path or s3:// URI), or None when unset."""
    from components.core.errors import UserError
    from components.core.storage import StorageError, resolve_local

    uri = params.gate.reference
    if not uri:
        return None
    try:
        record = json.loads(Path(resolve_local(uri, params.storage.cache_dir, params.storage)).read_text())
    except (OSError, StorageError, json.JSONDecodeError) as err:
        raise UserError(f"gate.reference {uri}: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) or "eval_set_hash" not in record:
        raise UserError(f"gate.reference {uri}: not a reference record (needs eval_set_hash and metrics; write one "
                        f"with `dynamicid register --save-reference PATH`)")
    record.setdefault("name", uri)
    return record


def reference_record(metrics: dict[str, float], report: dict[str, Any]) -> dict[str, Any]:
    """An evaluation as a reference record: what regression is measured against until a person re-pins it."""
    return {"eval_set_hash": report["eval_set_hash"], "checkpoint_digest": report["checkpoint_digest"],
            "checkpoint": report.get("checkpoint"), "git_commit": report.get("git_commit"),
            "created": report.get("created"), "metrics": metrics}


def _train_tags(ckpt: Path) -> dict[str, str]:
    """Lineage the trainer wrote into the checkpoint manifest (e.g. its data version, stage). An imported
    release's record is left to ``registry.provenance_tags``: one tag per field, not a repr cut at 500 chars."""
    from model.checkpoint import read_manifest

    skip = {"format_version", "dims", "parts", "files", "bundled_base", "libraries", "release"}
    return {f"train.{k}": str(v)[:500] for k, v in read_manifest(ckpt).items() if k not in skip}


def _write(path: str | Path | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def run_register(args: argparse.Namespace, params: "Params") -> int:
    import tempfile

    from components.core import registry
    from components.core.errors import UserError
    from components.core.tracking import setup_mlflow
    from components.evaluate.measure import resolve_checkpoint
    from components.register.publish import publish

    gate = params.gate
    metrics_path = Path(args.metrics or Path(params.evaluate.output) / "metrics.json")
    metrics, report = load_evaluation(metrics_path)
    if args.save_reference:
        _write(args.save_reference, json.dumps(reference_record(metrics, report), indent=2, sort_keys=True) + "\n")
        print(f"wrote the reference record {args.save_reference} (pin it with gate.reference)")
    reference = load_reference(params)
    out_dir = Path(gate.output)
    mlflow = setup_mlflow(params)
    c = registry.client()
    name = params.mlflow.registered_model
    result = check_gate(metrics, gate, learning_checks=report.get("learning_checks"), reference=reference,
                        eval_set_hash=report["eval_set_hash"])
    table = format_table(result)
    record: dict[str, Any] = {"model": name, "eval_set_hash": report["eval_set_hash"],
                              "checkpoint_digest": report["checkpoint_digest"], "gate": result.to_json(),
                              "checkpoint_provenance": report.get("checkpoint_provenance")}
    _write(args.decision_file, "true" if result.passed else "false")
    if not result.passed:
        print(table, file=sys.stderr)
        n = len(result.failures)
        print(f"dynamicid register: gate failed ({n} of {len(result.checks)} criteria), nothing registered:",
              file=sys.stderr)
        for f in result.failures:
            print(f"  - {why(f)}", file=sys.stderr)
        _write(out_dir / "registration.json", json.dumps({**record, "registered": False}, indent=2) + "\n")
        _write(args.version_file, "none")
        return 0 if args.decision_file else 1
    print(table)
    if args.check_only:
        print("gate passed (--check-only: nothing registered)")
        _write(out_dir / "registration.json", json.dumps({**record, "registered": False}, indent=2) + "\n")
        _write(args.version_file, "none")
        return 0

    promote = bool(args.promote or gate.promote)
    aliases = [gate.candidate_alias] + ([gate.champion_alias] if promote else [])
    with tempfile.TemporaryDirectory(prefix="dynamicid-register-") as tmp:
        evaluated = report.get("checkpoint_dir")
        if not (evaluated and Path(evaluated).is_dir()):  # e.g. a models:/ download that is gone
            evaluated = report["checkpoint"]
        ckpt = resolve_checkpoint(args.checkpoint or evaluated, params, Path(tmp))
        if registry.checkpoint_digest(ckpt) != report["checkpoint_digest"]:
            raise UserError(f"checkpoint {ckpt} does not match the evaluated checkpoint (digest differs from "
                            f"{metrics_path.parent}/report.json); evaluate this checkpoint first")
        provenance = registry.checkpoint_provenance(ckpt)  # the evaluated checkpoint's, byte for byte
        record["checkpoint_provenance"] = provenance
        eval_run = (report.get("mlflow") or {}).get("run_id")
        try:
            run_id = c.get_run(eval_run).info.run_id if eval_run else None
        except Exception:  # a run of another tracking store: log the model into a new run
            run_id = None
        tags = {
            **{k: str(report.get(k, "unknown")) for k in ("git_commit", "params_hash", "data_version",
                                                          "eval_set_hash", "profile", "face_backend")},
            "evaluation_run_id": str(eval_run or ""), "gate": "passed",
            "gate_reference": str(reference.get("checkpoint_digest", reference["name"])) if reference else "none",
            **registry.metric_tags(metrics), **_train_tags(ckpt), **registry.provenance_tags(provenance),
        }
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
            try:
                mv = publish(params, ckpt, tags=tags, aliases=aliases,
                             description=registry.provenance_description(provenance))
            except registry.RegistryError as err:
                raise UserError(f"registration failed, no alias moved: {err}") from None
            record.update(registered=True, version=str(mv.version), aliases=aliases, tags=tags,
                          run_id=mv.run_id, source=mv.source)
            _write(out_dir / "registration.json", json.dumps(record, indent=2) + "\n")
            try:  # the version is registered, verified and aliased: this copy of the record is a courtesy
                mlflow.log_artifact(str(out_dir / "registration.json"), artifact_path="registration")
            except Exception as err:  # noqa: BLE001 - e.g. the artefact store went down just now
                log.warning("registered v%s, but could not upload registration.json to the run: %s: %s",
                            mv.version, type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
    _write(args.version_file, str(mv.version))
    print(f"registered {name} v{mv.version} ({', '.join('@' + a for a in aliases)}); "
          f"load it with mlflow.pyfunc.load_model('models:/{name}@{aliases[-1]}')")
    return 0


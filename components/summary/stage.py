"""``dynamicid summary``: what the chain produced, read back from the stages' outputs.

``make run`` ends with it, so that after `dvc repro` a user sees at a glance whether training
learned (loss and the learning checks), what the evaluation measured, which model version is
registered, where the pictures are, and the two commands that serve and call it. It only reads
files named by params.yaml; a stage that has not run yet is reported as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from components.core.metric_catalogue import LEARNING_CHECK_PREFIX

# Evaluation metrics shown first (docs/evaluation.md); the gate's own metrics are added to them.
HEADLINE = ("single.people", "single.detection_rate", "single.id_similarity", "single.id_lift",
            "single.identification_rate", "single.identification_chance", "single.clip_t", "multi2.id_similarity",
            "multi2.confusion_rate", "multi2.missing_rate", "edit.pose_error_gain", "edit.expression_agreement_gain")
SAMPLE_PHOTO = "Tom_Hanks_54745.png"  # a real face photo shipped in the insightface wheel
# components/train/checks.py decides (the interval over held-out people lies above 0); older outputs carry none
VERDICT = {True: "PASS", False: "FAIL", None: "no verdict recorded"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="summarise what the chain produced: losses, learning checks, evaluation, registered model",
        description="Read the outputs of the train, evaluate and register stages (paths from params.yaml) and "
        "print: each training stage's loss and learning check, the headline evaluation metrics and where the "
        "image grids are, the registered model version, and the commands that serve and call it. Reads files "
        "only; stages not run yet are shown as such. `make run` ends with it.",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    p.set_defaults(func=run)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The file's content, None when it does not exist; a damaged file is an error naming it."""
    from components.core.errors import UserError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); rerun the stage that writes it") from None


def _check(metrics: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    if f"{prefix}_gain" not in metrics:
        return None
    return {"gain": metrics[f"{prefix}_gain"], "low": metrics.get(f"{prefix}_gain_low"),
            "high": metrics.get(f"{prefix}_gain_high"), "people": metrics.get(f"{prefix}_gain_people"),
            "passed": None if f"{prefix}_passed" not in metrics else bool(metrics[f"{prefix}_passed"])}


def collect(params) -> dict[str, Any]:
    """The summary as data: one entry per stage, evaluation and registry (None where not run)."""
    from components.evaluate.metrics import flatten_metrics

    stages: dict[str, Any] = {}
    for name in ("base", "anchor", "reconfigure"):
        out = Path(getattr(params.train, name).output)
        m = _read_json(out / "metrics.json")
        skipped = (out / "export" / "skipped.json").exists()
        if m is None:
            stages[name] = {"status": "skipped (the base is the SD1.5 checkpoint)" if skipped else "not run"}
            continue
        entry = {"status": "done", "export": str(out / "export"), "steps": m.get("steps"),
                 "loss_first": m.get("loss_first"), "loss_final": m.get("loss_final"),
                 "pretrained": bool(m.get("pretrained"))}
        prefix = LEARNING_CHECK_PREFIX.get(name)  # the base stage has no learning check
        check = _check(m, prefix) if prefix else None
        if check is not None:
            entry["check"] = check
        stages[name] = entry

    ev_dir = Path(params.evaluate.output)
    nested, report = _read_json(ev_dir / "metrics.json"), _read_json(ev_dir / "report.json") or {}
    evaluation = None
    if nested is not None:
        flat = flatten_metrics(nested)
        keys = list(HEADLINE) + [k for k in (*params.gate.minimums, *params.gate.maximums, *params.gate.interval_above,
                                             *params.gate.max_regression) if k not in HEADLINE]
        not_measured = set(report.get("not_measured", []))
        evaluation = {
            "metrics": {k: flat.get(k) for k in keys if k in flat or k in not_measured},
            "intervals": {k: [flat[f"{k}_low"], flat[f"{k}_high"]] for k in keys
                          if f"{k}_low" in flat and f"{k}_high" in flat},
            "grids": [str(ev_dir / g) for g in report.get("grids", [])],
            "profile": report.get("profile"),
        }

    registration = _read_json(Path(params.gate.output) / "registration.json")
    registered = gate = None
    if registration is not None:
        gate = registration.get("gate")
        if registration.get("registered"):
            registered = {"name": registration.get("model", params.mlflow.registered_model),
                          "version": str(registration.get("version")),
                          "aliases": registration.get("aliases") or [params.gate.candidate_alias]}
    return {"stages": stages, "evaluation": evaluation, "gate": gate, "registered": registered}


def _photo() -> str:
    spec = importlib.util.find_spec("insightface")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        photo = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / SAMPLE_PHOTO
        if photo.exists():
            return str(photo)
    return "PHOTO.png"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "not measured" if v is None else format(v, fmt)


def format_text(s: dict[str, Any], params) -> str:
    lines = ["", "== dynamicid: what the chain produced", "", "training"]
    for name, st in s["stages"].items():
        if st["status"] != "done":
            lines.append(f"  {name:<12} {st['status']}")
            continue
        steps = int(st["steps"]) if st.get("steps") is not None else "?"
        stored = " (the stored base: installed, not trained here)" if st.get("pretrained") else ""
        lines.append(f"  {name:<12} loss {_num(st['loss_first'])} -> {_num(st['loss_final'])} over {steps} steps; "
                     f"export {st['export']}{stored}")
        c = st.get("check")
        if c is not None:
            what = ("own ID tokens beat another person's on unseen people" if name == "anchor"
                    else "IMR beats a shuffled target motion and stays put when asked")
            iv = f" [{c['low']:.3g}, {c['high']:.3g}]" if c.get("low") is not None else ""
            who = f" over {int(c['people'])} held-out people" if c.get("people") else ""
            lines.append(f"  {'':<12} learning check ({what}): gain {c['gain']:.3g}{iv}{who}: "
                         f"{VERDICT[c['passed']]}")
    ev = s["evaluation"]
    lines += ["", "evaluation" + (f" ({params.evaluate.output}/metrics.json)" if ev else "")]
    if ev is None:
        lines.append("  not run")
    else:
        for k, v in ev["metrics"].items():
            iv = ev.get("intervals", {}).get(k)
            lines.append(f"  {k:<34} {_num(v)}" + (f"  95% interval [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else ""))
        if ev.get("profile") == "tiny":
            lines.append("  (tiny profile: 64 px test-bed images read back by dlib; CLIP-T comes from a random CLIP "
                         "and means nothing; docs/evaluation.md)")
        if ev["grids"]:
            lines.append(f"  image grids: {', '.join(ev['grids'])}")
    reg, gate = s["registered"], s.get("gate")
    lines += ["", "registry"]
    if reg is None:
        if gate is not None and not gate.get("passed"):
            from components.evaluate.gate import Check, why

            failed = [Check(**c) for c in gate.get("checks", []) if not c.get("passed")]
            lines.append(f"  nothing registered: the gate rejected the model ({len(failed)} criteria failed; "
                         f"{params.gate.output}/registration.json):")
            lines += [f"    - {why(c)}" for c in failed]
        else:
            lines.append("  nothing registered (run `dynamicid register`)")
        return "\n".join(lines) + "\n"
    aliases = ", ".join(f"@{a}" for a in reg["aliases"])
    uri = f"models:/{reg['name']}@{reg['aliases'][-1]}"
    lines += [f"  {reg['name']} version {reg['version']} ({aliases}; MLflow tracking URI from params or "
              f"$MLFLOW_TRACKING_URI)",
              "", "next",
              f"  dynamicid serve --model-uri {uri} &     # KServe model server on "
              f"{params.serve.host}:{params.serve.http_port}",
              f"  dynamicid infer --prompt \"{params.evaluate.prompts[0]}\" --id-image {_photo()} --out served.png",
              "  dynamicid generate --help                # the same model without a server"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, params) -> int:
    summary = collect(params)
    print(json.dumps(summary, indent=2) if args.json else format_text(summary, params), end="")
    return 0

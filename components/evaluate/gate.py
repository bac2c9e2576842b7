"""The promotion gate: a pure function from an evaluation (metrics with their intervals, the checkpoint's learning
checks) and a fixed reference record to a verdict with one line per criterion, so that it is tested with
explicit numbers and every failure names its value, interval and threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from components.core.metric_catalogue import LEARNING_CHECK_PREFIX

if TYPE_CHECKING:
    from components.core.config.evaluate import GateParams


# How each kind of criterion is written in the table and in the failure lines.
SYMBOLS = {"minimum": ">=", "maximum": "<=", "interval above": "interval >", "vs reference": "vs reference",
           "learning check": "learning check"}


@dataclass
class Check:
    """One gate criterion. margin > 0: passed by that much; margin < 0: failed by that much."""

    metric: str
    check: str                 # "minimum" | "maximum" | "interval above" | "vs reference" | "learning check"
    value: float | None        # the candidate's value (None: not measured)
    limit: float | None        # the bound the value (or its interval) had to meet
    margin: float | None
    passed: bool
    note: str = ""
    low: float | None = None   # the 95 % interval over people, where the metric has one
    high: float | None = None


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)
    reference: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reference": self.reference, "checks": [asdict(c) for c in self.checks]}


def _interval(metrics: dict[str, float | None], name: str) -> tuple[float | None, float | None]:
    return metrics.get(f"{name}_low"), metrics.get(f"{name}_high")


def _bound(metrics: dict[str, float | None], metric: str, limit: float, kind: str) -> Check:
    value = metrics.get(metric)
    low, high = _interval(metrics, metric)
    if value is None:
        return Check(metric, kind, None, limit, None, False, "not measured", low, high)
    margin = value - limit if kind == "minimum" else limit - value
    return Check(metric, kind, value, limit, margin, margin >= 0, "", low, high)


def _above(metrics: dict[str, float | None], metric: str, limit: float) -> Check:
    value = metrics.get(metric)
    low, high = _interval(metrics, metric)
    if value is None:
        return Check(metric, "interval above", None, limit, None, False, "not measured")
    if low is None:
        return Check(metric, "interval above", value, limit, None, False, "no interval (one person or none)")
    margin = low - limit
    note = "" if margin > 0 else f"the interval includes {limit:g}: no effect shown"
    return Check(metric, "interval above", value, limit, margin, margin > 0, note, low, high)


def _learning(stage: str, record: dict[str, Any] | None) -> Check:
    stat = f"{LEARNING_CHECK_PREFIX[stage]}_gain"
    name = f"learning_checks.{stage}"
    if not record:
        return Check(name, "learning check", None, None, None, False,
                     "not run: the checkpoint carries no record (untrained, or not exported by `dynamicid train`)")
    m = record.get("metrics") or {}
    value, low, high = m.get(stat), m.get(f"{stat}_low"), m.get(f"{stat}_high")
    if record.get("weights_match") is False:
        return Check(name, "learning check", value, None, None, False,
                     "measured on other weights than the ones evaluated", low, high)
    if not record.get("passed"):
        why = record.get("reason") or _learning_why(stage, m)
        return Check(name, "learning check", value, 0.0, None if low is None else low, False, why, low, high)
    return Check(name, "learning check", value, 0.0, None if low is None else low, True, "", low, high)


def _learning_why(stage: str, m: dict[str, float]) -> str:
    """The part of a learning check that failed, in words (the checks are defined in docs/training.md)."""
    if stage == "anchor":
        return "own ID tokens do not lower the held-out loss below another person's tokens (id_gain interval)"
    parts = []
    if not m.get("imr_gain_passed"):
        parts.append("the prediction is no closer to the target than with a shuffled target motion (imr_gain)")
    if m.get("imr_stay_ratio_high") is None or m.get("imr_stay_ratio_high", 1.0) >= 1.0:
        parts.append("asking for no change does not stay near the source (imr_stay_ratio)")
    return "; ".join(parts) or "failed"


def check_gate(metrics: dict[str, float | None], gate: "GateParams", *,
               learning_checks: dict[str, dict] | None = None, reference: dict[str, Any] | None = None,
               eval_set_hash: str | None = None) -> GateResult:
    """Every criterion of ``gate`` against an evaluation (flat ``kind.leaf`` metrics with ``_low``/``_high``).

    ``learning_checks`` is report.json's copy of the checkpoint's records (stage -> passed, metrics,
    weights_match). ``reference`` is the fixed reference record ({"name", "eval_set_hash", "metrics"}):
    regression checks are direction-aware (a higher-is-better metric may be at most ``allowed`` below the
    reference, a lower-is-better one at most ``allowed`` above) and need the same evaluation set. A metric the
    candidate did not measure fails every criterion placed on it; a gate with no criteria passes nothing.
    """
    from components.core.metric_catalogue import higher_is_better

    res = GateResult(reference=None if reference is None else str(reference.get("name", "reference")))
    if gate.learning_checks:
        for stage in LEARNING_CHECK_PREFIX:
            res.checks.append(_learning(stage, (learning_checks or {}).get(stage)))
    for metric, limit in sorted(gate.minimums.items()):
        res.checks.append(_bound(metrics, metric, limit, "minimum"))
    for metric, limit in sorted(gate.maximums.items()):
        res.checks.append(_bound(metrics, metric, limit, "maximum"))
    for metric, limit in sorted(gate.interval_above.items()):
        res.checks.append(_above(metrics, metric, limit))
    for metric, allowed in sorted(gate.max_regression.items()):
        value = metrics.get(metric)
        low, high = _interval(metrics, metric)
        if reference is None:
            res.checks.append(Check(metric, "vs reference", value, None, None, False,
                                    "no reference record (gate.reference)", low, high))
            continue
        if eval_set_hash is not None and reference.get("eval_set_hash") != eval_set_hash:
            res.checks.append(Check(metric, "vs reference", value, None, None, False,
                                    f"the reference was measured on evaluation set "
                                    f"{str(reference.get('eval_set_hash'))[:12]}, the candidate on "
                                    f"{eval_set_hash[:12]}", low, high))
            continue
        base = (reference.get("metrics") or {}).get(metric)
        if base is None or value is None:
            res.checks.append(Check(metric, "vs reference", value, None, None, False,
                                    "not measured" if value is None else "the reference has no value", low, high))
            continue
        up = higher_is_better(metric)
        limit = base - allowed if up else base + allowed
        margin = value - limit if up else limit - value
        res.checks.append(Check(metric, "vs reference", value, limit, margin, margin >= 0,
                                f"reference {base:.4f} {'-' if up else '+'} {allowed:g}", low, high))
    return res


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}" if v < 0 else f"{v:.4f}"


def _iv(c: Check) -> str:
    return "-" if c.low is None or c.high is None else f"[{_num(c.low)}, {_num(c.high)}]"


def why(c: Check) -> str:
    """One failed criterion in words: name, value, interval, threshold and what went wrong."""
    sym = SYMBOLS[c.check]
    value = "not measured" if c.value is None else f"{_num(c.value)}"
    iv = f" (95% interval {_iv(c)})" if c.low is not None else ""
    limit = "" if c.limit is None or c.check == "learning check" else f", needs {sym} {_num(c.limit)}"
    note = f": {c.note}" if c.note and c.note != "not measured" else ""
    return f"{c.metric} = {value}{iv}{limit}{note}"


def format_table(result: GateResult) -> str:
    """The gate as a text table: one line per criterion with its interval, failures marked FAIL."""
    if not result.checks:
        return ("gate: no criteria configured (params gate.learning_checks / minimums / maximums / interval_above /"
                " max_regression): nothing passes an empty gate")
    head = ("criterion", "check", "value", "95% interval", "limit", "margin", "result", "note")
    body = []
    for c in result.checks:
        body.append((c.metric, SYMBOLS[c.check], _num(c.value), _iv(c), _num(c.limit), _num(c.margin),
                     "ok" if c.passed else "FAIL", c.note))
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *body])

"""The promotion gate: a pure function from evaluation metrics (and a reference record) to a verdict with
one line per criterion, so that it is tested with explicit numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.core.config.evaluate import GateParams


@dataclass
class Check:
    """One gate check. margin > 0: passed by that much; margin < 0: failed by that much."""

    metric: str
    check: str                 # "minimum" | "maximum" | "vs champion"
    value: float | None        # candidate's value (None: not measured)
    limit: float | None        # the bound the value had to meet
    margin: float | None
    passed: bool
    note: str = ""


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)
    champion_version: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "champion_version": self.champion_version,
                "checks": [asdict(c) for c in self.checks]}


def _bound(metric: str, value: float | None, limit: float, kind: str) -> Check:
    if value is None:
        return Check(metric, kind, None, limit, None, False, "not measured")
    margin = value - limit if kind == "minimum" else limit - value
    return Check(metric, kind, value, limit, margin, margin >= 0)


def check_gate(metrics: dict[str, float | None], gate: "GateParams", champion: dict[str, float] | None = None,
               champion_version: str | None = None) -> GateResult:
    """Every threshold of ``gate`` against ``metrics`` (flat ``kind.leaf`` names).

    Regression checks are direction-aware: for a higher-is-better metric the candidate may be at
    most ``allowed`` below the champion, for a lower-is-better one at most ``allowed`` above. A
    metric the candidate did not measure fails its checks; without a champion, or when the champion
    has no value for a metric, the regression check passes with a note (there is nothing to
    regress against, and the absolute thresholds still apply).
    """
    from components.core.metric_catalogue import higher_is_better

    res = GateResult(champion_version=champion_version)
    for metric, limit in sorted(gate.minimums.items()):
        res.checks.append(_bound(metric, metrics.get(metric), limit, "minimum"))
    for metric, limit in sorted(gate.maximums.items()):
        res.checks.append(_bound(metric, metrics.get(metric), limit, "maximum"))
    for metric, allowed in sorted(gate.max_regression.items()):
        value = metrics.get(metric)
        base = None if champion is None else champion.get(metric)
        if base is None:
            note = "no champion" if champion is None else f"champion v{champion_version} has no value"
            res.checks.append(Check(metric, "vs champion", value, None, None, value is not None,
                                    note if value is not None else "not measured"))
            continue
        up = higher_is_better(metric)
        limit = base - allowed if up else base + allowed
        if value is None:
            res.checks.append(Check(metric, "vs champion", None, limit, None, False, "not measured"))
            continue
        margin = value - limit if up else limit - value
        res.checks.append(Check(metric, "vs champion", value, limit, margin, margin >= 0,
                                f"champion v{champion_version} {base:.4f} {'-' if up else '+'} {allowed:g}"))
    return res


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}" if v < 0 else f"{v:.4f}"


def _why(c: Check) -> str:
    if c.margin is None:
        return f"{c.metric} {c.check}: {c.note}"
    return f"{c.metric} {c.check}: misses {_num(c.limit)} by {abs(c.margin):.4f}"


def format_table(result: GateResult) -> str:
    """The gate as a text table: one line per check, failures marked FAIL with the signed margin."""
    if not result.checks:
        return "gate: no thresholds configured (params gate.minimums / maximums / max_regression)"
    head = ("metric", "check", "value", "limit", "margin", "result", "note")
    body = []
    for c in result.checks:
        sym = {"minimum": ">=", "maximum": "<=", "vs champion": "vs champion"}[c.check]
        body.append((c.metric, sym, _num(c.value), _num(c.limit), _num(c.margin), "ok" if c.passed else "FAIL",
                     c.note))
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *body]]
    return "\n".join(lines)

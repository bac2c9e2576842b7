"""``data_report.json`` and ``histograms.png`` of ``dynamicid prepare``.

The report is built incrementally while samples stream into the shard writer (memory does not
grow with the data set) and holds only facts of the data: no timings, no host names, so that
an interrupted-and-resumed run writes the same bytes as an uninterrupted one and ``dvc metrics
diff`` shows only real changes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# Histogram edges in degrees (values beyond the ends are counted in the end bins).
POSE_EDGES = {
    "yaw": np.arange(-90, 91, 10, dtype=np.float64),
    "pitch": np.arange(-60, 61, 10, dtype=np.float64),
    "roll": np.arange(-60, 61, 10, dtype=np.float64),
}
YAW_BINS = (("|yaw|<10", 0.0, 10.0), ("10<=|yaw|<25", 10.0, 25.0), ("|yaw|>=25", 25.0, float("inf")))


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


class ReportBuilder:
    """Accumulates counts and histograms one sample / reject / detector check at a time."""

    def __init__(self, backend: str):
        self.backend = backend
        self.pose = {k: np.zeros(len(e) - 1, dtype=np.int64) for k, e in POSE_EDGES.items()}
        self.expressions: Counter[str] = Counter()
        self.sources: dict[str, Counter[str]] = {k: Counter() for k in
                                                 ("source", "landmark_source", "pose_source", "expression_source")}
        self.rejects: Counter[str] = Counter()
        self.identities: Counter[str] = Counter()  # identity -> samples
        self.checks: list[tuple[bool, float, str, float | None, float | None]] = []  # bounded by detection_check

    def add_sample(self, meta: dict[str, Any], identity: str) -> None:
        for k, edges in POSE_EDGES.items():
            v = float(np.clip(meta[k], edges[0], edges[-1]))
            self.pose[k][min(int(np.searchsorted(edges, v, side="right")) - 1, len(edges) - 2)] += 1
        self.expressions[meta["expression"]] += 1
        for k, c in self.sources.items():
            c[meta[k]] += 1
        self.identities[identity] += 1

    def add_reject(self, reason: str) -> None:
        self.rejects[reason] += 1

    def add_check(self, check: dict[str, Any]) -> None:
        self.checks.append((check["detected"], check["abs_yaw"], check["expression"], check["iou"],
                            check["embedding_distance"]))

    def detection_summary(self) -> dict[str, Any] | None:
        if not self.checks:
            return None
        hits = [c[0] for c in self.checks]
        ious = [c[3] for c in self.checks if c[3] is not None]
        dists = [c[4] for c in self.checks if c[4] is not None]
        by_yaw = {}
        for name, lo, hi in YAW_BINS:
            sel = [c[0] for c in self.checks if lo <= c[1] < hi]
            by_yaw[name] = {"images": len(sel), "rate": _rate(sum(sel), len(sel))}
        by_expr = {}
        for e in sorted({c[2] for c in self.checks}):
            sel = [c[0] for c in self.checks if c[2] == e]
            by_expr[e] = {"images": len(sel), "rate": _rate(sum(sel), len(sel))}
        return {
            "backend": self.backend,
            "what": "annotated images also run through the detector; a hit = a detected face whose box centre "
                    "lies inside the annotated box",
            "images": len(hits), "detected": int(sum(hits)), "detection_rate": _rate(sum(hits), len(hits)),
            "by_abs_yaw": by_yaw, "by_expression": by_expr,
            "mean_box_iou": round(float(np.mean(ious)), 4) if ious else None,
            "mean_embedding_distance": round(float(np.mean(dists)), 4) if dists else None,
        }

    def finish(self, *, splits: dict[str, str], input_uri: str, files: int, images: int, ignored: int,
               side_files: dict[str, Any], prepare_key: str, settings: dict[str, Any],
               embedding_dim: int) -> dict[str, Any]:
        """The report; ``splits`` maps every accepted identity to its split."""
        accepted = sum(self.identities.values())
        by_split = {s: {"samples": sum(n for i, n in self.identities.items() if splits[i] == s),
                        "identities": sum(1 for i in self.identities if splits[i] == s)}
                    for s in ("train", "val", "test")}
        return {
            "input": input_uri,
            "prepare_key": prepare_key,
            "face_backend": self.backend,
            "embedding_dim": embedding_dim,
            "settings": settings,
            "counts": {"files": files, "images": images, "ignored_files": ignored, "accepted": accepted,
                       "rejected": sum(self.rejects.values()),
                       "identities": len(self.identities)},
            "splits": by_split,
            "rejects": dict(sorted(self.rejects.items())),
            "pose": {k: {"edges_deg": POSE_EDGES[k].astype(int).tolist(), "counts": v.tolist()}
                     for k, v in self.pose.items()},
            "expression": dict(sorted(self.expressions.items())),
            "provenance": {k: dict(sorted(c.items())) for k, c in self.sources.items()},
            "detection_check": self.detection_summary(),
            "side_files": side_files,
        }


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def plot_histograms(report: dict[str, Any], path: Path) -> None:
    """Pose (yaw, pitch, roll), expression, reject-reason and split histograms in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, name in zip(axes[0], ("yaw", "pitch", "roll")):
        h = report["pose"][name]
        edges = np.asarray(h["edges_deg"], dtype=np.float64)
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
        ax.set_title(f"{name} (degrees)")
        ax.set_xlabel("end bins include values beyond the axis" if name == "yaw" else "")
        ax.set_ylabel("samples")

    def bars(ax, counts: dict[str, int], title: str, colour: str) -> None:
        names = list(counts) or ["(none)"]
        ax.bar(range(len(names)), [counts.get(n, 0) for n in names], color=colour)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)

    bars(axes[1][0], report["expression"], "expression", "#55a868")
    bars(axes[1][1], report["rejects"], f"rejects ({report['counts']['rejected']})", "#c44e52")
    bars(axes[1][2], {s: v["samples"] for s, v in report["splits"].items()}, "samples per split", "#8172b2")
    fig.suptitle(f"prepared data: {report['counts']['accepted']} samples, {report['counts']['identities']} identities "
                 f"({report['face_backend']} faces)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)

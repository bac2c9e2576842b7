"""How often does the evaluation's face detector find the face in *real* test-bed photos? (issue 16)

``single.detection_rate`` and every metric read on a detected face can be no better for generated images than the
detector is on the photos they imitate. This reads the evaluation's own analyzer (``build_face_analyzer`` of
``params.face`` and the profile, as ``dynamicid evaluate`` builds it) on the prepared photos, at the resolution
they are stored and generated at, grouped by pose: frontal (|yaw| < 10 and |pitch| < 8 degrees, what an
unedited "a photo of a person" asks for), turned (|yaw| >= 10) and up/down.

    python -m benchmarks.testbed.detect_real [--split test] [--split train --people 6]

Prints one JSON object; ``--params`` and ``-S`` as for ``dynamicid``.
"""

from __future__ import annotations

import json
import sys


def pose_group(yaw: float, pitch: float) -> str:
    if abs(yaw) >= 10:
        return "turned"
    return "up/down" if abs(pitch) >= 8 else "frontal"


def detection_ceiling(analyzer, data, split: str, people: int | None = None) -> dict:
    """-> {"people", "photos", "groups": {pose: {"detected", "photos", "rate"}}, "rate"} over ``split``'s people."""
    groups = data.identities(split)
    names = sorted(groups)[:people] if people else sorted(groups)
    if not names:
        raise ValueError(f"no people in the {split!r} split")
    counts: dict[str, list[int]] = {}
    for who in names:
        for pos in groups[who]:
            s = data.sample(pos)
            c = counts.setdefault(pose_group(s.yaw, s.pitch), [0, 0])
            c[0] += len(analyzer.detect(s.pixels)) > 0
            c[1] += 1
    found, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    return {"people": len(names), "photos": total, "rate": found / total,
            "groups": {k: {"detected": d, "photos": n, "rate": d / n} for k, (d, n) in sorted(counts.items())}}


def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params
    from components.core.shards import PreparedData
    from model.face_analysis.backends import build_face_analyzer

    from benchmarks.testbed.id_signal import reading_parser

    p = reading_parser(__doc__, checkpoint=False)
    p.add_argument("--split", default="test", help="people of this split (test: the evaluation's held-out people)")
    p.add_argument("--people", type=int, default=None, help="at most this many people (default: all)")
    args = p.parse_args(argv)
    params = load_params(args.params, args.overrides)
    analyzer = build_face_analyzer(params.face, params.model.profile)
    out = detection_ceiling(analyzer, PreparedData(params.data.prepared), args.split, args.people)
    json.dump({"split": args.split, "prepared": str(params.data.prepared), **out}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

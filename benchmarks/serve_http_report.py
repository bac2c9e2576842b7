"""The HTTP serving benchmark's targets and its markdown table (benchmarks/serve_http_bench.py).

Kept apart so ``benchmarks.run`` can print the table and check the targets of a saved result
without importing the client side.
"""

from __future__ import annotations

from serving.timing import REPORTED

# issue 19: served p50 at c=1 <= 1.10x the in-process image; best throughput (among concurrencies
# whose p95 stays under 4x the c=1 p50) >= 1.75x the single-request pipeline throughput
TARGETS = {"latency_ratio_max": 1.10, "throughput_ratio_min": 1.75, "p95_over_c1_p50_max": 4.0}


def evaluate(inproc: dict, cells: list[dict]) -> list[dict]:
    """The issue's two targets per protocol/format, against the in-process pipeline of the same run."""
    out = []
    for key in sorted({(c["protocol"], c["format"]) for c in cells}):
        rows = sorted((c for c in cells if (c["protocol"], c["format"]) == key), key=lambda c: c["concurrency"])
        c1 = next((c for c in rows if c["concurrency"] == 1), None)
        name = f"{key[0]} {key[1]}"
        if c1 is None:
            continue
        r = c1["p50_s"] / inproc["p50_s"]
        out.append({"target": f"{name}: served p50 c=1 / in-process image", "measured": round(r, 3),
                    "limit": f"<= {TARGETS['latency_ratio_max']}", "met": r <= TARGETS["latency_ratio_max"]})
        ok = [c for c in rows if c["p95_s"] < TARGETS["p95_over_c1_p50_max"] * c1["p50_s"]]
        best = max(ok, key=lambda c: c["images_per_s"]) if ok else None
        t = best["images_per_s"] / inproc["images_per_s"] if best else 0.0
        out.append({"target": f"{name}: best throughput (c={best['concurrency'] if best else '-'}, p95 < 4x c=1 p50) "
                              "/ pipeline", "measured": round(t, 3),
                    "limit": f">= {TARGETS['throughput_ratio_min']}", "met": t >= TARGETS["throughput_ratio_min"]})
    return out


def markdown(result: dict) -> str:
    env, inp = result["env"], result["in_process"]
    lines = [f"Served speed, {env['size']} model, {env['res']} px, {env['steps']} steps, {env['ids']} id, "
             f"max batch {env['max_batch']}, {env['device']} ({env.get('gpu', 'no GPU')}), {env['date_utc']}",
             f"`{env['command']}`", "",
             f"In process: pipeline p50 {inp['p50_s']:.3f} s ({inp['images_per_s']:.2f} img/s), "
             f"p95 {inp['p95_s']:.3f} s; PNG encode {inp['png_encode_ms']:.1f} ms", "",
             "| protocol | image | c | p50 s | p95 s | img/s | x pipeline | mean batch | GPU busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        busy = "n/a" if c["gpu_busy"] is None else f"{c['gpu_busy']:.0%}"
        lines.append(f"| {c['protocol']} | {c['format']} | {c['concurrency']} | {c['p50_s']:.3f} | {c['p95_s']:.3f} | "
                     f"{c['images_per_s']:.2f} | {c['images_per_s'] / inp['images_per_s']:.2f} | {c['mean_batch']} | "
                     f"{busy} |")
    lines += ["", "Server phases, mean ms per request (serving/timing.py):", "",
              "| protocol | image | c | " + " | ".join(REPORTED) + " |", "|---" * (3 + len(REPORTED)) + "|"]
    for c in result["cells"]:
        lines.append(f"| {c['protocol']} | {c['format']} | {c['concurrency']} | "
                     + " | ".join(f"{c['phases_ms'][p]:.1f}" for p in REPORTED) + " |")
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['limit']} | {'PASS' if t['met'] else 'FAIL'} |"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"


__all__ = ["TARGETS", "evaluate", "markdown"]

"""Run the identity-injection benchmark: ``python -m benchmarks.run --out DIR`` (see docs/benchmarks.md).

Sections (all in one run, on one GPU): ``step`` (UNet step time + peak memory, with the fast
path's correctness checks), ``image`` (whole-image latency), ``train`` (stage-1 images/s and
peak memory), ``serve`` (a running server, if given; else engine + batcher in process), ``serve_http``
(the real server over HTTP next to the pipeline in process, benchmarks/serve_http_bench.py; not in the
default list: it starts a server). Prints one table last and writes
``DIR/benchmark.json`` (rewritten after every section, so a cut-off run keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

TARGETS = {
    "step_ratio_max": 1.05,
    "release_speedup_768_min": 2.5,
    "step_memory_ratio_max": 1.05,
    "image_ratio_max": 1.10,
    "train_speed_ratio_min": 1.6,
    "train_memory_ratio_max": 0.25,
    "train_images_per_s_min": 45.0,   # issue 4: H100, SD1.5 size, 512 px, batch 8, bf16
    "train_peak_gib_max": 13.0,
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for benchmark.json and table.txt")
    p.add_argument("--size", choices=("sd15", "smoke", "tiny"), default="sd15",
                   help="smoke: toy widths, for a CPU dry run; tiny: the embedded profile (serve_http only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="step,image,train,serve")
    p.add_argument("--res", type=_ints, default=[512, 768], help="step resolutions (px)")
    p.add_argument("--ids", type=_ints, default=[1, 2, 4], help="identity counts for the SAA step")
    p.add_argument("--reps", type=int, default=60, help="timed graph replays per step variant")
    p.add_argument("--warmup", type=int, default=10, help="untimed replays before timing")
    p.add_argument("--image-reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="denoising steps per whole image")
    p.add_argument("--image-res", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--train-warmup", type=int, default=3)
    p.add_argument("--train-profile", action="store_true", help="write torch.profiler tables of the training steps")
    p.add_argument("--train-checkpointing", default="high_res",
                   help="comma list of train.gradient_checkpointing modes timed with the compiled UNet "
                        "(true, high_res; empty = none)")
    p.add_argument("--no-train-compile", action="store_true",
                   help="time the shipped trainer with an eager UNet (train.compile_unet: off): "
                   "skips minutes of compiling")
    p.add_argument("--image-profile", action="store_true", help="write torch.profiler tables of whole images")
    p.add_argument("--no-ablations", action="store_true", help="skip the eager-gate step variant")
    p.add_argument("--no-checks", action="store_true")
    p.add_argument("--release-import", action="store_true",
                   help="step section: SAA weights from a checkpoint imported from random release-layout files "
                   "(benchmarks/release_weights.py, issue 18)")
    p.add_argument("--compile-probe", action="store_true", help="also time a torch.compile'd UNet (slow to build)")
    p.add_argument("--server-url", default=None)
    p.add_argument("--server-payload", default=None)
    p.add_argument("--server-requests", type=int, default=20)
    p.add_argument("--server-concurrency", type=int, default=2)
    p.add_argument("--serve-levels", type=_ints, default=[1, 4, 8],
                   help="in-process serving (no --server-url): closed-loop client counts")
    p.add_argument("--serve-requests", type=int, default=6, help="in-process serving: requests per client")
    p.add_argument("--serve-max-batch", type=int, default=8, help="in-process serving: the batcher's max batch")
    p.add_argument("--http-levels", type=_ints, default=[1, 2, 4, 8, 16], help="serve_http: client concurrencies")
    p.add_argument("--http-requests", type=int, default=16,
                   help="serve_http: timed requests per cell (at least --http-min-per-client per client)")
    p.add_argument("--http-min-per-client", type=int, default=3, help="serve_http: closed-loop requests per client")
    p.add_argument("--http-protocols", default="v1,v2")
    p.add_argument("--http-formats", default="png,jpeg", help="serve_http: how the reference photo is sent")
    p.add_argument("--http-ids", type=int, default=1)
    p.add_argument("--http-max-batch", type=int, default=8, help="serve_http: serve.max_batch_size")
    p.add_argument("--http-reps", type=int, default=10, help="serve_http: in-process pipeline images timed")
    return p.parse_args(argv)


def environment(device: torch.device, argv: list[str]) -> dict:
    import diffusers
    import transformers

    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "cuda": torch.version.cuda, "device": str(device),
        # the device's $OUT is a path of that machine only: the command is recorded as it would be typed again
        "command": "python -m benchmarks.run " + " ".join("$OUT" if a and a == os.environ.get("OUT") else a
                                                          for a in argv),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(gpu=prop.name, gpu_memory_gib=round(prop.total_memory / (1 << 30), 1),
                   sm_count=prop.multi_processor_count, cudnn=torch.backends.cudnn.version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


# --------------------------------------------------------------------------- targets


def _median(rows: list[dict], section: str, variant: str, res, ids: int, key: str = "median_ms"):
    for r in rows:
        if r.get("section") == section and r.get("variant") == variant and r.get("res") == res and r.get("ids") == ids:
            return r.get(key)
    return None


def _base(rows: list[dict], res: int, key: str, cl: bool) -> float | None:
    """Mean of the two base measurements (start and end of the resolution) in one weight layout."""
    names = ("base [cl]", "base [cl] (again)") if cl else ("base", "base (again)")
    vals = [v for v in (_median(rows, "step", n, res, 0, key) for n in names) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _base_for(rows: list[dict], row: dict, key: str) -> float | None:
    if row.get("section") == "step_eager":
        return _median(rows, "step_eager", "base", row["res"], 0, key)
    return _base(rows, row["res"], key, "[cl]" in row["variant"])


def evaluate(results: dict) -> list[dict]:
    """Every target with its measured value, limit and verdict (None where not measured)."""
    rows = results.get("rows", [])
    out = []

    def add(name: str, value, limit, ok, note: str = "") -> None:
        out.append({"target": name, "measured": None if value is None else round(value, 4), "limit": limit,
                    "met": None if value is None else bool(ok), "note": note})

    def ratio(a, b):
        return a / b if a and b else None

    for res in sorted({r["res"] for r in rows if r.get("section") == "step"}):
        for n in results.get("ids", []):
            r = ratio(_median(rows, "step", "saa fast [cl]", res, n), _base(rows, res, "median_ms", True))
            add(f"step {res}px {n} id: SAA / base [fast path, cl]", r, f"<= {TARGETS['step_ratio_max']}",
                r is not None and r <= TARGETS["step_ratio_max"])
        for n in results.get("ids", []):
            r = ratio(_median(rows, "step", "saa fast", res, n), _base(rows, res, "median_ms", False))
            add(f"step {res}px {n} id: SAA / base [contiguous]", r, f"<= {TARGETS['step_ratio_max']}",
                r is not None and r <= TARGETS["step_ratio_max"])
        for n in results.get("ids", []):
            m = ratio(_median(rows, "step", "saa fast [cl]", res, n, "peak_gib"), _base(rows, res, "peak_gib", True))
            add(f"step {res}px {n} id: peak memory SAA / base", m, f"<= {TARGETS['step_memory_ratio_max']}",
                m is not None and m <= TARGETS["step_memory_ratio_max"])
        if res == 768:
            for n in (1, 2):
                r = ratio(_median(rows, "step", "release design", res, n), _median(rows, "step", "saa fast", res, n))
                add(f"step 768px {n} id: release design / SAA [contiguous]", r,
                    f">= {TARGETS['release_speedup_768_min']}",
                    r is not None and r >= TARGETS["release_speedup_768_min"])
                r = ratio(_median(rows, "step", "release design", res, n),
                          _median(rows, "step", "saa fast [cl]", res, n))
                add(f"step 768px {n} id: release design / SAA [fast path, cl]", r,
                    f">= {TARGETS['release_speedup_768_min']}",
                    r is not None and r >= TARGETS["release_speedup_768_min"])
                m = ratio(_median(rows, "step", "release design", res, n, "peak_gib"),
                          _median(rows, "step", "saa fast [cl]", res, n, "peak_gib"))
                add(f"step 768px {n} id: release design / SAA peak memory (info)", m, "-", True)
    img_res = results.get("image_res")
    r = ratio(_median(rows, "image", "fast path", img_res, 1), _median(rows, "image", "fast path", img_res, 0))
    add(f"whole image {img_res}px 1 id: fast / base (both fast path)", r, f"<= {TARGETS['image_ratio_max']}",
        r is not None and r <= TARGETS["image_ratio_max"])
    train = {r["variant"]: r for r in rows if r.get("section") == "train"}
    shipped = train.get("project SAA")  # the trainer as shipped (cached frozen features)
    if shipped:
        add("stage-1 trainer (as shipped): images/s", shipped["images_per_s"],
            f">= {TARGETS['train_images_per_s_min']}", shipped["images_per_s"] >= TARGETS["train_images_per_s_min"])
        if shipped.get("peak_gib"):
            add("stage-1 trainer (as shipped): peak GiB", shipped["peak_gib"], f"<= {TARGETS['train_peak_gib_max']}",
                shipped["peak_gib"] <= TARGETS["train_peak_gib_max"])
    pairs = (("project SAA", "release design", "trainer vs release, bf16"),
             ("project SAA", "release design (autocast)", "trainer vs release in autocast"),
             ("project SAA, encoders every step", "release design", "both encoders every step"),
             ("project SAA", "release design, frozen features cached", "both cached"),
             ("project SAA, eager UNet", "release design", "trainer, eager UNet vs release"),
             ("project SAA, eager UNet, gradient checkpointing", "release design", "eager + checkpointing vs release"),
             ("project SAA, high_res checkpointing", "release design", "trainer + high_res checkpointing vs release"),
             ("project SAA, gradient checkpointing", "release design", "trainer + full checkpointing vs release"))
    for mine, theirs, label in pairs:
        p, rel = train.get(mine), train.get(theirs)
        if not (p and rel):
            continue
        r = p["images_per_s"] / rel["images_per_s"]
        add(f"stage-1 ({label}): images/s ratio", r, f">= {TARGETS['train_speed_ratio_min']}",
            r >= TARGETS["train_speed_ratio_min"])
        if p.get("peak_gib") and rel.get("peak_gib"):
            m = p["peak_gib"] / rel["peak_gib"]
            add(f"stage-1 ({label}): peak memory ratio", m, f"<= {TARGETS['train_memory_ratio_max']}",
                m <= TARGETS["train_memory_ratio_max"])
    for t in results.get("serve_http", {}).get("targets", []):
        add(f"served {t['target']}", t["measured"], t["limit"], t["met"])
    for name, check in results.get("checks", {}).items():
        add(f"check {name}: max rel err", check.get("max_rel_err"), f"< {check.get('tolerance')}",
            check.get("passed"))
    return out


# --------------------------------------------------------------------------- table


def table(results: dict) -> str:
    rows = results.get("rows", [])
    lines = []
    env = results.get("env", {})
    lines.append(f"# {env.get('gpu', env.get('device'))} | torch {env.get('torch')} | diffusers {env.get('diffusers')}"
                 f" | transformers {env.get('transformers')} | {env.get('date_utc')}")
    lines.append(f"{'section':<10} {'variant':<46} {'res':>4} {'ids':>3} {'median ms':>10} {'x base':>7} "
                 f"{'peak GiB':>9} {'x base':>7}")
    for r in rows:
        sec = r.get("section")
        if sec in ("step", "step_eager"):
            base_ms, base_mem = _base_for(rows, r, "median_ms"), _base_for(rows, r, "peak_gib")
            x = f"{r['median_ms'] / base_ms:7.3f}" if base_ms else f"{'':>7}"
            pk = r.get("peak_gib")
            xm = f"{pk / base_mem:7.3f}" if pk and base_mem else f"{'':>7}"
            pks = f"{pk:9.3f}" if pk else f"{'':>9}"
            lines.append(f"{sec:<10} {r['variant']:<46} {r['res']:>4} {r['ids']:>3} {r['median_ms']:>10.3f} "
                         f"{x} {pks} {xm}")
        elif sec == "image":
            base = _median(rows, "image", r["variant"], r["res"], 0)
            x = f"{r['median_ms'] / base:7.3f}" if base else f"{'':>7}"
            lines.append(f"{sec:<10} {r['variant'] + ', ' + str(r['steps']) + ' steps':<46} {r['res']:>4} "
                         f"{r['ids']:>3} {r['median_ms']:>10.1f} {x}")
        elif sec == "train":
            rel = next((x for x in rows if x.get("section") == "train" and x["variant"] == "release design"), None)
            xs = f"{r['images_per_s'] / rel['images_per_s']:7.3f}" if rel else f"{'':>7}"
            xm = f"{r['peak_gib'] / rel['peak_gib']:7.3f}" if rel and r.get("peak_gib") else f"{'':>7}"
            lines.append(f"{sec:<10} {r['variant'] + ' (' + str(r['images_per_s']) + ' img/s)':<56} {r['res']:>4} "
                         f"{'':>3} {r['step_ms']:>10.1f} {xs} {str(r.get('peak_gib')):>9} {xm}")
    serve = results.get("serve")
    if serve and serve.get("levels"):
        lines.append(f"serve      {serve['mode']}, {serve['res']} px, {serve['steps']} steps, 1 id, max batch "
                     f"{serve['max_batch']}, fast path {serve['fast_path']} (excluded: {serve['excluded']})")
        for lv in serve["levels"]:
            lines.append(f"serve      concurrency {lv['concurrency']:>2}: p50 {lv['p50_s']:.3f} s, "
                         f"p95 {lv['p95_s']:.3f} s, {lv['images_per_s']:.2f} img/s, mean batch {lv['mean_batch']} "
                         f"({lv['requests']} requests)")
    elif serve:
        lines.append(f"serve      {serve.get('status')}: {serve.get('reason') or serve}")
    if results.get("serve_http"):
        from benchmarks.serve_http_report import markdown

        lines.append(markdown(results["serve_http"]).rstrip())
    for key in ("image_info", "train_info"):
        if results.get(key):  # profiles are long: they are in the log and benchmark.json
            shown = {k: v for k, v in results[key].items() if not k.startswith("gpu_profile")}
            lines.append(f"{key}: {shown}")
    lines.append("")
    lines.append(f"{'target':<66} {'measured':>9} {'limit':>8}  met")
    for t in evaluate(results):
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        val = "" if t["measured"] is None else f"{t['measured']:.4f}"
        lines.append(f"{t['target']:<66} {val:>9} {t['limit']:>8}  {met}")
    for name, err in results.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {err.strip().splitlines()[-1] if err else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results: dict = {"env": environment(device, argv), "ids": args.ids, "image_res": args.image_res,
                     "targets": TARGETS, "rows": [], "checks": {}, "errors": {}}

    def save() -> None:
        results["evaluation"] = evaluate(results)
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        (out / "benchmark.json").write_text(json.dumps(results, indent=2, default=str))

    def section(name: str, fn) -> None:
        try:
            fn()
        except Exception:  # a failed section is reported; the others still run
            results["errors"][name] = traceback.format_exc()
            log(f"section {name} FAILED:\n{results['errors'][name]}")
        save()

    log(f"environment: {results['env']}")
    if "step" in sections:
        from benchmarks.step_bench import StepBench

        rank = 128 if args.size == "sd15" else 4
        saa_weights = None
        if args.release_import:
            from benchmarks.release_weights import imported_release_checkpoint
            from model.checkpoint import load_parts

            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # ~250 MB at SD1.5 size: not a result to keep
                manifest, parts = load_parts(imported_release_checkpoint(args.size, Path(tmp) / "ckpt"))
            saa_weights = parts["saa"]
            results["release_import"] = {k: manifest["release"][k] for k in ("layout_version", "sources")}
            log(f"step section: SAA weights imported from release-layout files ({len(saa_weights)} tensors)")
        bench = StepBench(args.size, device, args.reps, args.warmup, rank, log, saa_weights)

        def step() -> None:
            try:
                bench.run(args.res, args.ids, do_checks=not args.no_checks, ablations=not args.no_ablations)
            finally:
                results["rows"].extend(bench.rows)
                results["checks"].update(bench.checks)
                bench.rows.clear()

        section("step", step)
        del bench
    if "image" in sections:
        from benchmarks.image_bench import run_images

        def image() -> None:
            rows, info = run_images(args.size, device, args.image_reps, args.steps, args.image_res, log, out,
                                    profile=args.image_profile)
            results["rows"].extend(rows)
            results["image_info"] = info
        section("image", image)
    if "train" in sections:
        from benchmarks.train_bench import run_training

        def train() -> None:
            rows, info = run_training(args.size, device, args.train_batch, 512 if args.size == "sd15" else 64,
                                      args.train_steps, args.train_warmup, log,
                                      profile_dir=out if args.train_profile else None,
                                      compile_unet=not args.no_train_compile,
                                      compiled_checkpointing=tuple(m for m in args.train_checkpointing.split(",")
                                                                   if m))
            results["rows"].extend(rows)
            results["train_info"] = info
        section("train", train)
    if "serve" in sections:
        from benchmarks.serve_bench import run_serving

        def serve() -> None:
            if args.server_url:
                results["serve"] = run_serving(args.server_url, args.server_payload, args.server_requests,
                                               args.server_concurrency)
            else:  # the project's engine + batcher in this process (no HTTP)
                from benchmarks.serve_bench import run_inprocess

                results["serve"] = run_inprocess(args.size, device, args.serve_levels, args.serve_requests,
                                                 args.steps, args.image_res, log, max_batch=args.serve_max_batch)
        section("serve", serve)
    if "serve_http" in sections:
        from benchmarks.serve_http_bench import run_serve_http

        def serve_http() -> None:
            results["serve_http"] = run_serve_http(
                args.size, args.device, args.http_levels, args.http_requests, args.steps, args.image_res, args.http_ids,
                args.http_protocols.split(","), args.http_formats.split(","), args.http_max_batch, args.http_reps, out,
                log, command=results["env"]["command"], min_per_client=args.http_min_per_client)
        section("serve_http", serve_http)
    if args.compile_probe and device.type == "cuda":  # last: building it takes minutes
        from benchmarks.step_bench import StepBench

        def probe() -> None:
            bench = StepBench(args.size, device, args.reps, args.warmup, 128 if args.size == "sd15" else 4, log)
            try:
                bench.compile_probe(args.res[0])
            finally:
                results["rows"].extend(bench.rows)
        section("compile_probe", probe)
    save()
    text = table(results)
    (out / "table.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())

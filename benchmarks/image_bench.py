"""Whole-image latency: DynamicIDPipeline, 30 DDIM steps + VAE decode + identity encoding.

The pipeline is the project's own (model/pipeline.py) on SD1.5-size random-weight models.
Face analysis (detector + ArcFace, insightface/onnxruntime) needs downloaded model packs, so
a stand-in analyzer returns a fixed face record instantly; everything after it runs for
real per request: crop, CLIP ViT-H/14 image features, face encoder, prompt encoding,
denoising and decoding. The base model's image is the same pipeline with no identities.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from benchmarks.checks import rel_err
from benchmarks.sd15 import build_backbone, model_params
from benchmarks.timing import GIB, free, time_wall
from model.face_analysis.face import Face


class InstantAnalyzer:
    """Stand-in for insightface: one centred face with 106 landmarks and a unit embedding."""

    def __init__(self, dim: int = 512, seed: int = 0):
        g = np.random.default_rng(seed)
        self.embedding = g.standard_normal(dim).astype(np.float32)
        self.embedding /= np.linalg.norm(self.embedding)
        self.unit_landmarks = g.uniform(0.25, 0.75, size=(106, 2)).astype(np.float32)

    def _face(self, h: int, w: int, bbox: np.ndarray) -> Face:
        x0, y0, x1, y1 = bbox
        lmk = self.unit_landmarks * np.array([x1 - x0, y1 - y0], np.float32) + np.array([x0, y0], np.float32)
        kps = lmk[:5].copy()
        return Face(bbox=bbox, kps=kps, landmarks=lmk, embedding=self.embedding.copy(), score=1.0, pose=(0.0, 0.0, 0.0))

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [self._face(h, w, np.array([w * 0.25, h * 0.2, w * 0.75, h * 0.8], np.float32))]

    def analyze_aligned(self, crop: np.ndarray) -> Face:
        h, w = crop.shape[:2]
        return self._face(h, w, np.array([0, 0, w, h], np.float32))

    def embed_aligned(self, crop: np.ndarray) -> np.ndarray:
        return self.embedding.copy()


def build_pipeline(size: str, device: torch.device):
    from model.config import FaceParams
    from model.dynamicid import build_dynamicid
    from model.pipeline import DynamicIDPipeline
    from model.saa.install import merge_lora

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backbone = build_backbone(size, device, dtype)
    params = model_params(size)
    dyn = build_dynamicid(backbone, params, "insightface")
    merge_lora(backbone.unet)
    dyn.to(device=device, dtype=dtype)
    pipe = DynamicIDPipeline.from_backbone(backbone, dyn, params, FaceParams(), face_analyzer=InstantAnalyzer())
    pipe.set_progress(False)
    return pipe


@torch.no_grad()
def encoding_breakdown(pipe, ident, device: torch.device, reps: int) -> dict:
    """Where one identity's encoding time goes: CPU analysis (crop, landmarks, prompt), CLIP, face encoder."""
    from model.dynamicid import clip_image_features

    a = pipe._analyse(ident, "identity 0")
    crops = a["crop"][None].to(device)
    feats = clip_image_features(pipe.backbone, crops)
    fe = pipe.dynamicid.face_encoder
    dtype = next(fe.parameters()).dtype
    emb = torch.as_tensor(a["embedding"])[None].to(device, dtype)
    parts = {
        "analyse_cpu": lambda: pipe._analyse(ident, "identity 0"),
        "clip_image_features": lambda: clip_image_features(pipe.backbone, crops),
        "face_encoder": lambda: fe(emb, feats.to(dtype)),
        "text_embeddings_2_prompts": lambda: _text(pipe),  # paid by the base image too
    }
    return {k: round(time_wall(fn, device, reps, warmup=2).median_ms, 3) for k, fn in parts.items()}


def _text(pipe) -> None:
    from model.dynamicid import text_embeddings

    text_embeddings(pipe.backbone, ["a photo of a person in a park"])
    text_embeddings(pipe.backbone, [""])


def profile_call(fn, path: Path, repeat: int = 3) -> None:
    """cProfile of a host-visible call (where host time goes: Python work, launches, waits on the GPU)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(15)
    path.write_text(buf.getvalue())


def profile_gpu(fn, path: Path, label: str) -> dict:
    """torch.profiler over one call: where the GPU idles, and which phase the host was in then.

    The pipeline names its phases (``dynamicid.*`` record_function ranges); for each phase the
    report gives its host duration, the GPU's busy time inside it and the idle time, plus the
    longest idle gaps with the host operations that were running while the GPU waited. Writes
    the operator tables (appended to ``path`` under ``label``) and the Chrome trace
    (``<path stem>_<label>.trace.json.gz``).
    """
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    gpu = sum(e.self_device_time_total for e in kernels) / 1e3
    with open(path, "a") as fh:
        fh.write(f"==== {label}\n" + events.table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
                 + events.table(sort_by="self_device_time_total", row_limit=30) + "\n\n")
    trace = path.with_name(f"{path.stem}_{label}.trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    report = {"wall_ms_profiled": round(wall, 1), "gpu_kernel_ms": round(gpu, 1),
              "kernels": int(sum(e.count for e in kernels))}
    report.update(idle_by_phase(spans_from_profiler(prof.events())))
    return report


class Span(NamedTuple):
    """One timed thing of a profile on the profiler's common clock (microseconds)."""

    name: str
    on_gpu: bool
    start: float
    end: float


PHASE = "dynamicid."  # prefix of the pipeline's record_function ranges


def spans_from_profiler(events) -> list[Span]:
    """``prof.events()`` -> spans. Device activity = kernels, copies and memsets; user annotations
    also appear on the GPU timeline (spanning their kernels) and are not GPU work."""
    out = []
    for e in events:
        on_gpu = e.device_type.name == "CUDA"
        if on_gpu and (getattr(e, "is_user_annotation", False) or e.name.startswith(PHASE)):
            continue
        out.append(Span(e.name, on_gpu, e.time_range.start, e.time_range.end))
    return out


def spans_from_trace(path: Path) -> list[Span]:
    """A Chrome trace written by ``profile_gpu`` (``.json`` or ``.json.gz``) -> spans."""
    import gzip
    import json

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    gpu = {"kernel", "gpu_memcpy", "gpu_memset"}
    host = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}
    return [Span(e["name"], e["cat"] in gpu, float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events if e.get("ph") == "X" and e.get("cat") in gpu | host]


def _busy(intervals: list[tuple[float, float]], bridge_us: float) -> list[tuple[float, float]]:
    """Merge device intervals; gaps shorter than ``bridge_us`` (the GPU moving from one kernel of a
    graph replay to the next, ~1 us each) count as busy: they are not the host's doing."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1] + bridge_us:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _overlap(busy: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(e, b) - max(s, a)) for s, e in busy)


def idle_by_phase(spans: list[Span], top: int = 8, bridge_us: float = 10.0) -> dict:
    """GPU busy/idle time per pipeline phase and the longest idle gaps (ms).

    Idle = the GPU has nothing to run for ``bridge_us`` or longer while the call is under way:
    the host is the critical path there (Python work, a synchronisation, a pageable copy). The
    call spans its first to its last host event.
    """
    device = [x for x in spans if x.on_gpu]
    host = [x for x in spans if not x.on_gpu]
    if not device or not host:
        return {}
    busy = _busy([(x.start, x.end) for x in device], bridge_us)
    call = (min(x.start for x in host), max(x.end for x in host))
    phase_spans = [x for x in host if x.name.startswith(PHASE)]
    phases: dict[str, dict] = {}
    for x in phase_spans:
        ph = phases.setdefault(x.name, {"host_ms": 0.0, "gpu_busy_ms": 0.0, "gpu_idle_ms": 0.0, "calls": 0})
        inside = _overlap(busy, x.start, x.end)
        ph["host_ms"] += (x.end - x.start) / 1e3
        ph["gpu_busy_ms"] += inside / 1e3
        ph["gpu_idle_ms"] += (x.end - x.start - inside) / 1e3
        ph["calls"] += 1
    gaps, cursor = [], call[0]
    for a, b in busy + [(call[1], call[1])]:
        if a > cursor:
            gaps.append((cursor, min(a, call[1])))
        cursor = max(cursor, b)
    ops = [x for x in host if not x.name.startswith(PHASE)]
    longest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        mid = (a + b) / 2
        during = sorted((x for x in ops if x.start <= mid <= x.end), key=lambda x: x.end - x.start)
        phase = [x for x in phase_spans if x.start <= mid <= x.end]
        longest.append({"ms": round((b - a) / 1e3, 3), "at_ms": round((a - call[0]) / 1e3, 2),
                        "phase": min(phase, key=lambda x: x.end - x.start).name if phase else "-",
                        "host_ops": [x.name for x in during[:3]]})
    idle = (call[1] - call[0] - _overlap(busy, *call)) / 1e3
    return {"call_ms": round((call[1] - call[0]) / 1e3, 2), "gpu_idle_ms": round(idle, 2),
            "phases": {k: {m: round(v, 3) if isinstance(v, float) else v for m, v in d.items()}
                       for k, d in phases.items()},
            "longest_idle_gaps": longest}


def sync_sites(fn) -> dict[str, int]:
    """Host<->GPU synchronisations of one call, counted per calling line (project, then library).

    Uses ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising call warns from inside
    the Python frame that made it, so the stack at that moment names the line.
    """
    import collections
    import traceback
    import warnings

    counts: collections.Counter = collections.Counter()
    roots = ("/model/", "/serving/", "/components/", "/benchmarks/")

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if any(r in f.filename for r in roots) and "timing.py" not in f.filename]
        lib = [f for f in frames if "site-packages" in f.filename and "/torch/" not in f.filename]
        f = (ours or lib or frames)[-1]
        counts[f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.line or ''}".strip()] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(counts.most_common())


def _profile_images(image, cases: dict, out: Path, info: dict, log: Callable) -> None:
    """GPU timeline, idle time per phase and synchronisation sites of one fast-path image per identity count."""
    for n in (0, 1, 2):
        report = profile_gpu(lambda n=n: image(cases[n]), Path(out) / "profile_gpu_fast_image.txt", f"{n}id")
        report["sync_sites"] = sync_sites(lambda n=n: image(cases[n]))
        info[f"gpu_profile_fast_{n}id"] = report
        log(f"image fast path ids={n}: wall {report['wall_ms_profiled']} ms (profiled), GPU kernels "
            f"{report['gpu_kernel_ms']} ms, GPU idle {report.get('gpu_idle_ms')} ms")
        for name, ph in report.get("phases", {}).items():
            log(f"    {name:<30} host {ph['host_ms']:8.2f} ms  GPU busy {ph['gpu_busy_ms']:8.2f}  "
                f"idle {ph['gpu_idle_ms']:7.2f}")
        for gap in report.get("longest_idle_gaps", []):
            log(f"    idle {gap['ms']:6.2f} ms at {gap['at_ms']:7.2f} ms in {gap['phase']}: {gap['host_ops']}")
        for site, count in report["sync_sites"].items():
            log(f"    sync x{count}: {site}")


def run_images(size: str, device: torch.device, reps: int, steps: int, res: int, log: Callable,
               out: Path | None = None, profile: bool = False) -> tuple[list, dict]:
    from model.fast.enable import enable_fast_path
    from model.pipeline import IdentityInput

    pipe = build_pipeline(size, device)
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 255, size=(400, 360, 3), dtype=np.uint8) for _ in range(2)]
    prompt = "a photo of a person in a park"
    cases = {0: [], 1: [IdentityInput(image=photos[0])],
             2: [IdentityInput(image=photos[0], bbox=(0.1, 0.0, 0.9, 0.5)),
                 IdentityInput(image=photos[1], bbox=(0.1, 0.5, 0.9, 1.0))]}
    rows: list[dict] = []
    info: dict = {}

    def image(ids):
        return pipe(prompt, ids, num_inference_steps=steps, height=res, width=res, seed=0)

    def measure(variant: str, n: int, fn) -> None:
        stats = time_wall(fn, device, reps, warmup=2)
        rows.append({"section": "image", "variant": variant, "res": res, "ids": n, "steps": steps, **stats.as_dict()})
        log(f"image {variant:<24} ids={n}: {stats.median_ms:9.1f} ms")

    for n in (0, 1):
        measure("eager", n, lambda n=n: image(cases[n]))
    eager_pt = pipe(prompt, cases[2], num_inference_steps=steps, height=res, width=res, seed=0, output_type="pt").images
    with torch.no_grad():
        enc = time_wall(lambda: pipe.encode_identities(cases[1]), device, reps, warmup=2)
        latents = torch.randn(1, 4, res // 8, res // 8, device=device, dtype=pipe.vae.dtype)
        dec = time_wall(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor), device, reps, warmup=2)
    info["identity_encoding_ms_1id"] = round(enc.median_ms, 3)
    info["vae_decode_ms"] = round(dec.median_ms, 3)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fast = enable_fast_path(pipe, mode="cuda_graphs", buckets=[(res, res, 0), (res, res, 1), (res, res, 2)])
        info.update(fast_path_load_s=round(fast.load_seconds, 2), fast_path_graphs=fast.runner.captures,
                    fast_path_gate=fast.gate, fast_path_channels_last=fast.channels_last,
                    fast_path_graphed_encoders=len(fast.graphed))
        for n in (0, 1, 2):
            measure("fast path", n, lambda n=n: image(cases[n]))
        info["fast_path_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        fast_pt = pipe(prompt, cases[2], num_inference_steps=steps, height=res, width=res, seed=0,
                       output_type="pt").images
        info["image_2id_fast_vs_eager_rel_err"] = round(rel_err(fast_pt, eager_pt), 5)
        if fast.graphed:  # graph replay of the CLIP image encoder against its plain forward
            with torch.no_grad():
                px = torch.rand(2, 3, pipe.backbone.image_size, pipe.backbone.image_size, device=device,
                                dtype=pipe.vae.dtype)
                want = fast.graphed[0].original(pixel_values=px, output_hidden_states=True).hidden_states[-2]
                got = pipe.backbone.image_encoder(pixel_values=px, output_hidden_states=True).hidden_states[-2]
            info["graphed_image_encoder_rel_err"] = round(rel_err(got, want), 6)
        with torch.no_grad():
            enc = time_wall(lambda: pipe.encode_identities(cases[1]), device, reps, warmup=2)
            dec = time_wall(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor), device, reps, warmup=2)
        info["fast_identity_encoding_ms_1id"] = round(enc.median_ms, 3)
        info["fast_vae_decode_ms"] = round(dec.median_ms, 3)
        info["fast_identity_encoding_breakdown_ms"] = encoding_breakdown(pipe, cases[1][0], device, reps)
        with torch.no_grad():
            info["fast_identity_encoding_ms_2id"] = round(
                time_wall(lambda: pipe.encode_identities(cases[2]), device, reps, warmup=1).median_ms, 3)
        if out is not None:
            profile_call(lambda: image(cases[2]), Path(out) / "profile_fast_image_2id.txt")
        if out is not None and profile:
            try:
                _profile_images(image, cases, Path(out), info, log)
            except Exception as err:  # noqa: BLE001 - a profiler failure must not lose the measurements
                log(f"image profiling failed: {type(err).__name__}: {err}")
        fast.disable()
    else:
        fast = enable_fast_path(pipe, mode="eager", buckets=[])
        for n in (0, 1, 2):
            measure("fast path", n, lambda n=n: image(cases[n]))
        fast.disable()
    del pipe
    free(device)
    return rows, info


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.image_bench TRACE.json.gz ...``: the idle report of saved traces."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--bridge-us", type=float, default=10.0, help="shorter device gaps count as busy")
    args = p.parse_args(argv)
    for path in args.traces:
        print(path, json.dumps(idle_by_phase(spans_from_trace(path), bridge_us=args.bridge_us), indent=1))


if __name__ == "__main__":
    main()

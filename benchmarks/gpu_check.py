"""The production chain through the real CLI with random-weight SD1.5-size models (issue 17, item 4).

``bash benchmarks/gpu_check.sh`` runs this module: it writes the models in the formats users hand us (an SD1.5
diffusers folder and the same weights as one LDM-layout ``.safetensors``, a ViT-H/14 image-encoder folder, a
CLIP ViT-L/14 for CLIP-T, an insightface-layout pack), then runs ``dynamicid`` subcommands as a user would, each as its
own process: synth + prepare a few dozen test-bed images, train anchor through DeepSpeed, kill it mid-run and resume,
train reconfigure, evaluate, register, serve over HTTP (fast path: CUDA graphs on a GPU) called with kserve's own
client, and the same request through ``dynamicid generate`` (the plain path) to compare graph replay with it. Each
stage prints its wall time and peak memory (host RSS of its process tree, GPU memory from nvidia-smi); any failure
makes the exit status non-zero.

``--tiny`` runs every stage on a CPU in a few minutes: the same SD1.5 block structure and file formats at small
widths (benchmarks/gpu_check_models.py, ``shaped``), fp32, tiny step counts; the fast path is eager there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.gpu_check_memory import Peak


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    host_gib: float = 0.0
    gpu_gib: float | None = None
    ok: bool = True
    note: str = ""


@dataclass
class Check:
    args: argparse.Namespace
    work: Path
    stages: list[Stage] = field(default_factory=list)

    @property
    def params(self) -> Path:
        return self.work / "params.yaml"

    def cli(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "components.cli", "--params", str(self.params), *argv]


def run_stage(check: Check, name: str, argv: list[str] | None = None, fn=None, timeout: float = 1800) -> Stage:
    """One stage: a CLI process (argv) or a function; timed, its memory sampled, its log kept in the work dir."""
    stage = Stage(name)
    t0 = time.monotonic()
    log = check.work / "logs" / f"{name.replace(' ', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        if argv is not None:
            with open(log, "w") as fh:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=check.work)
                peak = Peak(proc.pid)
                rc = proc.wait(timeout=timeout)
            stage.host_gib, stage.gpu_gib = peak.stop()
            stage.ok = rc == 0
            stage.note = "" if stage.ok else f"exit {rc}: " + log.read_text()[-1500:]
        else:
            peak = Peak(None)
            try:
                stage.note = fn() or ""
            finally:
                stage.host_gib, stage.gpu_gib = peak.stop()
    except Exception as err:  # noqa: BLE001 - every failure is reported, then the check exits non-zero
        stage.ok, stage.note = False, f"{type(err).__name__}: {err}"
    stage.seconds = time.monotonic() - t0
    check.stages.append(stage)
    gpu = "-" if stage.gpu_gib is None else f"{stage.gpu_gib:.2f}"
    note = stage.note.splitlines()[0] if stage.ok and stage.note else ""
    print(f"[gpu_check] {name:<22} {'ok' if stage.ok else 'FAILED':<6} {stage.seconds:8.1f} s  "
          f"host {stage.host_gib:6.2f} GiB  gpu {gpu} GiB  {note}", flush=True)
    if not stage.ok:
        print(stage.note, flush=True)
    return stage


def write_models(check: Check) -> str:
    from benchmarks.gpu_check_models import write_clip, write_face_pack, write_image_encoder, write_sd15

    scale = "shaped" if check.args.tiny else "sd15"
    m = check.work / "models"
    files = write_sd15(m / "sd15", scale)
    write_image_encoder(m / "image_encoder", scale)
    write_clip(m / "clip", scale)
    write_face_pack(m / "insightface", check.args.det_size)
    check.files = files
    sizes = {p.name: p.stat().st_size / 2**30 for p in (files["safetensors"], files["ckpt"])}
    return "single files " + ", ".join(f"{k} {v:.2f} GiB" for k, v in sizes.items())


def write_params(check: Check) -> None:
    a, w, m = check.args, check.work, check.work / "models"
    tiny = a.tiny
    # SD1.5 size: the chain trains on the single file (converted with the shipped SD1.5 config); --tiny: on the folder
    # (the shipped config has SD1.5's widths; the "single file == folder" stage converts the small files itself).
    base = m / "sd15" / ("diffusers" if tiny else "model.safetensors")
    sd15 = {"base": str(base), "tokenizer": str(m / "sd15" / "diffusers" / "tokenizer"),
            "image_encoder": str(m / "image_encoder"), "cache_dir": str(w / "cache")}
    if tiny:
        sd15.update(resolution=128, lora_rank=4, face_encoder={"depth": 1, "heads": 2, "dim_head": 16, "ff_mult": 2},
                    imr={"width": 64, "heads": 2, "landmark_feature_dim": 64, "ff_mult": 2})
    stage = {"micro_batch": 2 if tiny else 8, "warmup_steps": 2}
    params = {
        "model": {"profile": "sd15", "sd15": sd15},
        "face": {"backend": "insightface", "min_face_size": 8,
                 "insightface": {"root": str(m / "insightface"), "name": "buffalo_check", "det_size": a.det_size}},
        "storage": {"cache_dir": str(w / "cache")},
        "mlflow": {"tracking_uri": f"sqlite:///{w / 'mlflow.db'}"},
        "data": {"raw": str(w / "raw"), "prepared": str(w / "prepared")},
        "synth": {"identities": a.identities, "images_per_identity": 4, "size": 128 if tiny else 256,
                  "bad_samples": 0},
        "prepare": {"detection_check": 0, "test_fraction": 0.25, "workers": 1},
        "train": {"precision": "fp32" if tiny else "bf16", "compile_unet": "on" if a.compile else "off",
                  "checkpoint_every": 2, "check_images": 8, "check_repeats": 1, "sample_every": 10**6,
                  "log_every": 1,
                  "anchor": {**stage, "steps": a.steps, "output": str(w / "runs" / "anchor")},
                  "reconfigure": {**stage, "micro_batch": 2, "steps": max(2, a.steps // 2),
                                  "output": str(w / "runs" / "reconfigure")}},
        "evaluate": {"num_identities": 2, "prompts": ["a photo of a person"], "multi_id": [2], "seeds": [0],
                     "edits": ["the expression is happy"], "steps": 2 if tiny else 10, "batch_size": 2,
                     "clip_model": str(m / "clip"), "output": str(w / "runs" / "evaluate")},
        "gate": {"output": str(w / "runs" / "register")},
        "serve": {"fast_path": "auto" if tiny else "cuda_graphs", "max_side": 512},
    }
    check.params.write_text(yaml.safe_dump(params, sort_keys=False))


def loss_steps(check: Check) -> list[int]:
    path = check.work / "runs" / "anchor" / "loss.tsv"
    if not path.exists():
        return []
    rows = path.read_text().splitlines()[1:]
    return [int(r.split("\t")[0]) for r in rows if r.strip()]


def kill_and_resume(check: Check) -> str:
    """Resume the half-trained anchor stage, SIGKILL it (process group) once it has trained on, resume again."""
    before = max(loss_steps(check) or [0])
    log = open(check.work / "logs" / "anchor_killed.log", "w")
    proc = subprocess.Popen(check.cli("train", "--stage", "anchor", "--resume"), stdout=log, stderr=subprocess.STDOUT,
                            cwd=check.work, start_new_session=True)
    deadline = time.monotonic() + check.args.kill_after_s
    while time.monotonic() < deadline and proc.poll() is None and max(loss_steps(check) or [0]) < before + 3:
        time.sleep(0.5)
    if proc.poll() is not None:
        raise RuntimeError(f"the resumed run ended (exit {proc.returncode}) before it could be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    killed_at = max(loss_steps(check) or [0])
    with open(check.work / "logs" / "anchor_resumed.log", "w") as fh:
        rc = subprocess.run(check.cli("train", "--stage", "anchor", "--resume"), cwd=check.work, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"resume after the kill failed (exit {rc}): see logs/anchor_resumed.log")
    final = max(loss_steps(check) or [0])
    if final != check.args.steps or not (check.work / "runs" / "anchor" / "export" / "manifest.json").exists():
        raise RuntimeError(f"after the resume the stage ended at step {final}, not {check.args.steps}, or exported "
                           "nothing")
    return f"killed at step {killed_at} (started at {before}), resumed to {final}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REQUEST = {"prompt": "a photo of a person", "seed": 7, "guidance_scale": 5.0}


def serve_and_call(check: Check) -> str:
    """``dynamicid serve`` in the background, called with kserve's InferenceRESTClient (v1), then stopped."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses the process's arguments when it is imported
    try:
        from kserve import InferenceRESTClient, RESTConfig
    finally:
        sys.argv = argv
    from serving.client import build_instance

    port, ckpt = free_port(), check.work / "runs" / "reconfigure" / "export"
    log = open(check.work / "logs" / "serve_process.log", "w")
    proc = subprocess.Popen(check.cli("serve", "--model-uri", str(ckpt), "--port", str(port)), stdout=log,
                            stderr=subprocess.STDOUT, cwd=check.work, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=600, retries=0))
    side = check.args.side
    instance = build_instance(REQUEST["prompt"], [str(check.id_image)], seed=REQUEST["seed"],
                              num_inference_steps=check.args.infer_steps, guidance_scale=REQUEST["guidance_scale"],
                              height=side, width=side)

    async def call() -> tuple[dict, float, float]:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): see logs/serve_process.log")
            try:
                if await client.is_model_ready(url, "dynamicid"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() - t0 > 900:
                raise TimeoutError("the model server was not ready within 900 s")
            await asyncio.sleep(1)
        ready = time.monotonic() - t0
        t1 = time.monotonic()
        out = await client.infer(url, {"instances": [instance]}, model_name="dynamicid")
        return out, ready, time.monotonic() - t1

    try:
        out, ready, latency = asyncio.run(call())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    pred = out["predictions"][0]
    (check.work / "served.png").write_bytes(base64.b64decode(pred["image"]))
    path = "fast path " + ("CUDA graphs" if not check.args.tiny else "eager (CPU)")
    return f"ready in {ready:.1f} s, one {side} px image in {latency:.2f} s ({path}, seed {pred['seed']})"


def compare_paths(check: Check) -> str:
    """The served image (fast path) against ``dynamicid generate`` (plain path) for the same request."""
    import numpy as np
    from PIL import Image

    side = str(check.args.side)
    argv = check.cli("generate", "--checkpoint", str(check.work / "runs" / "reconfigure" / "export"),
                     "--prompt", REQUEST["prompt"], "--id-image", str(check.id_image), "--seed", str(REQUEST["seed"]),
                     "--steps", str(check.args.infer_steps), "--guidance", str(REQUEST["guidance_scale"]),
                     "--height", side, "--width", side, "--out", str(check.work / "plain.png"))
    with open(check.work / "logs" / "generate_plain.log", "w") as fh:
        rc = subprocess.run(argv, cwd=check.work, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"dynamicid generate failed (exit {rc}): see logs/generate_plain.log")
    a = np.asarray(Image.open(check.work / "served.png").convert("RGB"), np.float64)
    b = np.asarray(Image.open(io.BytesIO((check.work / "plain.png").read_bytes())).convert("RGB"), np.float64)
    mean_abs = float(np.abs(a - b).mean())
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-9))
    if mean_abs > check.args.max_pixel_diff:
        raise RuntimeError(f"graph replay differs from the plain path: mean |diff| {mean_abs:.2f} / 255 "
                           f"(> {check.args.max_pixel_diff}), relative {rel:.4f}")
    return f"served vs plain: mean |diff| {mean_abs:.3f} / 255, relative {rel:.5f}"


def single_file_matches(check: Check) -> str:
    """The single file (what the chain trained on) converts to the weights of the diffusers folder."""
    import torch

    from model.backbone import load_backbone
    from model.single_file import convert_components, read_checkpoint

    files = check.files
    folder = load_backbone(files["diffusers"], check.work / "models" / "image_encoder")
    bad = []
    for suffix in ("safetensors", "ckpt"):
        unet, vae, text = convert_components(read_checkpoint(files[suffix]), files["config"], files[suffix])
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            want = getattr(folder, name).state_dict()
            got = model.state_dict()
            bad += [f"{suffix}:{name}:{k}" for k in want if not torch.equal(want[k], got[k])]
    if bad:
        raise RuntimeError(f"{len(bad)} tensors differ, first {bad[:3]}")
    return "safetensors and ckpt == diffusers folder"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("GPU_CHECK_TINY") == "1",
                   help="CPU dry run: SD1.5 structure at small widths (also GPU_CHECK_TINY=1)")
    p.add_argument("--work", default="runs/gpu-check", help="working directory (emptied first)")
    p.add_argument("--steps", type=int, default=None, help="anchor steps (default 12 tiny, 40 sd15)")
    p.add_argument("--identities", type=int, default=8, help="test-bed identities (4 images each)")
    p.add_argument("--compile", action="store_true", help="train.compile_unet: on (minutes per start on a GPU)")
    p.add_argument("--kill-after-s", type=float, default=600.0)
    p.add_argument("--max-pixel-diff", type=float, default=4.0, help="served vs plain, mean |diff| out of 255")
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.tiny else 40)
    args.det_size = 160 if args.tiny else 640
    args.side = 128 if args.tiny else 512
    args.infer_steps = 2 if args.tiny else 20
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.tiny:  # libraries that probe for DeepSpeed import it: on a CPU it would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check = Check(args, work)
    from model.loading import quiet_hf_progress

    quiet_hf_progress()
    print(f"[gpu_check] {'tiny CPU dry run' if args.tiny else 'SD1.5 size'} in {work}", flush=True)
    t0 = time.monotonic()
    steps = [("models", None, lambda: write_models(check)), ("params", None, lambda: write_params(check)),
             ("single file == folder", None, lambda: single_file_matches(check)),
             ("synth", check.cli("synth", "--no-progress"), None),
             ("prepare", check.cli("prepare", "--no-progress"), None),
             ("anchor (first half)", check.cli("train", "--stage", "anchor", "--max-steps", str(args.steps // 2)),
              None),
             ("anchor kill + resume", None, lambda: kill_and_resume(check)),
             ("reconfigure", check.cli("train", "--stage", "reconfigure"), None),
             ("evaluate", check.cli("evaluate"), None),
             ("register", check.cli("register", "--checkpoint", str(work / "runs" / "reconfigure" / "export"),
                                    "--metrics", str(work / "runs" / "evaluate" / "metrics.json"),
                                    "--decision-file", str(work / "runs" / "register" / "decision.txt")), None),
             ("serve + kserve client", None, lambda: serve_and_call(check)),
             ("graph replay vs plain", None, lambda: compare_paths(check))]
    for name, argv_, fn in steps:
        if name == "prepare":
            check.id_image = sorted((work / "raw").rglob("*.png"))[0]
        stage = run_stage(check, name, argv_, fn)
        if not stage.ok:
            break
    failed = [s.name for s in check.stages if not s.ok]
    summary = {"tiny": args.tiny, "total_s": round(time.monotonic() - t0, 1), "failed": failed,
               "stages": [s.__dict__ for s in check.stages]}
    (work / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    decision = work / "runs" / "register" / "decision.txt"
    gate = decision.read_text().strip() if decision.exists() else "n/a"
    print(f"[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'}; gate decision {gate}; "
          f"{summary['total_s']} s; {work / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

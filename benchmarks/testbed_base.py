"""The pretrained test-bed base: the tiny profile's VAE + UNet trained on a GPU on the test bed's training split.

DynamicID takes its base (SD1.5) as given; the embedded default can do the same with a base that already draws the
test bed's faces, so that `make run` trains only what DynamicID trains. 200 CPU steps of the ``base`` stage cannot
teach a diffusion model to draw a face; a few thousand GPU steps can. The objectives are the base stage's own
(``components.train.base_tasks.VAETask`` and ``BaseUNetTask``, their per-slot noise included); only the loop is a
plain AdamW loop, because the GPU machine has neither DeepSpeed's build nor MLflow nor pyarrow. Two steps:

    # here (CPU): the prepared training split as one array file (pixels + captions + data hash)
    python -m benchmarks.testbed_base export --prepared data/prepared --out .testbed/train.npz
    # on the GPU machine: train, save the base in diffusers layout, pack it with its record and samples
    python -m benchmarks.testbed_base train --data .testbed/train.npz --out "$OUT"

``train`` writes ``base.tar`` (the base directory), ``record.json`` (command, data hash, steps, losses, timings,
device) and ``samples.npz`` (images generated from held-out-style captions, for the detection check here).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np


def export(prepared: str, out: str) -> None:
    from components.core.shards import PreparedData

    data = PreparedData(prepared)
    positions = [p for ids in data.identities("train").values() for p in ids]
    pixels = np.stack([data.sample(p).pixels[..., :3] for p in positions])
    captions = np.array([data.sample(p).caption for p in positions])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, pixels=pixels, captions=captions,
                        data_hash=np.array(data.manifest.get("data_hash", "")), positions=np.array(positions))
    print(f"wrote {out}: {len(positions)} training images {pixels.shape[1:]}, data {data.manifest.get('data_hash')}")


def _batches(n: int, batch: int, steps: int, seed: int):
    """Step -> (indices, slots): a fresh permutation per epoch, slots numbered as the trainer numbers them."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    for step in range(steps):
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch], order[batch:]
        yield idx, list(range(step * batch, (step + 1) * batch))


def _fit(task, params, data: np.ndarray, captions: np.ndarray | None, *, steps: int, batch: int, lr: float,
         warmup: int, drop_caption: float, seed: int, device, log_every: int = 200,
         budget_s: float = float("inf"), bf16: bool = False) -> list[tuple[int, float]]:
    """AdamW with warm-up and cosine decay to 0.1x; stops early (and says so) when ``budget_s`` is spent.

    The decay follows whichever runs out first, steps or time, so a time-boxed run still ends at the low learning rate
    instead of being cut off at its peak."""
    import torch

    start = time.time()

    def progress(s: int) -> float:
        return min(1.0, max(s / max(1, steps), (time.time() - start) / budget_s))

    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(s)))))
    rng = np.random.default_rng(seed + 1)
    losses: list[tuple[int, float]] = []
    window: list[torch.Tensor] = []
    for step, (idx, slots) in enumerate(_batches(len(data), batch, steps, seed)):
        pixels = torch.from_numpy(data[idx]).to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        b = {"pixels": pixels, "slot": slots}
        if captions is not None:
            drop = rng.random(len(idx)) < drop_caption
            b["caption"] = ["" if d else str(c) for c, d in zip(captions[idx], drop)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task(b)
        loss = loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.detach())
        over = time.time() - start > budget_s
        if (step + 1) % log_every == 0 or step + 1 == steps or over:
            mean = float(torch.stack(window).mean())
            window.clear()
            losses.append((step + 1, mean))
            print(f"  step {step + 1}/{steps} loss {mean:.4f} ({time.time() - start:.0f} s)", flush=True)
        if over:
            print(f"  time budget of {budget_s:.0f} s spent: stopped after {step + 1} of {steps} steps", flush=True)
            break
    return losses


def train(args: argparse.Namespace) -> None:
    import torch

    from components.core.config import params_from_dict
    from components.train.base_tasks import BaseUNetTask, VAETask, latent_scale
    from model.backbone import load_backbone, save_base, tiny_base_dir
    from model.loading import quiet_hf_progress

    quiet_hf_progress()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = np.load(args.data)
    pixels, captions = arrays["pixels"], arrays["captions"]
    params = params_from_dict({"storage": {"cache_dir": str(out / "cache")}})
    tiny = params.model.tiny.model_copy(update={"base": None})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous: dict = {}
    if args.resume_from:  # continue a stored base (its record says how it was made so far)
        previous = json.loads((Path(args.resume_from) / "record.json").read_text())
        if previous.get("data_hash") != str(arrays["data_hash"]):
            sys.exit(f"--resume-from {args.resume_from}: trained on other data ({previous.get('data_hash')})")
    bb = load_backbone(args.resume_from or tiny_base_dir(tiny, params.storage.cache_dir))
    for m in (bb.unet, bb.vae, bb.text_encoder, bb.image_encoder):
        m.to(device)
    t0 = time.time()
    print(f"VAE: {args.vae_steps} steps, batch {args.batch}", flush=True)
    vae_task = VAETask(bb.vae, 1e-6, args.seed)
    vae_losses = _fit(vae_task, [p for p in bb.vae.parameters()], pixels, None, steps=args.vae_steps,
                      batch=args.batch, lr=args.vae_lr, warmup=50, drop_caption=0.0, seed=args.seed, device=device)
    t_vae = time.time() - t0
    bb.vae.requires_grad_(False).eval()
    if vae_losses or not previous:
        sample = torch.from_numpy(pixels[:256]).to(device).permute(0, 3, 1, 2).float() / 255.0
        scale = latent_scale(bb.vae, sample)
        bb.vae.register_to_config(scaling_factor=float(scale))
    else:
        scale = float(bb.vae.config.scaling_factor)
    print(f"UNet: {args.steps} steps, batch {args.batch}, latent scale {scale:.4f}", flush=True)
    t1 = time.time()
    unet_task = BaseUNetTask(bb, args.seed)
    unet_losses = _fit(unet_task, [p for p in bb.unet.parameters() if p.requires_grad], pixels, captions,
                       steps=args.steps, batch=args.batch, lr=args.lr, warmup=200, drop_caption=0.1,
                       seed=args.seed + len(previous.get("unet_loss", [])), device=device, budget_s=args.budget_s,
                       bf16=args.bf16)
    done = previous.get("steps", 0)
    unet_losses = [*map(tuple, previous.get("unet_loss", [])), *((done + st, v) for st, v in unet_losses)]
    t_unet = time.time() - t1
    bb.unet.requires_grad_(False).eval()
    for m in (bb.unet, bb.vae, bb.text_encoder, bb.image_encoder):
        m.to("cpu")
    base = save_base(out / "base", unet=bb.unet, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                     image_encoder=bb.image_encoder, scheduler=bb.scheduler)
    with tarfile.open(out / "base.tar", "w") as tar:
        tar.add(base, arcname="base")
    command = "python -m benchmarks.testbed_base " + " ".join(args.argv)
    record = {"command": " && ".join(filter(None, [previous.get("command"), command])),
              "data_hash": str(arrays["data_hash"]), "images": int(len(pixels)),
              "vae_steps": previous.get("vae_steps", 0) + args.vae_steps,
              "steps": unet_losses[-1][0] if unet_losses else 0, "bf16": args.bf16,
              "steps_asked": args.steps, "batch": args.batch, "lr": args.lr,
              "vae_lr": args.vae_lr, "seed": args.seed, "latent_scale": float(scale),
              "vae_loss": vae_losses or previous.get("vae_loss", []), "unet_loss": unet_losses,
              "vae_s": round(previous.get("vae_s", 0) + t_vae, 1),
              "unet_s": round(previous.get("unet_s", 0) + t_unet, 1),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    _samples(base, captions, out / "samples.npz", args.seed, device, args.samples)
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("_loss")}, indent=2))


def _samples(base: Path, captions: np.ndarray, path: Path, seed: int, device, count: int = 64) -> None:
    """``count`` images from the trained base (20 DDIM steps, guidance 5) for captions of the training set."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from model.backbone import load_backbone

    bb = load_backbone(base)
    pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=DDIMScheduler.from_config(bb.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    picks = [str(c) for c in captions[np.random.default_rng(seed).choice(len(captions), count, replace=False)]]
    images = []
    for i in range(0, len(picks), 16):
        g = torch.Generator(device).manual_seed(seed + i)
        res = pipe(picks[i:i + 16], num_inference_steps=20, guidance_scale=5.0, generator=g, output_type="np",
                   height=64, width=64)
        images.append((res.images * 255).round().astype(np.uint8))
    np.savez_compressed(path, images=np.concatenate(images), captions=np.array(picks))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="the prepared training split as one .npz (run here)")
    e.add_argument("--prepared", default="data/prepared")
    e.add_argument("--out", default=".testbed/train.npz")
    t = sub.add_parser("train", help="train the base on a GPU and pack it")
    t.add_argument("--data", default=".testbed/train.npz")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--vae-steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--vae-lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--samples", type=int, default=64, help="images generated from the trained base for the check")
    t.add_argument("--resume-from", help="a stored base (with record.json) to continue training; use --vae-steps 0 "
                   "to keep its VAE and latent scale")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the steps (GPU)")
    t.add_argument("--budget-s", type=float, default=float("inf"),
                   help="stop the UNet phase when this many seconds are spent (the base is saved either way)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cmd == "export":
        export(args.prepared, args.out)
    else:
        train(args)


if __name__ == "__main__":
    main()

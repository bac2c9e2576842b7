"""Sample image grids logged while training (rank 0): what the model draws right now.

Stage 1 and 2 grids go through ``DynamicIDPipeline`` itself (built around the live backbone
and DynamicID, with precomputed embeddings and CLIP features), so a sample shows exactly what
the exported checkpoint will do. The pipeline constructor freezes the parts it is given; the
trainable flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from components.core.config import Params
    from components.core.shards import PreparedData, Sample
    from components.train.tasks import DynamicIDTask


def grid(rows: Sequence[Sequence[np.ndarray | Image.Image]], size: int) -> Image.Image:
    """Rows of images (uint8 arrays or PIL), each resized to size x size, as one picture."""
    n_cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (n_cols * size, len(rows) * size))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
            canvas.paste(pil.convert("RGB").resize((size, size), Image.BICUBIC), (j * size, i * size))
    return canvas


@contextlib.contextmanager
def inference_view(module: torch.nn.Module) -> Iterator[None]:
    """Whatever a caller does to requires_grad / train mode inside is undone on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _pipeline(task: "DynamicIDTask", params: "Params"):
    from model.pipeline import DynamicIDPipeline

    pipe = DynamicIDPipeline.from_backbone(task.backbone, task.dyn, params.model, params.face)
    pipe.set_progress(False)
    return pipe


@torch.no_grad()
def _clip(task: "DynamicIDTask", samples: list["Sample"]) -> torch.Tensor:
    from components.train.images import image_tensor
    from model.dynamicid import clip_image_features

    crops = torch.stack([image_tensor(s.face_crop) for s in samples]).to(task.backbone.image_encoder.device)
    return clip_image_features(task.backbone, crops)


def anchor_grid(task: "DynamicIDTask", data: "PreparedData", positions: list[int], params: "Params") -> Image.Image:
    """Rows: reference face crop, the real image, the image generated from its caption + identity."""
    from model.pipeline import IdentityInput

    samples = [data.sample(p) for p in positions]
    feats = _clip(task, samples)
    with inference_view(task.dyn):
        pipe = _pipeline(task, params)
        out = pipe([s.caption for s in samples],
                   [[IdentityInput(embedding=s.embedding, clip_features=feats[i])] for i, s in enumerate(samples)],
                   num_inference_steps=params.train.sample_steps, seed=list(range(len(samples))))
    res = params.model.active.resolution
    return grid([[s.face_crop for s in samples], [s.pixels for s in samples], out.images], res)


def reconfigure_grid(task: "DynamicIDTask", data: "PreparedData", pairs: list[tuple[int, int]],
                     params: "Params") -> Image.Image:
    """Rows: source image, target image (other motion), generated from the source identity edited to the target's
    face prompt and landmarks."""
    from model.pipeline import IdentityInput

    src = [data.sample(a) for a, _ in pairs]
    tgt = [data.sample(b) for _, b in pairs]
    feats = _clip(task, src)
    ids = [[IdentityInput(embedding=s.embedding, clip_features=feats[i], source_landmarks=s.landmark_image,
                          source_prompt=s.face_prompt, expression=t.face_prompt, landmarks_image=t.landmark_image)]
           for i, (s, t) in enumerate(zip(src, tgt))]
    with inference_view(task.dyn):
        pipe = _pipeline(task, params)
        out = pipe([params.train.reconfigure.prompt] * len(src), ids, num_inference_steps=params.train.sample_steps,
                   seed=list(range(len(src))))
    res = params.model.active.resolution
    return grid([[s.pixels for s in src], [t.pixels for t in tgt], out.images], res)


@torch.no_grad()
def base_grid(backbone, samples: list["Sample"], params: "Params") -> Image.Image:
    """Rows: real images, images the base generates from their captions (DDIM, CFG 5)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet = backbone.unet
    flags = unet.training
    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=unet,
        # steps_offset=1 as in SD1.5's own config (the pipeline warns about anything else)
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    res = params.model.active.resolution
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(samples))]
    unet.eval()
    try:
        out = pipe([s.caption for s in samples], height=res, width=res, num_inference_steps=params.train.sample_steps,
                   guidance_scale=5.0, generator=gens, output_type="pil")
    finally:
        unet.train(flags)
    return grid([[s.pixels for s in samples], out.images], res)


@torch.no_grad()
def vae_grid(vae: torch.nn.Module, samples: list["Sample"], resolution: int) -> Image.Image:
    """Rows: real images, their reconstructions (posterior mean)."""
    from components.train.images import image_tensor

    x = torch.stack([image_tensor(s.pixels, resolution) for s in samples]).to(device=vae.device, dtype=vae.dtype)
    rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
    arr = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return grid([[s.pixels for s in samples], list(arr)], resolution)

"""DynamicIDPipeline: prompt + 1..N identities (+ optional layout and per-person motion) -> images.

A person's target motion is a face prompt (``expression``) and/or a landmark target: a
``driving_image`` (anyone's photo) or ``landmarks`` (coordinates in the reference photo), both
rendered internally as the landmark image the IMR was trained on (model.motion_targets).

Reads top to bottom like a diffusers pipeline:
  1. validate the request (sizes, identity count, boxes) before any model work;
  2. analyse every reference face once (detect, embed, landmarks, pose);
  3. encode all identities in one batch: face encoder -> ID tokens; IMR for those with an edit;
  4. encode the prompt and the negative prompt;
  5. denoise with classifier-free guidance, SAA reading the ID tokens appended after the text;
  6. decode and return images plus per-identity metadata (region used, edit applied).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch.profiler import record_function
from PIL import Image

from model.backbone import Backbone
from model.config import FaceParams, ModelParams
from model.dynamicid import DynamicID, clip_image_features, text_embeddings
from model.face_analysis.face import face_crop_box  # noqa: F401  (re-exported: inference crop box)
from model.motion_targets import check_landmarks, rendered_landmark_image
from model.release import compat  # the research release's inference conventions, in its mode only

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    """A request the pipeline cannot serve; the message says what is wrong and for which identity."""


@dataclass
class IdentityInput:
    """One person. Give a reference ``image`` (RGB array or PIL), or precomputed ``embedding`` +
    ``clip_features``. Everything else is optional.

    Target motion (an edit): ``expression`` (text) and/or at most one landmark target,
    ``driving_image`` (a photo of anyone: its face's pose and expression) or ``landmarks``
    ([L, 2] x, y in pixels of ``image``, the face analyzer's layout: 68 dlib / 106 insightface
    points). ``landmarks_image`` is the advanced form both become: an already rendered target in
    the model's frame (training samples pass theirs)."""

    image: np.ndarray | Image.Image | None = None
    aligned: bool = False                       # image is already an aligned face crop: skip detection
    embedding: np.ndarray | torch.Tensor | None = None      # [id_dim], L2-normalised
    clip_features: torch.Tensor | None = None               # [L, clip_dim]
    bbox: Sequence[float] | None = None         # (y0, x0, y1, x1) in [0, 1]
    expression: str | None = None               # target face prompt, e.g. "smiling" or "the face is turned left"
    driving_image: np.ndarray | Image.Image | None = None   # target pose/expression: a photo of anyone
    landmarks: np.ndarray | Sequence[Sequence[float]] | None = None  # target [L, 2] x, y, pixels of `image`
    landmarks_image: np.ndarray | Image.Image | None = None  # advanced: rendered target (dots on black)
    source_prompt: str | None = None            # override the estimated source face prompt
    source_landmarks: np.ndarray | None = None  # [S, S] source landmark image for precomputed inputs


@dataclass
class IdentityResult:
    region: list[float]
    edited: bool
    source_prompt: str | None = None
    target_prompt: str | None = None


@dataclass
class DynamicIDOutput:
    images: list[Image.Image]
    identities: list[list[IdentityResult]]      # per image, per identity
    seeds: list[int] = field(default_factory=list)
    layout: str = "none"                        # "auto" | "strips" | "boxes" (model/saa/auto_run.py)
    layout_maps: torch.Tensor | None = None     # layout auto: [b, N, h, w] per-identity activation maps, max 1


@dataclass
class EncodedIdentities:
    """Tokens for one request: cond [N, K, D], and metadata. The landmark images [1, S, S] the IMR
    compared, per identity (target None: not edited), show what a motion target was rendered to."""

    tokens: torch.Tensor
    results: list[IdentityResult]
    source_landmarks: list[torch.Tensor] = field(default_factory=list)
    target_landmarks: list[torch.Tensor | None] = field(default_factory=list)


def _to_rgb_array(img: np.ndarray | Image.Image, who: str) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise GenerationError(f"{who}: image must be HxWx3 RGB, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def normalize_face_prompt(text: str) -> str:
    """'smiling' -> 'the expression is smiling'; full face prompts pass through."""
    t = text.strip().rstrip(".")
    return t if t.lower().startswith("the ") else f"the expression is {t}"


class DynamicIDPipeline(DiffusionPipeline):
    """SD1.5-style text-to-image pipeline with DynamicID identity injection and editing."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, image_encoder, dynamicid: DynamicID):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            image_encoder=image_encoder, dynamicid=dynamicid,
        )
        self.backbone = Backbone(unet, vae, text_encoder, tokenizer, image_encoder, scheduler, Path("."))
        self.model_params = ModelParams()
        self.face_params = FaceParams()
        self.face_analyzer = None
        self.step_runner = None
        self._uncond_tokens: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(cls, backbone: Backbone, dynamicid: DynamicID, model_params: ModelParams,
                      face_params: FaceParams, face_analyzer=None) -> "DynamicIDPipeline":
        scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
        pipe = cls(backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.unet, scheduler,
                   backbone.image_encoder, dynamicid)
        pipe.backbone = backbone
        pipe.model_params = model_params
        pipe.face_params = face_params
        pipe.face_analyzer = face_analyzer
        dynamicid.eval().requires_grad_(False)
        return pipe

    @property
    def dims(self):
        return self.dynamicid.dims

    def set_progress(self, enabled: bool) -> None:
        self.set_progress_bar_config(disable=not enabled)

    def analyzer(self):
        if self.face_analyzer is None:
            from model.face_analysis.backends import build_face_analyzer

            self.face_analyzer = build_face_analyzer(self.face_params, self.model_params.profile)
        return self.face_analyzer

    # ------------------------------------------------------------------ validation
    def validate(self, identities: Sequence[IdentityInput], height: int, width: int) -> None:
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise GenerationError(f"height and width must be positive multiples of 8, got {height}x{width}")
        max_ids = self.model_params.max_ids
        if len(identities) > max_ids:
            raise GenerationError(f"{len(identities)} identities given, at most model.max_ids = {max_ids}")
        for i, ident in enumerate(identities):
            who = f"identity {i}"
            if ident.image is None and (ident.embedding is None or ident.clip_features is None):
                raise GenerationError(f"{who}: give a reference image, or both embedding and clip_features")
            given = [k for k in ("driving_image", "landmarks", "landmarks_image") if getattr(ident, k) is not None]
            if len(given) > 1:
                raise GenerationError(f"{who}: give at most one landmark target, got {' and '.join(given)}")
            if ident.landmarks is not None:
                try:
                    check_landmarks(ident.landmarks, self.analyzer().landmark_count, who)
                except ValueError as err:
                    raise GenerationError(str(err)) from None
            if ident.bbox is not None:
                b = [float(v) for v in ident.bbox]
                if len(b) != 4 or not all(0.0 <= v <= 1.0 for v in b) or b[0] >= b[2] or b[1] >= b[3]:
                    raise GenerationError(
                        f"{who}: bbox must be (y0, x0, y1, x1) within [0, 1] with y0 < y1 and x0 < x1, got {b}"
                    )

    def regions(self, identities: Sequence[IdentityInput]) -> torch.Tensor:
        """[N, 4] regions: given boxes, and equal vertical strips for identities without one."""
        from model.saa.regions import default_regions

        strips = default_regions(len(identities))
        rows = [torch.tensor([float(v) for v in ident.bbox]) if ident.bbox is not None else strips[i]
                for i, ident in enumerate(identities)]
        return torch.stack(rows) if rows else strips

    # ------------------------------------------------------------------ identity encoding
    def _analyse(self, ident: IdentityInput, who: str) -> dict[str, Any]:
        """Reference image -> embedding, face crop [3, S, S] in [0, 1], landmark image, face prompt,
        and the face's frame (box, image size) that landmark coordinates are drawn in."""
        from model.face_analysis.face import FaceAnalysisError, pick_face
        from model.landmarks import crop_landmark_image
        from model.motion import estimate_expression, face_prompt

        image = _to_rgb_array(ident.image, who)
        analyzer = self.analyzer()
        try:
            if ident.aligned:
                face = analyzer.analyze_aligned(image)
            else:
                face = pick_face(analyzer.detect(image), who=who, min_size=self.face_params.min_face_size)
        except FaceAnalysisError as err:
            msg = str(err)
            raise GenerationError(msg if who in msg else f"{who}: {msg}") from None
        left, top, right, bottom = face_crop_box(face.bbox, image.shape[:2])
        crop = Image.fromarray(image[top:bottom, left:right]).resize((self.backbone.image_size,) * 2, Image.BICUBIC)
        crop_t = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255.0
        lmk = crop_landmark_image(face.landmarks, (left, top, right, bottom), size=self.dims.imr["landmark_size"])
        crop_t, lmk = compat.analysis_inputs(compat.mode_of(self), image, face.landmarks, crop_t, lmk)
        yaw, pitch, _ = face.pose
        prompt = ident.source_prompt or face_prompt(estimate_expression(face.landmarks), yaw, pitch)
        return {"embedding": np.asarray(face.embedding, dtype=np.float32), "crop": crop_t,
                "landmarks": torch.from_numpy(lmk), "prompt": prompt, "frame": (face.bbox, image.shape[:2])}

    def _target(self, ident: IdentityInput, frame: tuple[np.ndarray, tuple[int, int]] | None,
                who: str) -> torch.Tensor | None:
        """The identity's target landmark image [1, S, S], or None without a landmark target;
        ``frame`` = the reference face's (box, image size) that ``landmarks`` coordinates refer to."""
        size = self.dims.imr["landmark_size"]
        if ident.landmarks_image is not None:
            return torch.from_numpy(rendered_landmark_image(ident.landmarks_image, size))
        drive = None if ident.driving_image is None else _to_rgb_array(ident.driving_image, f"{who}: driving_image")
        try:
            lmk = compat.target_landmarks(self, who, size, drive, ident.landmarks, frame)  # ours or the release's
        except ValueError as err:
            raise GenerationError(str(err)) from None
        return None if lmk is None else torch.from_numpy(lmk)

    @torch.no_grad()
    def uncond_tokens(self) -> torch.Tensor:
        """CFG branch tokens: the face encoder on a zero embedding and the CLIP features of a black crop."""
        if self._uncond_tokens is None:
            s = self.backbone.image_size
            feats = clip_image_features(self.backbone, compat.uncond_clip_image(compat.mode_of(self), s, self.device))
            emb = torch.zeros(1, self.dims.id_dim, device=self.device, dtype=feats.dtype)
            fe = self.dynamicid.face_encoder
            self._uncond_tokens = fe(emb.to(param_dtype(fe)), feats.to(param_dtype(fe)))[0]
        return self._uncond_tokens

    @torch.no_grad()
    def encode_identities(self, identities: Sequence[IdentityInput]) -> EncodedIdentities:
        """All identities of one request in one batch through the encoders -> tokens [N, K, D]."""
        n = len(identities)
        fe = self.dynamicid.face_encoder
        dtype, device = param_dtype(fe), self.device
        embeds, feats, src_lmk, src_prompt, results = [], [], [], [], []
        crops, crop_index, targets = [], [], []
        for i, ident in enumerate(identities):
            who = f"identity {i}"
            frame = None
            if ident.image is not None:
                a = self._analyse(ident, who)
                frame = a["frame"]
                embeds.append(torch.as_tensor(a["embedding"]))
                crops.append(a["crop"])
                crop_index.append(i)
                feats.append(None)
                src_lmk.append(a["landmarks"])
                src_prompt.append(a["prompt"])
            else:
                e = torch.as_tensor(np.asarray(ident.embedding, dtype=np.float32)).flatten()
                if e.numel() != self.dims.id_dim:
                    raise GenerationError(f"{who}: embedding has {e.numel()} values, "
                                          f"the model needs {self.dims.id_dim}")
                embeds.append(e)
                feats.append(torch.as_tensor(ident.clip_features))
                size = self.dims.imr["landmark_size"]
                src_lmk.append(torch.from_numpy(rendered_landmark_image(ident.source_landmarks, size))
                               if ident.source_landmarks is not None else torch.zeros(1, size, size))
                src_prompt.append(ident.source_prompt or "the expression is neutral, the face is frontal")
            targets.append(self._target(ident, frame, who))  # before the encoders: a bad target fails cheaply
        if crops:
            cf = clip_image_features(self.backbone, torch.stack(crops).to(device))
            for j, i in enumerate(crop_index):
                feats[i] = cf[j]
        emb = torch.stack(embeds).to(device, dtype)
        clip = torch.stack([f.to(device) for f in feats]).to(dtype)
        tokens = fe(emb, clip)                                            # [N, K, D]

        edit_idx = [i for i, ident in enumerate(identities) if ident.expression is not None or targets[i] is not None]
        tgt_lmk: list[torch.Tensor | None] = [
            (src_lmk[i] if targets[i] is None else targets[i]) if i in edit_idx else None for i in range(n)]
        tgt_prompts: dict[int, str] = {}
        if edit_idx:
            src_imgs = torch.stack([src_lmk[i] for i in edit_idx]).to(device, dtype)
            tgt_imgs = torch.stack([tgt_lmk[i] for i in edit_idx]).to(device, dtype)
            for i in edit_idx:
                e = identities[i].expression
                tgt_prompts[i] = normalize_face_prompt(e) if e else src_prompt[i]
            _, src_txt = text_embeddings(self.backbone, [src_prompt[i] for i in edit_idx])
            _, tgt_txt = text_embeddings(self.backbone, [tgt_prompts[i] for i in edit_idx])
            kp = self.dynamicid.keypoint_encoder
            edited = self.dynamicid.imr(tokens[edit_idx], kp(src_imgs), src_txt.to(dtype), kp(tgt_imgs),
                                        tgt_txt.to(dtype))
            tokens = tokens.clone()
            tokens[edit_idx] = edited
        regions = self.regions(identities)
        for i in range(n):
            results.append(IdentityResult(region=[round(float(v), 6) for v in regions[i]], edited=i in tgt_prompts,
                                          source_prompt=src_prompt[i], target_prompt=tgt_prompts.get(i)))
        return EncodedIdentities(tokens=tokens, results=results, source_landmarks=src_lmk, target_landmarks=tgt_lmk)

    # ------------------------------------------------------------------ generation
    def denoise_step(self, latents: torch.Tensor, t: torch.Tensor, states: torch.Tensor, ctx) -> torch.Tensor:
        """One UNet evaluation: latents [B, C, h, w], states [B, T + N*K, D] -> noise [B, C, h, w].

        ``self.step_runner`` (same signature), when set, replaces it: the fast path
        (model/fast/) installs a captured/compiled runner there.
        """
        kwargs = {"cross_attention_kwargs": {"id_context": ctx}} if ctx is not None else {}
        return self.unet(latents, t, encoder_hidden_states=states, **kwargs).sample

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        identities: Sequence[IdentityInput] | Sequence[Sequence[IdentityInput]],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | list[float] = 5.0,
        id_scale: float | list[float | list[float]] | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | list[int] | None = None,
        output_type: str = "pil",
        encoded: Sequence[EncodedIdentities] | None = None,
        layout: str | None = None,
    ) -> DynamicIDOutput:
        """``encoded``: per-sample results of ``encode_identities`` already computed by the caller
        (the server analyses faces per request before batching), so no face is analysed twice.
        ``layout``: "auto" | "strips" | None (boxes if given, else auto for 2-4 people; auto_run.py).
        ``id_scale``: None (model.saa.id_scale), a float, or one entry per sample: a float, or a list
        of one scale per identity of that sample (0 drops that person's ID branch term only)."""
        from model.saa.context import IDContext, context_id_scale, request_id_scales

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        per_sample = [list(identities)] * b if (not identities or isinstance(identities[0], IdentityInput)) \
            else [list(x) for x in identities]
        if len(per_sample) != b:
            raise GenerationError(f"{b} prompts but {len(per_sample)} identity lists")
        n = len(per_sample[0])
        if any(len(x) != n for x in per_sample):
            raise GenerationError("every sample of one batch must have the same number of identities")
        res = self.model_params.active.resolution
        height, width = height or res, width or res
        for ids in per_sample:
            self.validate(ids, height, width)
        from model.saa.auto_run import AutoLayoutRun, resolve_layout
        layout_used = resolve_layout(per_sample, layout, GenerationError) if n else "none"
        negs = ([negative_prompt or ""] * b) if not isinstance(negative_prompt, list) else negative_prompt
        seeds = seed if isinstance(seed, list) else [seed if seed is not None else int(torch.seed() % 2**31)] * b
        seeds = [int(s) + (j if not isinstance(seed, list) and b > 1 else 0) for j, s in enumerate(seeds)]
        g = torch.tensor(guidance_scale if isinstance(guidance_scale, list) else [guidance_scale] * b,
                         dtype=torch.float32)
        scale = request_id_scales(id_scale, self.model_params.saa.id_scale, b, n, GenerationError)  # [b] / [b, N]
        do_cfg = bool((g > 1.0).any())

        # ModelMixin.dtype walks every named parameter (~6 ms host time at SD1.5 size, paid while
        # the GPU idles before the first step); the first parameter's dtype is the UNet's dtype.
        device, unet_dtype = self.device, param_dtype(self.unet)
        # 2-3. identities: face analysis and encoders once per request. The record_function
        # ranges name the phases in torch.profiler traces (benchmarks/image_bench.py reads them).
        if encoded is not None:
            encoded = list(encoded)
            if len(encoded) != b:
                raise GenerationError(f"{b} prompts but {len(encoded)} encoded identity sets")
        else:
            with record_function("dynamicid.encode_identities"):
                encoded = [self.encode_identities(ids) for ids in per_sample] if n else []
        # 4. prompt
        with record_function("dynamicid.prompt"):
            text, _ = text_embeddings(self.backbone, prompts)
            if n:
                id_tokens = torch.stack([e.tokens.flatten(0, 1) for e in encoded])          # [b, N*K, D]
                cond = torch.cat([text, id_tokens.to(text.dtype)], dim=1)
            else:
                cond = text
            if do_cfg:
                neg, _ = text_embeddings(self.backbone, negs)
                if n:
                    unc_ids = self.uncond_tokens().repeat(n, 1).to(neg.dtype)                 # [N*K, D]
                    neg = torch.cat([neg, unc_ids.expand(b, -1, -1)], dim=1)
                states = torch.cat([neg, cond]).to(unet_dtype)
            else:
                states = cond.to(unet_dtype)

        # 5. denoise
        vsf = 2 ** (len(self.vae.config.block_out_channels) - 1)
        lh, lw = height // vsf, width // vsf
        latents = torch.cat([
            torch.randn((1, self.unet.config.in_channels, lh, lw), generator=torch.Generator("cpu").manual_seed(s))
            for s in seeds
        ]).to(device=device, dtype=unet_dtype)
        ctx, saa, mode = None, self.model_params.saa, compat.mode_of(self)
        boost_steps = compat.boost_steps(mode, saa)  # the release skips the boost with gating off
        if n:
            # Regions stay on the host: the masks are built there (exact float64 comparisons) and
            # moved once per UNet level; a device copy would only be read back, i.e. a sync.
            regions = torch.stack([self.regions(ids) for ids in per_sample])               # [b, N, 4]
            reps = 2 if do_cfg else 1
            id_scale_arg = context_id_scale(scale, reps, device)  # float, [reps*b] or [reps*b, N]
            ctx = IDContext(
                num_ids=n, num_tokens=self.dims.num_tokens, regions=regions.repeat(reps, 1, 1),
                latent_hw=(lh, lw), id_scale=id_scale_arg, gating=saa.gating, tau=saa.tau, boost=saa.boost,
                **compat.context_options(mode, saa))
        auto = None if ctx is None or layout_used != "auto" else AutoLayoutRun(  # observe, then route (fixed step)
            ctx, batch=b, cfg=do_cfg, num_steps=num_inference_steps, device=device, params=saa.auto,
            levels=len(self.unet.config.block_out_channels), boost_steps=boost_steps)
        # Timesteps stay on the host: diffusers' schedulers index with them every step, and a
        # device tensor would force a host-GPU sync per step (measured: docs/benchmarks.md).
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        latents = latents * self.scheduler.init_noise_sigma
        g_dev = g.to(device=device, dtype=unet_dtype).view(-1, 1, 1, 1)
        with record_function("dynamicid.denoise"):
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                if ctx is not None:
                    ctx.boost_active = i < boost_steps
                ctx = auto.context_for_step(i) if auto is not None else ctx  # layout auto: observe, then route
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                noise = (self.step_runner or self.denoise_step)(model_in, t, states, ctx)
                if do_cfg:
                    uncond, condn = noise.chunk(2)
                    noise = uncond + g_dev * (condn - uncond)
                latents = self.scheduler.step(noise, t, latents).prev_sample

        # 6. decode
        with record_function("dynamicid.decode"):
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            image = (image / 2 + 0.5).clamp(0, 1)
        results = [e.results for e in encoded] if n else [[] for _ in range(b)]
        results, extra = auto.report(results) if auto is not None else (results, {"layout": layout_used})
        if output_type == "pt":  # images: a tensor
            return DynamicIDOutput(image.float().cpu(), results, seeds, **extra)  # type: ignore[arg-type]
        arr = (image.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return DynamicIDOutput(images=[Image.fromarray(a) for a in arr], identities=results, seeds=seeds, **extra)


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """A module's dtype from its first parameter (ModelMixin.dtype walks all of them)."""
    return next(module.parameters()).dtype


__all__ = ["DynamicIDPipeline", "DynamicIDOutput", "IdentityInput", "IdentityResult", "GenerationError",
           "EncodedIdentities"]

"""The training objectives of stage 1 (anchor) and stage 2 (reconfigure), as nn.Modules.

A task registers only what DeepSpeed must own (``DynamicID``: its trainable parts and the
frozen ones of the other stage) and keeps the frozen backbone as a plain attribute, so the
engine never casts, broadcasts or checkpoints the base models. ``forward(batch)`` returns
(loss, {name: detached value}) for one micro-batch; every frozen encoder runs once per batch,
on the concatenation of everything that needs it.

A step never waits for the GPU: per-sample random draws come from generators on the device
(``losses.SampleRandom``), the slots and drop flags stay host lists (``data.HOST_KEYS``) and
reach the device as masks through pinned asynchronous copies, the SAA context (whose region
masks are built on the host once) is reused across steps, and the returned values are
detached device tensors. With cached frozen features (``feature_cache``) stage 1 runs no
frozen encoder at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from components.train.data import device_flags, host_list, noise_seed
from components.train.losses import SampleRandom, encode_latents, mse, noised, posterior_sample
from model.backbone import Backbone
from model.dynamicid import DynamicID, clip_image_features, text_embeddings


CheckpointMode = bool | str  # train.gradient_checkpointing: False, True or "high_res"


def checkpoint_block_names(unet: nn.Module, mode: CheckpointMode) -> tuple[str, ...]:
    """UNet block names (module paths) whose sub-modules recompute their activations in backward.

    ``"high_res"``: the two blocks at the latent resolution (the first down block and the last up
    block). At SD1.5 size, 512 px, they hold most of the stored activations (the most tokens:
    64 x 64 at 320 channels, 4,096-token attention, the widest feed-forward inputs) while the
    lower levels, whose activations are small, are kept and not recomputed.
    """
    if mode is False:
        return ()
    if mode is True:
        return ("",)
    if mode == "high_res":
        return ("down_blocks.0", f"up_blocks.{len(unet.up_blocks) - 1}")
    raise ValueError(f"train.gradient_checkpointing must be false, true or 'high_res', got {mode!r}")


def _checkpoint(module: nn.Module, *args: Any) -> Any:
    """Non-reentrant activation checkpointing of one module call (what torch.compile can trace)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module.__call__, *args, use_reentrant=False)


def apply_gradient_checkpointing(unet: nn.Module, mode: CheckpointMode) -> list[str]:
    """Sets diffusers' per-module checkpointing flags for ``mode`` and returns the modules that now
    checkpoint. Idempotent: flags set earlier (``enable_gradient_checkpointing`` on the whole UNet)
    are reset, so this is the one place the mode is decided. Diffusers' checkpoint function is the
    non-reentrant ``torch.utils.checkpoint``, which torch.compile traces into the graph (the
    partitioner then recomputes the wrapped regions in the compiled backward)."""
    roots = checkpoint_block_names(unet, mode)
    if not roots:
        unet.disable_gradient_checkpointing()
        return []
    unet.enable_gradient_checkpointing(_checkpoint)  # installs the function on every capable module

    def chosen(name: str) -> bool:
        return any(r == "" or name == r or name.startswith(r + ".") for r in roots)

    on = []
    for name, module in unet.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = chosen(name) and name != ""
            if module.gradient_checkpointing:
                on.append(name)
    return on


class Task(nn.Module):
    """One objective: ``forward(batch) -> (loss, parts)``; the export lists the parts it owns."""

    name = "task"
    export_parts: tuple[str, ...] = ()
    seed = 0

    def sample_random(self, batch: dict[str, Any], device: torch.device | None = None) -> SampleRandom:
        """Per-sample generators keyed by each sample's slot (see losses.py), on the step's device."""
        return SampleRandom([noise_seed(self.seed, int(s)) for s in host_list(batch["slot"])],
                            self.device if device is None else device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def checkpointable_unet(self) -> nn.Module | None:
        """The UNet that ``train.gradient_checkpointing`` applies to (None: the task has none)."""
        backbone = self.__dict__.get("backbone")  # a plain attribute (dataclass), not a sub-module
        return backbone.unet if backbone is not None else self._modules.get("unet")

    def set_gradient_checkpointing(self, mode: CheckpointMode) -> list[str]:
        """Applies ``train.gradient_checkpointing`` to the task's UNet; returns the checkpointing modules."""
        unet = self.checkpointable_unet()
        return [] if unet is None else apply_gradient_checkpointing(unet, mode)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class DynamicIDTask(Task):
    """Shared by both stages: the frozen backbone and DynamicID with SAA installed in its UNet."""

    def __init__(self, backbone: Backbone, dyn: DynamicID, model_params, seed: int, compile_unet: bool = False):
        super().__init__()
        self.backbone = backbone  # a dataclass, not a Module: stays out of the engine
        self.dyn = dyn
        self.saa = model_params.saa
        self.seed = seed
        self._contexts: dict[tuple[int, int], Any] = {}
        # torch.compile'd UNet for gradient steps (``train.compile_unet``): at SD1.5 size an eager
        # step launches ~5,500 kernels and is bound by the host, not the GPU. Kept out of the
        # module tree (a registered OptimizedModule would hand the frozen UNet to DeepSpeed).
        self.__dict__["_compiled_unet"] = torch.compile(backbone.unet) if compile_unet else None

    def id_context(self, latent_hw: tuple[int, int]):
        """One IDContext per latent size, reused by every step: it caches its region masks, which
        are built on the host and copied to the device once instead of every forward."""
        from model.saa.context import IDContext

        hw = (int(latent_hw[0]), int(latent_hw[1]))
        if hw not in self._contexts:
            self._contexts[hw] = IDContext(num_ids=1, num_tokens=self.dyn.dims.num_tokens, latent_hw=hw,
                                           id_scale=1.0, gating=self.saa.gating, tau=self.saa.tau,
                                           boost=self.saa.boost)
        return self._contexts[hw]

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """UNet output for encoder states [text (77) ; ID tokens (K)]: [B, C, h, w]."""
        unet = self.backbone.unet
        states = torch.cat([text.to(unet.dtype), tokens.to(unet.dtype)], dim=1)  # [B, 77 + K, D]
        ctx = self.id_context(noisy.shape[-2:])
        # the compiled UNet only where gradients flow: checks and reference branches under no_grad
        # would each compile another graph for a few calls
        call = self.__dict__["_compiled_unet"] if torch.is_grad_enabled() else None
        run = unet if call is None else call  # (an OptimizedModule has no truth value)
        return run(noisy.to(unet.dtype), t, encoder_hidden_states=states,
                   cross_attention_kwargs={"id_context": ctx}).sample

    def face_tokens(self, embedding: torch.Tensor, crops: torch.Tensor,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
        """Face encoder on [B, D] embeddings and [B, 3, C, C] crops -> [B, K, width].

        Rows with keep=False get the unconditional inputs (zero embedding, CLIP features of a
        black crop), so dropped and kept identities share one CLIP call and one encoder call.
        """
        if keep is not None:
            k = keep.to(crops.dtype)
            crops = crops * k[:, None, None, None]
            embedding = embedding * k[:, None].to(embedding.dtype)
        clip = clip_image_features(self.backbone, crops)  # [B, L, clip_dim], no grad
        return self.encode_faces(embedding, clip)

    def encode_faces(self, embedding: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """Trainable face encoder on [B, D] embeddings and [B, L, clip_dim] CLIP features -> [B, K, width]."""
        fe = self.dyn.face_encoder
        dtype = fe.id_norm.weight.dtype
        return fe(embedding.to(device=clip.device, dtype=dtype), clip.to(dtype))


class AnchorTask(DynamicIDTask):
    """Stage 1: epsilon MSE with [text ; ID tokens]; face encoder + SAA (+ LoRA) learn, nothing else."""

    name = "anchor"
    export_parts = ("saa", "face_encoder")

    def __init__(self, backbone: Backbone, dyn: DynamicID, model_params, seed: int, compile_unet: bool = False):
        super().__init__(backbone, dyn, model_params, seed, compile_unet)
        dyn.requires_grad_(False)
        dyn.face_encoder.requires_grad_(True)
        dyn.saa.requires_grad_(True)
        self.constants = None  # feature_cache.CachedConstants once features are cached

    def use_cached_features(self, constants) -> None:
        """Batches will carry cached encoder outputs; ``constants`` are the unconditional inputs."""
        self.constants = constants

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "moments" in batch:
            return self.forward_cached(batch)
        device = self.device
        rand = self.sample_random(batch, device)
        latents = encode_latents(self.backbone.vae, batch["pixels"], rand)  # [B, C, h, w]
        captions = ["" if drop else c for c, drop in zip(batch["caption"], host_list(batch["drop_text"]))]
        text, _ = text_embeddings(self.backbone, captions)  # [B, 77, D]
        keep = ~device_flags(batch["drop_id"], batch["face_crop"].device)
        tokens = self.face_tokens(batch["embedding"], batch["face_crop"], keep=keep)  # [B, K, D]
        noisy, t, target = noised(self.backbone.scheduler, latents, rand)
        loss = mse(self.predict(noisy, t, text, tokens), target)
        return loss, {"loss": loss.detach()}

    def forward_cached(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same objective from cached encoder outputs: a fresh posterior sample of the cached
        moments, the cached empty prompt for dropped text, zero embedding + black-crop CLIP
        features for a dropped ID (exactly what the encoders give for those inputs)."""
        if self.constants is None:
            raise RuntimeError("batch has cached features but use_cached_features() was not called")
        moments = batch["moments"]  # [B, 2C, h, w]
        device = moments.device
        rand = self.sample_random(batch, device)
        latents = posterior_sample(moments, rand, self.backbone.vae.config.scaling_factor)  # [B, C, h, w]
        drop_text = device_flags(batch["drop_text"], device)[:, None, None]  # [B, 1, 1]
        text = torch.where(drop_text, self.constants.empty_text.to(batch["text"].dtype), batch["text"])  # [B, 77, D]
        drop_id = device_flags(batch["drop_id"], device)
        clip = torch.where(drop_id[:, None, None], self.constants.black_clip.to(batch["clip"].dtype), batch["clip"])
        embedding = batch["embedding"] * (~drop_id)[:, None].to(batch["embedding"].dtype)  # [B, D]
        tokens = self.encode_faces(embedding, clip)  # [B, K, D]
        noisy, t, target = noised(self.backbone.scheduler, latents, rand)
        loss = mse(self.predict(noisy, t, text, tokens), target)
        return loss, {"loss": loss.detach()}


class ReconfigureTask(DynamicIDTask):
    """Stage 2: IMR + keypoint encoder learn to move a person's tokens to another motion.

    Losses (method.md): feature matching to the target image's tokens, denoising consistency
    through the frozen UNet (the target-token branch without gradient), and optionally InfoNCE
    on the motion-erased tokens of the same person in two motions.
    """

    name = "reconfigure"
    export_parts = ("saa", "face_encoder", "imr", "keypoint_encoder")

    def __init__(self, backbone: Backbone, dyn: DynamicID, model_params, seed: int, *, prompt: str,
                 feature_weight: float, denoise_weight: float, contrastive_weight: float, temperature: float):
        super().__init__(backbone, dyn, model_params, seed)
        dyn.requires_grad_(False)
        dyn.imr.requires_grad_(True)
        dyn.keypoint_encoder.requires_grad_(True)
        self.prompt = prompt
        self.weights = (feature_weight, denoise_weight, contrastive_weight)
        self.temperature = temperature

    def motion(self, landmarks: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, L] landmark images + [B, Dt] pooled face-prompt embeddings -> motion latents [B, M, W]."""
        kp = self.dyn.keypoint_encoder
        feature = kp(landmarks.to(device=pooled_text.device, dtype=kp.head.weight.dtype))
        return self.dyn.imr.motion(feature, pooled_text)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        imr = self.dyn.imr
        b, n_t = batch["tgt_crop"].shape[:2]
        n = b * n_t
        rand = self.sample_random(batch)
        # Frozen face encoder: sources and targets in one call.
        with torch.no_grad():
            tokens = self.face_tokens(torch.cat([batch["src_embedding"], batch["tgt_embedding"].flatten(0, 1)]),
                                      torch.cat([batch["src_crop"], batch["tgt_crop"].flatten(0, 1)]))
        src_tok, tgt_tok = tokens[:b], tokens[b:]  # [B, K, D], [N, K, D] (target j of source i at i * T + j)
        prompts = list(batch["src_prompt"]) + [p for row in batch["tgt_prompt"] for p in row] + [self.prompt]
        hidden, pooled = text_embeddings(self.backbone, prompts)  # one text-encoder call
        landmarks = torch.cat([batch["src_landmarks"], batch["tgt_landmarks"].flatten(0, 1)])  # [B + N, 1, L, L]
        motion = self.motion(landmarks, pooled[: b + n])  # [B + N, M, W]
        fw, dw, cw = self.weights
        if cw > 0:  # erase motion from targets too: the second view of each person
            erased = imr.disentangle(tokens, motion)  # [B + N, K, W]
        else:
            erased = imr.disentangle(src_tok, motion[:b])  # [B, K, W]

        # Terms with weight 0 are not computed at all (no wasted UNet passes, no zero gradients).
        parts: dict[str, torch.Tensor] = {}
        terms: list[torch.Tensor] = []
        if fw > 0 or dw > 0:
            pred = imr.entangle(erased[:b].repeat_interleave(n_t, dim=0), motion[b:])  # [N, K, D]
        if fw > 0:
            feature = mse(pred, tgt_tok)
            terms.append(fw * feature)
            parts["feature"] = feature.detach()
        if dw > 0:
            latents = encode_latents(self.backbone.vae, batch["tgt_pixels"].flatten(0, 1), rand, per=n_t)  # [N, C, h, w]
            noisy, t, _ = noised(self.backbone.scheduler, latents, rand, per=n_t)
            text = hidden[-1:].expand(n, -1, -1)  # the fixed prompt, [N, 77, D]
            with torch.no_grad():
                reference = self.predict(noisy, t, text, tgt_tok)
            denoise = mse(self.predict(noisy, t, text, pred), reference)
            terms.append(dw * denoise)
            parts["denoise"] = denoise.detach()
        if cw > 0:
            from model.imr import info_nce

            views = erased[b:].unflatten(0, (b, n_t))  # [B, T, K, W]
            contrastive = sum(info_nce(erased[:b], views[:, j], self.temperature) for j in range(n_t)) / n_t
            terms.append(cw * contrastive)
            parts["contrastive"] = contrastive.detach()
        loss = torch.stack(terms).sum()
        parts["loss"] = loss.detach()
        return loss, parts

    @torch.no_grad()
    def edit(self, src_tok: torch.Tensor, src_landmarks: torch.Tensor, src_prompts: list[str],
             tgt_landmarks: torch.Tensor, tgt_prompts: list[str]) -> torch.Tensor:
        """Inference form of the IMR (used by the learning check): [B, K, D] -> edited [B, K, D]."""
        b = src_tok.shape[0]
        _, pooled = text_embeddings(self.backbone, list(src_prompts) + list(tgt_prompts))
        motion = self.motion(torch.cat([src_landmarks, tgt_landmarks]), pooled)
        return self.dyn.imr.entangle(self.dyn.imr.disentangle(src_tok, motion[:b]), motion[b:])

"""Tiny profile only: the objectives of the ``base`` stage, which turns the seeded random tiny
base into a small text-to-image model that already draws faces (as SD1.5 does for the real
profile), so stage 1 learns identity injection rather than image formation.

Two phases: the VAE as an autoencoder (a random decoder cannot invert a random encoder), then
the UNet on the trained VAE's latents with the frozen text encoder, SD-style (epsilon MSE,
captions emptied at a rate for classifier-free guidance).
"""

from __future__ import annotations

from typing import Any

import torch

from components.train.losses import encode_latents, mse, noised
from components.train.tasks import Task
from model.backbone import Backbone
from model.dynamicid import text_embeddings


class VAETask(Task):
    """Reconstruction MSE + a small KL term (keeps the latent scale bounded)."""

    name = "vae"

    def __init__(self, vae: torch.nn.Module, kl_weight: float, seed: int):
        super().__init__()
        self.vae = vae.requires_grad_(True)
        self.kl_weight = kl_weight
        self.seed = seed

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rand = self.sample_random(batch)
        x = batch["pixels"] * 2.0 - 1.0  # [B, 3, H, W] in [-1, 1]
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        eps = rand.randn(dist.mean.shape[1:]).to(dist.mean)
        recon = self.vae.decode(dist.mean + dist.std * eps).sample
        rec_loss = mse(recon, x)
        kl = dist.kl().float().mean()  # summed over latent dims, averaged over the batch
        loss = rec_loss + self.kl_weight * kl
        return loss, {"loss": loss.detach(), "recon": rec_loss.detach(), "kl": kl.detach()}


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, pixels: torch.Tensor) -> float:
    """1 / std of the posterior means: SD's scaling_factor, so the UNet sees unit-variance latents."""
    x = (pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    return float(1.0 / vae.encode(x).latent_dist.mean.float().std().clamp_min(1e-6))


class BaseUNetTask(Task):
    """Text-to-image epsilon MSE on the frozen VAE's latents; the whole UNet learns."""

    name = "base"

    def __init__(self, backbone: Backbone, seed: int):
        super().__init__()
        self.backbone = backbone  # dataclass: VAE and text encoder stay out of the engine
        self.unet = backbone.unet.requires_grad_(True)
        self.seed = seed

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rand = self.sample_random(batch)
        latents = encode_latents(self.backbone.vae, batch["pixels"], rand)
        text, _ = text_embeddings(self.backbone, list(batch["caption"]))
        noisy, t, target = noised(self.backbone.scheduler, latents, rand)
        pred = self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=text.to(self.unet.dtype)).sample
        loss = mse(pred, target)
        return loss, {"loss": loss.detach()}

"""Diffusion-training arithmetic shared by the stages and the learning checks.

Randomness is per sample: every sample of a batch draws its latent sample, noise and timestep
from its own generator seeded by (seed, slot) (``data.noise_seed``). What a sample gets
therefore depends only on its slot, not on the batch it lands in: a run on 2 processes with
micro-batch 2 sees exactly the samples, noise and timesteps of a run on 1 process with
micro-batch 4, and a resumed run those of the uninterrupted one.

The generators live on the device that consumes the draws (``torch.Generator(device)``: on a
GPU that is Philox, seeded from the host with no transfer), so a training step copies no random
tensor from the host and never waits for the GPU. CPU and CUDA generators give different
streams for one seed: a run is reproducible on the device type it ran on (resume included).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


class SampleRandom:
    """One generator per sample, on ``device``; draws are stacked along the batch dimension.

    ``per`` > 1 draws ``per`` rows for each sample (stage 2: one per target image), giving
    [B * per, ...] in sample-major order. Seeding a CUDA generator only sets host-side Philox
    state, and each draw is one kernel: nothing here synchronises with the GPU.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.gens = [generator(s, self.device) for s in seeds]

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, shape: Sequence[int], per: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn((per, *shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.gens]).flatten(0, 1)

    def randint(self, high: int, per: int = 1) -> torch.Tensor:
        return torch.stack([torch.randint(0, high, (per,), generator=g, device=self.device)
                            for g in self.gens]).flatten(0, 1)


def posterior_sample(moments: torch.Tensor, rand: SampleRandom, scaling_factor: float, per: int = 1) -> torch.Tensor:
    """VAE posterior moments [B * per, 2C, h, w] (mean ; logvar, diffusers' layout) -> scaled latent sample.

    The same arithmetic as diffusers' DiagonalGaussianDistribution (logvar clamped to [-30, 20],
    std = exp(logvar / 2)), in the moments' dtype, so cached moments give exactly the latents an
    encoder call would give for the same draw.
    """
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    eps = rand.randn(mean.shape[1:], per, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] in [0, 1] -> posterior moments [B, 2C, h, w] (mean ; logvar) in the VAE's dtype."""
    x = (pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.parameters


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, rand: SampleRandom, per: int = 1) -> torch.Tensor:
    """pixels [B * per, 3, H, W] in [0, 1] -> scaled latents [B * per, C, h, w], a posterior sample as SD trains."""
    return posterior_sample(encode_moments(vae, pixels), rand, vae.config.scaling_factor, per)


def noised(scheduler, latents: torch.Tensor, rand: SampleRandom, per: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (noisy latents, timesteps [B * per], training target) for the scheduler's prediction type."""
    noise = rand.randn(latents.shape[1:], per, dtype=latents.dtype)
    t = rand.randint(int(scheduler.config.num_train_timesteps), per)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    return noisy, t, target


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, ...] x [B, ...] -> [B] mean squared error in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())

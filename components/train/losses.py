"""Diffusion-training arithmetic shared by the stages and the learning checks.

Randomness is per sample: every sample of a batch draws its latent sample, noise and timestep
from its own CPU generator seeded by (seed, slot) (``data.noise_seed``). What a sample gets
therefore depends only on its slot, not on the batch it lands in: a run on 2 processes with
micro-batch 2 sees exactly the samples, noise and timesteps of a run on 1 process with
micro-batch 4, and a resumed run those of the uninterrupted one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


class SampleRandom:
    """One generator per sample; draws are stacked along the batch dimension.

    ``per`` > 1 draws ``per`` rows for each sample (stage 2: one per target image), giving
    [B * per, ...] in sample-major order.
    """

    def __init__(self, seeds: Sequence[int]):
        self.gens = [generator(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, shape: Sequence[int], per: int = 1) -> torch.Tensor:
        return torch.stack([torch.randn((per, *shape), generator=g) for g in self.gens]).flatten(0, 1)

    def randint(self, high: int, per: int = 1) -> torch.Tensor:
        return torch.stack([torch.randint(0, high, (per,), generator=g) for g in self.gens]).flatten(0, 1)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, rand: SampleRandom, per: int = 1) -> torch.Tensor:
    """pixels [B * per, 3, H, W] in [0, 1] -> scaled latents [B * per, C, h, w], a posterior sample as SD trains."""
    x = (pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    eps = rand.randn(dist.mean.shape[1:], per).to(device=dist.mean.device, dtype=dist.mean.dtype)
    return (dist.mean + dist.std * eps) * vae.config.scaling_factor


def noised(scheduler, latents: torch.Tensor, rand: SampleRandom, per: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (noisy latents, timesteps [B * per], training target) for the scheduler's prediction type."""
    noise = rand.randn(latents.shape[1:], per).to(device=latents.device, dtype=latents.dtype)
    t = rand.randint(int(scheduler.config.num_train_timesteps), per).to(latents.device)
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

"""Identity-Motion Reconfigurator (method.md, Components 3): edit the motion held in ID tokens.

The face encoder's tokens describe a person *as photographed*: identity entangled with the
reference's expression and head pose. The IMR first erases the source motion (disentangle net,
conditioned on the source motion latents) and then writes a requested motion in (entangle net,
conditioned on the target motion latents). Motion is described twice, as landmarks (where the
face parts are: a rendered dot image through ``KeypointEncoder``) and as text (what the
expression is: the pooled CLIP embedding of a face prompt); the MLP of ``IMR.motion`` fuses the
two into a few latents. Every identity is processed on its own (batch dim = identities), so each
person in a multi-ID image can get a different edit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import IMRParams
from model.face_encoder import FeedForward, PerceiverAttention


class KeypointEncoder(nn.Module):
    """CNN over a rendered landmark image [B, 1, S, S] -> motion-landmark feature [B, feature_dim].

    Stride-2 3x3 convolutions (the kernel is wider than the stride, so no single-pixel dot falls
    between taps) followed by a Linear over the *flattened* map rather than global pooling:
    pooling would throw away where the dots are, and position is the whole signal here.
    """

    def __init__(self, image_size: int = 96, feature_dim: int = 768, channels: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        if image_size < 1 or feature_dim < 1 or not channels or min(channels) < 1:
            raise ValueError(f"KeypointEncoder: bad dims image_size={image_size} feature_dim={feature_dim} "
                             f"channels={channels}")
        self.image_size = image_size
        blocks: list[nn.Module] = []
        in_ch, side = 1, image_size
        for ch in channels:
            blocks += [
                nn.Conv2d(in_ch, ch, kernel_size=3, stride=2, padding=1),
                # GroupNorm, not BatchNorm: training batches are small (identities per step) and
                # inference runs one identity at a time.
                nn.GroupNorm(_groups(ch), ch),
                nn.SiLU(),
            ]
            in_ch, side = ch, (side + 1) // 2  # k3 s2 p1: ceil(side / 2)
        self.convs = nn.Sequential(*blocks)
        self.head = nn.Linear(in_ch * side * side, feature_dim)

    @classmethod
    def from_params(cls, params: IMRParams) -> "KeypointEncoder":
        return cls(image_size=params.landmark_size, feature_dim=params.landmark_feature_dim)

    def forward(self, landmark_image: Tensor) -> Tensor:
        # landmark_image [B, 1, S, S] -> [B, feature_dim]
        expected = (1, self.image_size, self.image_size)
        if landmark_image.ndim != 4 or tuple(landmark_image.shape[1:]) != expected:
            raise ValueError(f"KeypointEncoder: expected [B, {', '.join(map(str, expected))}], "
                             f"got {list(landmark_image.shape)}")
        x = self.convs(landmark_image.to(self.head.weight.dtype))  # [B, C, s, s]
        return self.head(x.flatten(1))  # [B, feature_dim]


def _groups(channels: int, preferred: int = 8) -> int:
    """Largest group count <= preferred that divides ``channels`` (tiny profiles use odd widths)."""
    return max(g for g in range(1, preferred + 1) if channels % g == 0)


class IMRLayer(nn.Module):
    """Perceiver cross-attention to [tokens ; motion latents] + self-attention + FFN, each residual."""

    def __init__(self, width: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.cross = PerceiverAttention(width, heads, dim_head, with_context=True)
        self.self_attn = PerceiverAttention(width, heads, dim_head, with_context=False)
        self.ff = FeedForward(width, ff_mult)

    def forward(self, tokens: Tensor, motion: Tensor) -> Tensor:
        # tokens [B, K, width], motion [B, M, width] -> [B, K, width]
        tokens = self.cross(tokens, motion) + tokens
        tokens = self.self_attn(tokens) + tokens
        return self.ff(tokens) + tokens


class IMR(nn.Module):
    """Source tokens + source motion + target motion -> motion-edited ID tokens (same shape as the input).

    The output keeps ``token_dim`` so SAA consumes edited tokens exactly like the face encoder's.
    """

    def __init__(
        self,
        token_dim: int = 768,
        width: int = 1024,
        landmark_dim: int = 768,
        text_dim: int = 768,
        num_latents: int = 4,
        depth: int = 1,
        heads: int = 16,
        dim_head: int = 64,
        ff_mult: int = 4,
        norm_in: bool = False,
        motion_mlp: str = "dynamicid",
    ):
        super().__init__()
        if motion_mlp not in ("dynamicid", "release"):
            raise ValueError(f"IMR: motion_mlp must be 'dynamicid' or 'release', got {motion_mlp!r}")
        for name, value in dict(token_dim=token_dim, width=width, landmark_dim=landmark_dim, text_dim=text_dim,
                                num_latents=num_latents, depth=depth, heads=heads, dim_head=dim_head,
                                ff_mult=ff_mult).items():
            if value < 1:
                raise ValueError(f"IMR: {name} must be >= 1, got {value}")
        self.token_dim, self.width, self.num_latents = token_dim, width, num_latents
        self.landmark_dim, self.text_dim = landmark_dim, text_dim
        motion_in = landmark_dim + text_dim
        # The leading LayerNorm matters: the CNN feature and the CLIP text embedding live on very
        # different scales, and without it one of them would dominate the fused latents.
        if motion_mlp == "dynamicid":
            self.motion_mlp = nn.Sequential(
                nn.LayerNorm(motion_in),
                nn.Linear(motion_in, width),
                nn.GELU(),
                nn.Linear(width, num_latents * width),
            )
        else:  # the research release's shape (docs/release.md): a second LayerNorm and a GELU on the latents
            self.motion_mlp = nn.Sequential(
                nn.LayerNorm(motion_in),
                nn.Linear(motion_in, width),
                nn.GELU(),
                nn.LayerNorm(width),
                nn.Linear(width, num_latents * width),
                nn.GELU(),
            )
        # The release normalises the incoming tokens; a LayerNorm's normalisation cannot be folded into proj_in.
        self.norm_in = nn.LayerNorm(token_dim) if norm_in else None
        self.proj_in = nn.Linear(token_dim, width)
        self.disentangle_layers = nn.ModuleList(IMRLayer(width, heads, dim_head, ff_mult) for _ in range(depth))
        self.entangle_layers = nn.ModuleList(IMRLayer(width, heads, dim_head, ff_mult) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, token_dim)

    @classmethod
    def from_params(cls, params: IMRParams, *, token_dim: int, text_dim: int) -> "IMR":
        """Build from ``model.<profile>.imr``. IMRParams has no dim_head: width // heads (64 for SD1.5, as released)."""
        return cls(token_dim=token_dim, width=params.width, landmark_dim=params.landmark_feature_dim,
                   text_dim=text_dim, num_latents=params.num_latents, depth=params.depth, heads=params.heads,
                   dim_head=max(1, params.width // params.heads), ff_mult=params.ff_mult, norm_in=params.norm_in,
                   motion_mlp=params.motion_mlp)

    def motion(self, landmark_feature: Tensor, text_feature: Tensor) -> Tensor:
        """[B, landmark_dim], [B, text_dim] -> motion latents [B, num_latents, width]."""
        if landmark_feature.ndim != 2 or landmark_feature.shape[1] != self.landmark_dim:
            raise ValueError(f"IMR: landmark feature must be [B, {self.landmark_dim}], "
                             f"got {list(landmark_feature.shape)}")
        if text_feature.ndim != 2 or text_feature.shape[1] != self.text_dim:
            raise ValueError(f"IMR: text feature must be [B, {self.text_dim}], got {list(text_feature.shape)}")
        if landmark_feature.shape[0] != text_feature.shape[0]:
            raise ValueError(f"IMR: batch mismatch between landmark ({landmark_feature.shape[0]}) and "
                             f"text ({text_feature.shape[0]}) features")
        dtype = self.proj_in.weight.dtype
        fused = torch.cat([landmark_feature.to(dtype), text_feature.to(dtype)], dim=-1)  # [B, Ld + Td]
        return self.motion_mlp(fused).unflatten(-1, (self.num_latents, self.width))  # [B, M, width]

    def disentangle(self, tokens: Tensor, source_motion: Tensor) -> Tensor:
        """[B, K, token_dim] + source latents [B, M, width] -> motion-erased tokens [B, K, width]."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"IMR: tokens must be [B, K, {self.token_dim}], got {list(tokens.shape)}")
        self._check_motion(source_motion, tokens.shape[0])
        x = tokens.to(self.proj_in.weight.dtype)
        if self.norm_in is not None:
            x = self.norm_in(x)
        x = self.proj_in(x)  # [B, K, width]
        for layer in self.disentangle_layers:
            x = layer(x, source_motion)
        return x

    def entangle(self, erased: Tensor, target_motion: Tensor) -> Tensor:
        """Motion-erased [B, K, width] + target latents [B, M, width] -> edited tokens [B, K, token_dim]."""
        if erased.ndim != 3 or erased.shape[-1] != self.width:
            raise ValueError(f"IMR: erased tokens must be [B, K, {self.width}], got {list(erased.shape)}")
        self._check_motion(target_motion, erased.shape[0])
        x = erased
        for layer in self.entangle_layers:
            x = layer(x, target_motion)
        return self.proj_out(self.norm_out(x))  # [B, K, token_dim]

    def forward(
        self,
        tokens: Tensor,
        source_landmark_feature: Tensor,
        source_text_feature: Tensor,
        target_landmark_feature: Tensor,
        target_text_feature: Tensor,
        return_erased: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Edited tokens [B, K, token_dim]; with ``return_erased`` also the erased tokens [B, K, width] (for info_nce)."""
        erased = self.disentangle(tokens, self.motion(source_landmark_feature, source_text_feature))
        edited = self.entangle(erased, self.motion(target_landmark_feature, target_text_feature))
        return (edited, erased) if return_erased else edited

    def _check_motion(self, motion: Tensor, batch: int) -> None:
        if motion.ndim != 3 or motion.shape[0] != batch or motion.shape[-1] != self.width:
            raise ValueError(f"IMR: motion latents must be [{batch}, M, {self.width}], got {list(motion.shape)}")


def info_nce(erased_a: Tensor, erased_b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between two views of the same identities (method.md, Stage 2, optional term).

    Row i of ``erased_a`` and of ``erased_b`` are the motion-erased tokens [B, K, W] of the SAME
    person in two different motions; every other row is another person. If the disentangle net
    really erased motion, the two views of one person should be closer to each other than to
    anyone else, which is exactly what this loss rewards: tokens are mean-pooled over K and
    L2-normalised, cosine similarities / temperature are the logits, and the cross-entropy with
    the diagonal as targets is averaged over both directions (a -> b and b -> a).
    Needs B >= 2 to carry any signal (with one identity there are no negatives and the loss is 0).
    """
    if erased_a.shape != erased_b.shape or erased_a.ndim != 3:
        raise ValueError(f"info_nce: need two [B, K, W] tensors of one shape, got {list(erased_a.shape)} "
                         f"and {list(erased_b.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    a = F.normalize(erased_a.mean(dim=1), dim=-1)  # [B, W]
    b = F.normalize(erased_b.mean(dim=1), dim=-1)  # [B, W]
    logits = a @ b.T / temperature  # [B, B]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

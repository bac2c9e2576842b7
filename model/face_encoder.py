"""Face encoder of DynamicID (method.md, Components 1): identity embedding -> K ID tokens.

Two sources describe a face: the recognition embedding (ArcFace 512-d, or dlib 128-d in the
tiny profile) carries *who* the person is but nothing about appearance details, while the
CLIP image features of the crop carry appearance (hair, skin, lighting) but weak identity.
An MLP turns the embedding into K tokens in the UNet's cross-attention space; a perceiver
resampler then lets those tokens read the CLIP features, so identity anchors the tokens and
CLIP fills in detail. The attention blocks here (``PerceiverAttention``, ``FeedForward``) are
reused by the IMR (model/imr.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import FaceEncoderParams


class FeedForward(nn.Module):
    """Pre-norm MLP block (LayerNorm -> Linear x mult -> GELU -> Linear); the caller adds the residual."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:  # [B, N, dim] -> [B, N, dim]
        return self.net(x)


class PerceiverAttention(nn.Module):
    """Multi-head attention of a few latent tokens over ``[context ; latents]``.

    Letting the latents attend to themselves as well as to the context (the perceiver-resampler
    trick) means a latent can keep its own content when the context has nothing relevant, which
    matters for the ID tokens: identity must survive even if the CLIP features are uninformative.
    With ``context=None`` this is plain self-attention over the latents (build it with
    ``with_context=False`` so that no unused context norm is created). Keys carry no positional
    encoding, so the order of ``[context ; latents]`` does not change the result (softmax over keys
    is permutation invariant); the IMR's "[tokens ; motion]" is the same operation.
    The product runs through ``F.scaled_dot_product_attention`` (fused kernels on GPU, no
    [B, heads, N, M] score tensor kept by us). The caller adds the residual.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, with_context: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_latents = nn.LayerNorm(dim)
        # A separate norm for the context: its statistics (CLIP features, motion latents) differ from the latents'.
        # The context must already be projected to ``dim`` (the keys/values of both share to_kv).
        self.norm_context = nn.LayerNorm(dim) if with_context else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: Tensor, context: Tensor | None = None) -> Tensor:
        # latents [B, N, dim], context [B, M, dim] or None -> [B, N, dim]
        lat = self.norm_latents(latents)
        if context is None:
            kv_in = lat  # [B, N, dim]
        else:
            if self.norm_context is None:
                raise ValueError("this attention was built without a context (with_context=False)")
            kv_in = torch.cat([self.norm_context(context), lat], dim=1)  # [B, M + N, dim]
        q = self.to_q(lat).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, h, N, d]
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        k = k.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, h, M + N, d]
        v = v.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, h, M + N, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, N, dim]


class FaceEncoder(nn.Module):
    """ArcFace (or dlib) embedding + CLIP image features -> ``num_tokens`` ID tokens of ``token_dim``.

    ``token_dim`` must equal the UNet's cross-attention width (768 for SD1.5) because SAA appends
    these tokens to the text tokens unchanged.
    """

    def __init__(
        self,
        id_dim: int = 512,
        clip_dim: int = 1280,
        token_dim: int = 768,
        num_tokens: int = 4,
        depth: int = 4,
        heads: int = 12,
        dim_head: int = 64,
        ff_mult: int = 4,
        shortcut: bool = False,
        shortcut_scale: float = 1.0,
        proj_out: bool = False,
    ):
        super().__init__()
        for name, value in dict(id_dim=id_dim, clip_dim=clip_dim, token_dim=token_dim, num_tokens=num_tokens,
                                depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult).items():
            if value < 1:
                raise ValueError(f"FaceEncoder: {name} must be >= 1, got {value}")
        self.id_dim, self.clip_dim, self.token_dim, self.num_tokens = id_dim, clip_dim, token_dim, num_tokens
        self.shortcut, self.shortcut_scale = shortcut, shortcut_scale
        # id_dim -> 2*id_dim -> GELU -> K*token_dim; per-token LayerNorm puts every token on the
        # scale of the text tokens it is concatenated with.
        self.id_mlp = nn.Sequential(
            nn.Linear(id_dim, 2 * id_dim),
            nn.GELU(),
            nn.Linear(2 * id_dim, num_tokens * token_dim),
        )
        self.id_norm = nn.LayerNorm(token_dim)
        self.clip_proj = nn.Linear(clip_dim, token_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(token_dim, heads, dim_head),
                           FeedForward(token_dim, ff_mult)])
            for _ in range(depth)
        )
        # The research release has a Linear between the last layer and the output norm. It sits in the residual
        # stream right before a LayerNorm, so it cannot be folded away: imported weights need it (docs/release.md).
        self.proj_out = nn.Linear(token_dim, token_dim) if proj_out else None
        self.norm_out = nn.LayerNorm(token_dim)

    @classmethod
    def from_params(cls, params: FaceEncoderParams, *, id_dim: int, clip_dim: int, token_dim: int,
                    num_tokens: int) -> "FaceEncoder":
        """Build from the ``model.<profile>.face_encoder`` section; the dims come from the base models."""
        return cls(id_dim=id_dim, clip_dim=clip_dim, token_dim=token_dim, num_tokens=num_tokens,
                   depth=params.depth, heads=params.heads, dim_head=params.dim_head, ff_mult=params.ff_mult,
                   shortcut=params.shortcut, shortcut_scale=params.shortcut_scale, proj_out=params.proj_out)

    def id_tokens(self, id_embeds: Tensor) -> Tensor:
        """The MLP + per-token LayerNorm path alone (also the shortcut's base): [B, id_dim] -> [B, K, token_dim]."""
        if id_embeds.ndim != 2 or id_embeds.shape[1] != self.id_dim:
            raise ValueError(f"FaceEncoder: id_embeds must be [B, {self.id_dim}], got {list(id_embeds.shape)}")
        x = self.id_mlp(id_embeds.to(self.id_norm.weight.dtype))  # [B, K * token_dim]
        return self.id_norm(x.unflatten(-1, (self.num_tokens, self.token_dim)))  # [B, K, token_dim]

    def forward(self, id_embeds: Tensor, clip_features: Tensor) -> Tensor:
        # id_embeds [B, id_dim], clip_features [B, L, clip_dim] -> [B, K, token_dim]
        if clip_features.ndim != 3 or clip_features.shape[-1] != self.clip_dim:
            raise ValueError(f"FaceEncoder: clip_features must be [B, L, {self.clip_dim}], "
                             f"got {list(clip_features.shape)}")
        if clip_features.shape[0] != id_embeds.shape[0]:
            raise ValueError(f"FaceEncoder: batch mismatch, id_embeds has {id_embeds.shape[0]} rows and "
                             f"clip_features {clip_features.shape[0]}")
        tokens = self.id_tokens(id_embeds)  # [B, K, token_dim]
        context = self.clip_proj(clip_features.to(tokens.dtype))  # [B, L, token_dim]
        refined = tokens
        for attn, ff in self.layers:
            refined = attn(refined, context) + refined
            refined = ff(refined) + refined
        if self.proj_out is not None:
            refined = self.proj_out(refined)
        refined = self.norm_out(refined)  # [B, K, token_dim]
        if self.shortcut:
            # Shortcut keeps the embedding's tokens as the backbone and lets CLIP add a scaled correction.
            return tokens + self.shortcut_scale * refined
        return refined

    def unconditional_tokens(self, clip_features_of_zero_image: Tensor) -> Tensor:
        """Tokens of the classifier-free-guidance branch (method.md, Components 1).

        The "no identity" condition is the same encoder on an all-zero embedding and the CLIP
        features of an all-zero image (the caller runs its CLIP image encoder on zeros, because
        this module owns no CLIP model). Using the encoder rather than zero tokens keeps the
        unconditional tokens in the distribution the UNet was trained with (ID dropout in stage 1
        feeds exactly these inputs). clip_features_of_zero_image [B, L, clip_dim] -> [B, K, token_dim].
        """
        zeros = clip_features_of_zero_image.new_zeros(clip_features_of_zero_image.shape[0], self.id_dim)
        return self(zeros, clip_features_of_zero_image)

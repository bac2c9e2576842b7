"""LoRA for the UNet's attentions: the adapter, its q/k/v/out host, and the self-attention processor.

``LoRALinear`` is one low-rank adapter; ``_LoRAHost`` holds the four of one attention, folds
them into the base weights (``merge_into``) and carries AttnProcessor2_0's SDPA plumbing
(``_enter``, ``_attend``, ``_leave``) that both processors share; ``LoRAAttnProcessor`` is the
self-attention processor (LoRA only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # diffusers is imported lazily: model/ imports must stay cheap for light users
    from diffusers.models.attention_processor import Attention

from model.saa.context import IDContext


class LoRALinear(nn.Module):
    """Low-rank adapter ``x -> scale * up(down(x))`` added to a frozen base projection.

    ``up`` starts at zero so that installing LoRA leaves the model's output unchanged bit for
    bit; ``scale = alpha / rank`` decouples the learning rate from the rank. The adapter runs
    in its own dtype (e.g. fp32 LoRA on an fp16 UNet) and returns the caller's dtype.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        dtype = self.down.weight.dtype
        return (self.up(self.down(x.to(dtype))) * self.scale).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """[out, in] fp32: the dense update this adapter adds to its base weight."""
        return (self.up.weight.float() @ self.down.weight.float()) * self.scale


_LORA_TARGETS = (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out"))


class _LoRAHost(nn.Module):
    """Holds the four LoRA adapters of one attention (q, k, v, out) and the shared SDPA plumbing."""

    def __init__(self, hidden_size: int, kv_dim: int, query_dim: int, lora_rank: int, lora_alpha: float | None):
        super().__init__()
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_merged = False
        make = (lambda i, o: LoRALinear(i, o, lora_rank, lora_alpha)) if lora_rank > 0 else (lambda i, o: None)
        self.to_q_lora: LoRALinear | None = make(query_dim, hidden_size)
        self.to_k_lora: LoRALinear | None = make(kv_dim, hidden_size)
        self.to_v_lora: LoRALinear | None = make(kv_dim, hidden_size)
        self.to_out_lora: LoRALinear | None = make(hidden_size, query_dim)

    @property
    def has_lora(self) -> bool:
        return self.to_q_lora is not None

    @staticmethod
    def _proj(base: nn.Module, lora: LoRALinear | None, x: Tensor) -> Tensor:
        return base(x) if lora is None else base(x) + lora(x)

    @torch.no_grad()
    def merge_into(self, attn: Attention) -> None:
        """Fold the adapters into ``attn``'s base weights and drop them (idempotent)."""
        if not self.has_lora:
            return
        for lora_name, base_name in _LORA_TARGETS:
            base = getattr(attn, base_name)
            base = base[0] if base_name == "to_out" else base
            lora = getattr(self, lora_name)
            base.weight.add_(lora.delta_weight().to(device=base.weight.device, dtype=base.weight.dtype))
            setattr(self, lora_name, None)
        self.lora_merged = True

    # -------------------------------------------------------------- shared plumbing
    @staticmethod
    def _enter(attn: Attention, hidden_states: Tensor, temb: Tensor | None):
        """AttnProcessor2_0's prologue: spatial norm and 4-D -> [B, HW, C]; returns (x, residual, 4-D shape or None)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            shape4 = hidden_states.shape
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        return hidden_states, residual, shape4

    def _leave(self, attn: Attention, hidden_states: Tensor, residual: Tensor, shape4) -> Tensor:
        """Output projection (+ LoRA), dropout, 4-D restore, residual and rescale, as AttnProcessor2_0."""
        hidden_states = self._proj(attn.to_out[0], self.to_out_lora, hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape4 is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(
        self, attn: Attention, hidden_states: Tensor, context: Tensor | None, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One SDPA of ``hidden_states`` over ``context`` (None: over itself), base + LoRA projections.

        Self-attention keys come from the group-normed input, as in AttnProcessor2_0.

        Returns (attention output [B, L, inner], query in head layout [B, heads, L, d]) so the
        ID branch can reuse the query instead of projecting it again.
        """
        batch = hidden_states.shape[0]
        kv_len = (hidden_states if context is None else context).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            # [B * heads, 1 or L, S] -> [B, heads, 1 or L, S]; only the context's own columns
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            if attention_mask.shape[-1] != kv_len:
                attention_mask = attention_mask[..., :kv_len]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self._proj(attn.to_q, self.to_q_lora, hidden_states)
        if context is None:
            context = hidden_states
        key = self._proj(attn.to_k, self.to_k_lora, context)
        value = self._proj(attn.to_v, self.to_v_lora, context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, S, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, L, inner]
        return out, query


class LoRAAttnProcessor(_LoRAHost):
    """Self-attention: diffusers' AttnProcessor2_0 (one SDPA call) plus LoRA on q, k, v, out."""

    def __init__(
        self,
        hidden_size: int,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        cross_attention_dim: int | None = None,
        *,
        query_dim: int | None = None,
    ):
        super().__init__(hidden_size, cross_attention_dim or query_dim or hidden_size, query_dim or hidden_size,
                         lora_rank, lora_alpha)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        id_context: IDContext | None = None,  # accepted (and ignored) so diffusers does not warn about it
    ) -> Tensor:
        x, residual, shape4 = self._enter(attn, hidden_states, temb)
        if encoder_hidden_states is None:
            context = None
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        out, _ = self._attend(attn, x, context, attention_mask)
        return self._leave(attn, out, residual, shape4)

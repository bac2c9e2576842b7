"""SAAAttnProcessor: the cross-attention processor, text branch (base + LoRA) + gated, region-routed ID branch.

The gate a(q) of method.md is ``SAAAttnProcessor._gate``: the min-max normalised sum of the
raw ID scores of each query, zeroed below tau, and boosted inside the regions during the first
steps; the routing is the boolean SDPA mask of ``RegionMasks.allowed``.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # diffusers is imported lazily: model/ imports must stay cheap for light users
    from diffusers.models.attention_processor import Attention

from model.saa.context import IDContext, split_id_scale
from model.saa.lora import _LoRAHost
from model.saa.regions import RegionMasks

# Guards the min-max normalisation against a constant activation map (all queries equal).
_NORM_EPS = 1e-12


class SAAAttnProcessor(_LoRAHost):
    """Cross-attention: text branch (base + LoRA) + gated, region-routed ID branch.

    ``to_k_id`` / ``to_v_id`` start as copies of the layer's base ``to_k`` / ``to_v`` so that
    at step 0 ID tokens are read like text tokens; they are fully trainable (no LoRA).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        base_to_k: nn.Linear | None = None,
        base_to_v: nn.Linear | None = None,
        *,
        query_dim: int | None = None,
    ):
        super().__init__(hidden_size, cross_attention_dim, query_dim or hidden_size, lora_rank, lora_alpha)
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        with torch.no_grad():
            for mine, base in ((self.to_k_id, base_to_k), (self.to_v_id, base_to_v)):
                if base is None:
                    continue
                if tuple(base.weight.shape) != tuple(mine.weight.shape):
                    raise ValueError(
                        f"base projection has shape {tuple(base.weight.shape)}, expected {tuple(mine.weight.shape)}"
                    )
                mine.weight.copy_(base.weight)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        id_context: IDContext | None = None,
    ) -> Tensor:
        x, residual, shape4 = self._enter(attn, hidden_states, temb)
        if encoder_hidden_states is None:  # used as self-attention: plain LoRA attention
            out, _ = self._attend(attn, x, None, attention_mask)
            return self._leave(attn, out, residual, shape4)

        n_id = id_context.num_id_tokens if id_context is not None else 0
        text_len = encoder_hidden_states.shape[1] - n_id
        if text_len < 1:
            raise ValueError(
                f"encoder states have {encoder_hidden_states.shape[1]} tokens but the IDContext expects "
                f"{n_id} ID tokens after at least one text token"
            )
        text = encoder_hidden_states if n_id == 0 else encoder_hidden_states[:, :text_len].contiguous()
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        out, query = self._attend(attn, x, text, attention_mask)  # out [B, HW, inner], query [B, heads, HW, d]

        if n_id > 0 and not _is_zero_scale(id_context.id_scale):
            grid = shape4[2:] if shape4 is not None else None
            ids = encoder_hidden_states[:, text_len:]  # [B, n_id, cross_dim]
            out = self._add_id_branch(out, attn, query, ids, id_context, grid)
        return self._leave(attn, out, residual, shape4)

    def _add_id_branch(
        self, out: Tensor, attn: Attention, query: Tensor, ids: Tensor, ctx: IDContext, grid: tuple[int, int] | None
    ) -> Tensor:
        """out + id_scale * a(q) * softmax(S_masked) V_id, all [B, HW, inner].

        A per-identity id_scale [B, N] scales each identity's rows of V_id (``split_id_scale``).

        Written for few kernel launches: at inference the UNet step is launch-bound, and this
        branch runs in every cross-attention of every step.
        """
        batch, heads, seq_len, head_dim = query.shape
        w_dtype = self.to_k_id.weight.dtype
        key = self.to_k_id(ids.to(w_dtype)).to(query.dtype)  # [B, n_id, inner]
        value = self.to_v_id(ids.to(w_dtype)).to(query.dtype)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, heads, n_id, d]
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if ctx.recorder is not None:  # layout auto: per-identity gate maps (model/saa/layout_maps.py)
            ctx.recorder.record(query, key, grid if grid is not None else ctx.query_grid(seq_len))

        masks = None
        if ctx.num_ids > 1 or ctx.boost_active:
            q_h, q_w = grid if grid is not None else ctx.query_grid(seq_len)
            masks = ctx.region_masks(q_h, q_w, query.device)
            if masks.inside_any.shape[0] not in (1, batch):
                raise ValueError(
                    f"IDContext.regions are given for {masks.inside_any.shape[0]} samples, batch is {batch}"
                )

        gate = self._gate(query, key, ctx, masks)  # [B, HW] fp32
        scale = ctx.id_scale
        if isinstance(scale, Tensor) and scale.dim() == 2:  # [B, N]: one scale per person
            # per-sample factor -> the gate (below, as the [B] form); per-identity ratio -> that
            # identity's values, its K tokens (2K with mix_scale) each: [B, N] -> [B, 1, n_id, 1]
            scale, ratio = split_id_scale(scale.to(device=gate.device), batch, ctx.num_ids)
            ratio = ratio.repeat_interleave(value.shape[2] // ctx.num_ids, dim=1)
            value = value * ratio.to(value.dtype).view(ratio.shape[0], 1, -1, 1)
        if isinstance(scale, Tensor):
            scale = scale.to(device=gate.device, dtype=gate.dtype).reshape(-1)
            if scale.numel() not in (1, batch):
                raise ValueError(f"IDContext.id_scale has {scale.numel()} values, batch is {batch}")
            gate = gate * scale[:, None]
        elif float(scale) != 1.0:
            gate = gate * float(scale)

        if ctx.mix_scale is not None:
            m, k = float(ctx.mix_scale), ctx.num_tokens
            # scaling a token's key scales its scores: S[..., :K] * m and S[..., K:] * (1 - m)
            key = key * key.new_tensor([m] * k + [1.0 - m] * k).view(1, 1, -1, 1)
        allowed = masks.allowed if masks is not None else None
        id_out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=0.0, is_causal=False)
        # [B, heads, HW, d] read as [B, HW, heads, d] (a view): no copy before the fused add
        id_out = id_out.transpose(1, 2)
        out = out.view(batch, seq_len, heads, head_dim)
        gate = gate.to(out.dtype).view(batch, seq_len, 1, 1)
        return torch.addcmul(out, gate, id_out).view(batch, seq_len, heads * head_dim)

    @staticmethod
    def _gate(query: Tensor, key: Tensor, ctx: IDContext, masks: RegionMasks | None) -> Tensor:
        """a(q) of method.md: [B, HW] fp32, from raw scores (before routing and mixing).

        sum_{h,t} S[h, q, t] = Q[q] . sum_t K[t] / sqrt(d) over the full inner width. The
        min-max normalisation ignores positive factors, so the mean over tokens (and no
        1/sqrt(d)) gives the same a(q) without overflow risk in fp16: one small matmul, no
        [B, heads, HW, N*K] score tensor.
        """
        batch, heads, seq_len, head_dim = query.shape
        if ctx.gating:
            q_flat = query.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)  # a view for the usual layout
            k_mean = key.mean(dim=2).reshape(batch, heads * head_dim, 1)  # [B, inner, 1]
            act = torch.bmm(q_flat, k_mean).view(batch, seq_len).float()  # [B, HW]
            lo = act.amin(dim=1, keepdim=True)  # not aminmax: it has no derivative, and training needs one
            hi = act.amax(dim=1, keepdim=True)
            act = (act - lo) / (hi - lo).clamp_min(_NORM_EPS)
            act = act.masked_fill(act < ctx.tau, 0.0)
        else:
            act = query.new_ones((batch, seq_len), dtype=torch.float32)
        if ctx.boost_active:
            b = float(ctx.boost)
            act = torch.where(masks.inside_any, act + b, act / (b + 1.0))
        return act


def _is_zero_scale(scale: float | Tensor) -> bool:
    """A Python 0 skips the branch; a tensor never does (checking it would sync the device)."""
    return isinstance(scale, numbers.Real) and float(scale) == 0.0

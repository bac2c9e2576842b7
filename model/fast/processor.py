"""FastSAAProcessor: SAA cross-attention with the request's ID keys/values precomputed, and its install helpers.

A step runs the text attention as the base model does plus four kernels per cross-attention
(gate product, ID attention, fused gate + add); ``install_fast_processors`` swaps it in for
every plain ``SAAAttnProcessor``, ``fast_processors`` lists the installed ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.fast.gate import _tau_below, compiled_gate_add, gate_add_eager
from model.fast.id_state import StaticIDContext
from model.saa.context import IDContext
from model.saa.processor import SAAAttnProcessor

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

GateImpl = Literal["auto", "eager", "compiled"]


def _plain_layout(attn: Attention) -> bool:
    """The fast processor covers SD1.5's cross-attention layout; anything else keeps the plain one."""
    return (
        attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross
        and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
        and float(attn.rescale_output_factor) == 1.0 and attn.added_kv_proj_dim is None
    )


class FastSAAProcessor(SAAAttnProcessor):
    """SAA for inference with the request's ID work precomputed (see ``StaticIDContext``).

    Shares ``to_k_id`` / ``to_v_id`` with the processor it replaces (same state-dict keys).
    With any context other than a precomputed ``StaticIDContext`` it is the plain
    ``SAAAttnProcessor`` (training, CPU tests, callers that build their own IDContext).
    """

    def __init__(self, plain: SAAAttnProcessor, attn: Attention, name: str, gate: GateImpl = "eager"):
        if plain.has_lora:
            raise ValueError(f"{name}: merge LoRA (model.saa.install.merge_lora) before installing the fast processor")
        with torch.device("meta"):  # the ID projections are shared below: build no throwaway weights
            super().__init__(plain.hidden_size, plain.cross_attention_dim, 0, query_dim=attn.to_q.in_features)
        self.to_k_id = plain.to_k_id
        self.to_v_id = plain.to_v_id
        self.lora_merged = plain.lora_merged
        self.name = name
        self.fast_ok = _plain_layout(attn)
        self.gate_impl = gate

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        id_context: IDContext | None = None,
    ) -> Tensor:
        ctx = id_context
        if not (isinstance(ctx, StaticIDContext) and ctx.precomputed):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, id_context)
        if not self.fast_ok or attention_mask is not None or hidden_states.ndim != 3 or encoder_hidden_states is None:
            raise RuntimeError(f"{self.name}: precomputed ID context used on a layout the fast processor does not cover")
        batch, seq_len, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)  # [B, L, inner]
        key = attn.to_k(encoder_hidden_states)  # [B, T, inner]: text tokens only
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // heads
        q4 = query.view(batch, seq_len, heads, head_dim).transpose(1, 2)  # [B, heads, L, d]
        k4 = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v4 = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q4, k4, v4)  # [B, heads, L, d]
        out = out.transpose(1, 2).reshape(batch, seq_len, heads, head_dim)  # a view for the fused kernels

        layer = ctx.layers[self.name]
        if ctx.recorder is not None:  # layout auto observing: the bucket's static recorder (model/fast/buckets.py)
            ctx.recorder.record(q4, layer.key, ctx.query_grid(seq_len))
        grid = ctx.grids[ctx.query_grid(seq_len)] if (ctx.num_ids > 1 or ctx.boost_active) else None
        bias = grid.routing_bias(layer.key.shape[2]) if grid is not None else None
        id_out = F.scaled_dot_product_attention(q4, layer.key, layer.value, attn_mask=bias)  # [B, heads, L, d]
        id_out = id_out.transpose(1, 2)  # [B, L, heads, d]
        act = torch.bmm(query, layer.key_mean)  # [B, L, 1]: sum of raw ID scores up to a positive factor
        boost = (grid.boost_add, grid.boost_mul) if ctx.boost_active else None
        tau = _tau_below(ctx.tau)
        if self.gate_impl == "compiled":
            out = compiled_gate_add()(out, act, id_out, boost[0] if boost else None, boost[1] if boost else None,
                                      tau, bool(ctx.gating))
        else:
            out = gate_add_eager(out, act, id_out, tau, bool(ctx.gating), boost)
        out = attn.to_out[0](out.reshape(batch, seq_len, heads * head_dim))
        return attn.to_out[1](out)


def _attention_modules(unet: nn.Module):
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def install_fast_processors(unet: nn.Module, gate: GateImpl = "eager") -> dict[str, object]:
    """Swap every plain SAAAttnProcessor for a FastSAAProcessor; returns the replaced ones by name."""
    replaced: dict[str, object] = {}
    for name, attn in _attention_modules(unet):
        proc = attn.processor
        if isinstance(proc, FastSAAProcessor):
            proc.gate_impl = gate
        elif isinstance(proc, SAAAttnProcessor):
            replaced[name] = proc
            attn.set_processor(FastSAAProcessor(proc, attn, name, gate).to(proc.to_k_id.weight.device))
    return replaced


def fast_processors(unet: nn.Module) -> list[tuple[str, Attention, FastSAAProcessor]]:
    return [(n, a, a.processor) for n, a in _attention_modules(unet) if isinstance(a.processor, FastSAAProcessor)]

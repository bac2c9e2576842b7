"""Reference: IP-Adapter-style decoupled cross-attention without gating or routing.

out = Attn(q, text) + scale * Attn(q, ID tokens), two SDPA calls, nothing else. It is the
floor for "identity tokens through their own keys/values": SAA's gate and routing are
measured against it. Benchmarks only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SDPASelfAttnProcessor:
    """diffusers' AttnProcessor2_0 math for self-attention, accepting (and ignoring) ``id_context``
    so that diffusers neither warns nor inspects per call."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, id_context=None) -> Tensor:
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class DecoupledIDProcessor(nn.Module):
    def __init__(self, hidden: int, cross_dim: int, base_to_k: nn.Linear, base_to_v: nn.Linear):
        super().__init__()
        self.to_k_id = nn.Linear(cross_dim, hidden, bias=False)
        self.to_v_id = nn.Linear(cross_dim, hidden, bias=False)
        self.to_k_id.weight.data.copy_(base_to_k.weight.data)
        self.to_v_id.weight.data.copy_(base_to_v.weight.data)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, id_context=None) -> Tensor:
        n_id = id_context.num_id_tokens if id_context is not None else 0
        batch, seq_len, _ = hidden_states.shape
        heads = attn.heads
        text_len = encoder_hidden_states.shape[1] - n_id
        text, ids = encoder_hidden_states[:, :text_len], encoder_hidden_states[:, text_len:]
        query = attn.to_q(hidden_states)
        d = query.shape[-1] // heads

        def head4(t: Tensor) -> Tensor:
            return t.view(batch, -1, heads, d).transpose(1, 2)

        q4 = head4(query)
        out = F.scaled_dot_product_attention(q4, head4(attn.to_k(text)), head4(attn.to_v(text)))
        if n_id:
            id_out = F.scaled_dot_product_attention(q4, head4(self.to_k_id(ids)), head4(self.to_v_id(ids)))
            out = out + float(id_context.id_scale) * id_out
        out = out.transpose(1, 2).reshape(batch, seq_len, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def install_decoupled(unet: nn.Module) -> None:
    from diffusers.models.attention_processor import Attention

    for _, attn in unet.named_modules():
        if isinstance(attn, Attention):
            if attn.is_cross_attention:
                proc = DecoupledIDProcessor(attn.to_q.out_features, attn.to_k.in_features, attn.to_k, attn.to_v)
                attn.set_processor(proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype))
            else:
                attn.set_processor(SDPASelfAttnProcessor())

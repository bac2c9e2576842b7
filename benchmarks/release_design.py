"""The research release's attention-processor design, re-implemented as a measurement baseline.

Written from the facts in /work/shared/method.md ("Where the release is wrong or slow"), not
from the release's code. It computes the same SAA function as model/saa/ (checked by
benchmarks/checks.py) the way the release does, i.e. slowly:

* self-attention with LoRA builds the full attention matrix ([B*heads, HW, HW]) with
  ``Attention.get_attention_scores`` + ``bmm``;
* cross-attention runs ``scaled_dot_product_attention`` for the text, throws the result away
  and recomputes it with explicit scores / softmax / bmm;
* the gate clones the ID score tensor, and routing / boost rebuild each identity's region
  mask in a Python loop over the boxes on every call;
* LoRA (rank 128) stays unmerged: four extra low-rank matmul pairs per attention.

This lives in benchmarks/ only: it is a reference, never product code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ReleaseContext:
    """Per-call state as the release passes it: Python lists of boxes, Python scalars."""

    num_ids: int
    latent_hw: tuple[int, int]
    num_tokens: int = 4
    bboxes: list[list[float]] = field(default_factory=list)  # per identity (y0, x0, y1, x1); [] = vertical strips
    id_scale: float = 1.0
    gating: bool = True
    tau: float = 0.3
    boost: float = 4.0
    boost_active: bool = False

    def boxes(self) -> list[list[float]]:
        if self.bboxes:
            return self.bboxes
        return [[0.0, i / self.num_ids, 1.0, (i + 1) / self.num_ids] for i in range(self.num_ids)]

    @classmethod
    def of(cls, ctx) -> "ReleaseContext":
        """The release's per-call state from the project's IDContext (so the project's training
        task can drive the release processors unchanged)."""
        if ctx is None or isinstance(ctx, cls):
            return ctx
        boxes = [] if ctx.regions is None else ctx.regions.detach().cpu().reshape(-1, 4)[: ctx.num_ids].tolist()
        scale = ctx.id_scale if not isinstance(ctx.id_scale, torch.Tensor) else float(ctx.id_scale.flatten()[0])
        return cls(num_ids=ctx.num_ids, latent_hw=tuple(ctx.latent_hw), num_tokens=ctx.num_tokens, bboxes=boxes,
                   id_scale=scale, gating=ctx.gating, tau=ctx.tau, boost=ctx.boost, boost_active=ctx.boost_active)

    def grid(self, seq_len: int) -> tuple[int, int]:
        h, w = self.latent_hw
        while h * w != seq_len:
            if h == w == 1:
                raise ValueError(f"{seq_len} queries match no level of {self.latent_hw}")
            h, w = -(-h // 2), -(-w // 2)
        return h, w


class ReleaseLoRA(nn.Module):
    """x -> up(down(x)), kept unmerged at inference (the release's choice)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class _ReleaseBase(nn.Module):
    def __init__(self, query_dim: int, hidden: int, kv_dim: int, rank: int):
        super().__init__()
        self.to_q_lora = ReleaseLoRA(query_dim, hidden, rank)
        self.to_k_lora = ReleaseLoRA(kv_dim, hidden, rank)
        self.to_v_lora = ReleaseLoRA(kv_dim, hidden, rank)
        self.to_out_lora = ReleaseLoRA(hidden, query_dim, rank)

    @staticmethod
    def _enter(attn, hidden_states: Tensor, temb: Tensor | None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, residual, shape4

    def _leave(self, attn, hidden_states: Tensor, residual: Tensor, shape4) -> Tensor:
        hidden_states = attn.to_out[0](hidden_states) + self.to_out_lora(hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape4 is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _full_attention(self, attn, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """[B, L, inner] x [B, S, inner] -> [B, L, inner] through the full [B*heads, L, S] matrix."""
        qb, kb, vb = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(qb, kb, None)  # [B*heads, L, S]
        return attn.batch_to_head_dim(torch.bmm(probs, vb))


class ReleaseLoRAAttnProcessor(_ReleaseBase):
    """Self-attention: unmerged LoRA, full attention matrix."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, id_context=None) -> Tensor:
        x, residual, shape4 = self._enter(attn, hidden_states, temb)
        context = x if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(x) + self.to_q_lora(x)
        key = attn.to_k(context) + self.to_k_lora(context)
        value = attn.to_v(context) + self.to_v_lora(context)
        return self._leave(attn, self._full_attention(attn, query, key, value), residual, shape4)


class ReleaseSAAProcessor(_ReleaseBase):
    """Cross-attention: text attention twice (SDPA discarded, then explicit), cloned-score gate,
    per-call Python loops over the boxes for routing and boost, unmerged LoRA."""

    def __init__(self, query_dim: int, hidden: int, cross_dim: int, rank: int, base_to_k: nn.Linear,
                 base_to_v: nn.Linear):
        super().__init__(query_dim, hidden, cross_dim, rank)
        self.to_k_id = nn.Linear(cross_dim, hidden, bias=False)
        self.to_v_id = nn.Linear(cross_dim, hidden, bias=False)
        with torch.no_grad():
            self.to_k_id.weight.copy_(base_to_k.weight)
            self.to_v_id.weight.copy_(base_to_v.weight)

    @staticmethod
    def _region(box: list[float], q_h: int, q_w: int, device) -> Tensor:
        """[q_h * q_w] bool: cells whose centre lies in the box, rebuilt on every call (as the release)."""
        y0, x0, y1, x1 = box
        r0, r1 = math.ceil(y0 * q_h - 0.5), math.ceil(y1 * q_h - 0.5)
        c0, c1 = math.ceil(x0 * q_w - 0.5), math.ceil(x1 * q_w - 0.5)
        region = torch.zeros(q_h, q_w, dtype=torch.bool, device=device)
        region[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
        return region.flatten()

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 id_context: ReleaseContext | None = None) -> Tensor:
        ctx = ReleaseContext.of(id_context)
        x, residual, shape4 = self._enter(attn, hidden_states, temb)
        n_id = ctx.num_ids * ctx.num_tokens if ctx is not None else 0
        text_len = encoder_hidden_states.shape[1] - n_id
        text, ids = encoder_hidden_states[:, :text_len], encoder_hidden_states[:, text_len:]
        batch, seq_len, _ = x.shape
        heads = attn.heads
        query = attn.to_q(x) + self.to_q_lora(x)
        key = attn.to_k(text) + self.to_k_lora(text)
        value = attn.to_v(text) + self.to_v_lora(text)
        d = query.shape[-1] // heads

        def head4(t: Tensor) -> Tensor:
            return t.view(batch, -1, heads, d).transpose(1, 2)

        _ = F.scaled_dot_product_attention(head4(query), head4(key), head4(value))  # computed, then discarded
        out = self._full_attention(attn, query, key, value)  # the same attention again, explicitly
        if n_id == 0 or ctx.id_scale == 0:
            return self._leave(attn, out, residual, shape4)

        qb = attn.head_to_batch_dim(query)  # [B*heads, L, d]
        kid = attn.head_to_batch_dim(self.to_k_id(ids))  # [B*heads, n_id, d]
        vid = attn.head_to_batch_dim(self.to_v_id(ids))
        scores = torch.baddbmm(
            torch.empty(qb.shape[0], seq_len, n_id, dtype=qb.dtype, device=qb.device), qb, kid.transpose(-1, -2),
            beta=0, alpha=attn.scale,
        )  # [B*heads, L, n_id]
        if ctx.gating:
            s = scores.clone()
            act = s.view(batch, heads, seq_len, n_id).sum(dim=1).sum(dim=-1).float()  # [B, L]
            lo = act.min(dim=1, keepdim=True).values
            hi = act.max(dim=1, keepdim=True).values
            act = (act - lo) / (hi - lo + 1e-12)
            act = act.masked_fill(act < ctx.tau, 0.0)
        else:
            act = torch.ones(batch, seq_len, device=x.device)
        q_h, q_w = ctx.grid(seq_len)
        boxes = ctx.boxes()
        if ctx.num_ids > 1:
            sv = scores.view(batch, heads, seq_len, n_id)
            for i, box in enumerate(boxes):  # every call, every layer
                region = self._region(box, q_h, q_w, x.device)
                other = torch.ones(n_id, dtype=torch.bool, device=x.device)
                other[i * ctx.num_tokens:(i + 1) * ctx.num_tokens] = False
                sv = sv.masked_fill(region[:, None] & other[None, :], float("-inf"))
            scores = sv.reshape(batch * heads, seq_len, n_id)
        if ctx.boost_active:
            inside = torch.zeros(seq_len, dtype=torch.bool, device=x.device)
            for box in boxes:
                inside = inside | self._region(box, q_h, q_w, x.device)
            act = torch.where(inside, act + ctx.boost, act / (ctx.boost + 1.0))
        probs = scores.softmax(dim=-1)
        id_out = attn.batch_to_head_dim(torch.bmm(probs, vid))  # [B, L, inner]
        out = out + ctx.id_scale * act.unsqueeze(-1).to(out.dtype) * id_out
        return self._leave(attn, out, residual, shape4)


def install_release(unet: nn.Module, lora_rank: int = 128) -> nn.ModuleDict:
    """Put the release's processors into every attention of a UNet; returns them (trainable parts)."""
    from diffusers.models.attention_processor import Attention

    procs: dict[str, nn.Module] = {}
    for name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        hidden, query_dim = attn.to_q.out_features, attn.to_q.in_features
        if attn.is_cross_attention:
            proc: nn.Module = ReleaseSAAProcessor(query_dim, hidden, attn.to_k.in_features, lora_rank,
                                                  attn.to_k, attn.to_v)
        else:
            proc = ReleaseLoRAAttnProcessor(query_dim, hidden, query_dim, lora_rank)
        proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        attn.set_processor(proc)
        procs[name.replace(".", "__")] = proc
    return nn.ModuleDict(procs)

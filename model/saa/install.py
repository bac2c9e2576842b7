"""UNet-level SAA API: install_saa, saa_state_dict, load_saa_state_dict and merge_lora.

``install_saa`` puts an ``SAAAttnProcessor`` on every cross-attention and a
``LoRAAttnProcessor`` on every self-attention; the state-dict helpers read and write only the
trainable parts; ``merge_lora`` folds the adapters into the base weights for inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # diffusers is imported lazily: model/ imports must stay cheap for light users
    from diffusers.models.attention_processor import Attention

from model.saa.lora import LoRAAttnProcessor, _LoRAHost
from model.saa.processor import SAAAttnProcessor


def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def _installed(unet: nn.Module) -> Iterator[tuple[str, Attention, _LoRAHost]]:
    for name, attn in _attention_modules(unet):
        if isinstance(attn.processor, _LoRAHost):
            yield name, attn, attn.processor


def install_saa(unet: nn.Module, lora_rank: int, lora_alpha: float | None = None) -> nn.ModuleDict:
    """Replace every attention processor of a UNet2DConditionModel with SAA / LoRA processors.

    The new modules are created on the device and dtype of each layer's base weights. The
    returned ModuleDict holds exactly the new (trainable) parts; its keys are the processor
    paths with "." written as "__" (ModuleDict keys may not contain dots), so its state_dict
    loads with ``load_saa_state_dict`` too. Freezing the base UNet is the caller's job
    (``unet.requires_grad_(False)`` *before* this call, or the new parts get frozen too).
    """
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
    procs: dict[str, nn.Module] = {}
    found = False
    for name, attn in _attention_modules(unet):
        found = True
        if isinstance(attn.processor, _LoRAHost):
            raise ValueError(f"SAA is already installed in this UNet ({name})")
        if attn.added_kv_proj_dim is not None or attn.to_k is None or getattr(attn, "fused_projections", False):
            raise ValueError(
                f"attention {name} has a layout SAA does not support (added/fused/missing k-v projections)"
            )
        weight = attn.to_q.weight
        hidden = attn.to_q.out_features
        if attn.to_k.out_features != hidden:
            raise ValueError(f"attention {name}: key width {attn.to_k.out_features} != query width {hidden}")
        if attn.is_cross_attention:
            proc: _LoRAHost = SAAAttnProcessor(
                hidden, attn.to_k.in_features, lora_rank, lora_alpha, base_to_k=attn.to_k, base_to_v=attn.to_v,
                query_dim=attn.to_q.in_features,
            )
        else:
            proc = LoRAAttnProcessor(hidden, lora_rank, lora_alpha, query_dim=attn.to_q.in_features)
        proc.to(device=weight.device, dtype=weight.dtype)
        attn.set_processor(proc)
        procs[f"{name}.processor".replace(".", "__")] = proc
    if not found:
        raise ValueError("no diffusers Attention modules found: is this a UNet2DConditionModel?")
    return nn.ModuleDict(procs)


def saa_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """Trainable SAA + LoRA tensors only, keyed as in ``unet.state_dict()`` (for safetensors export)."""
    installed = list(_installed(unet))
    if not installed:
        raise ValueError("SAA is not installed in this UNet (call install_saa first)")
    return {
        f"{name}.processor.{key}": tensor for name, _, proc in installed for key, tensor in proc.state_dict().items()
    }


def load_saa_state_dict(unet: nn.Module, state: dict[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Load tensors from ``saa_state_dict`` (or the install_saa ModuleDict's state_dict).

    Every problem is a ValueError naming the key: a shape mismatch always, a missing or
    unexpected key when ``strict``. Nothing is written unless every check passes, so a bad
    file never leaves the model half-loaded. Returns (missing, unexpected) key lists.
    """
    installed = list(_installed(unet))
    if not installed:
        raise ValueError("SAA is not installed in this UNet (call install_saa first)")
    targets = {
        f"{name}.processor.{key}": tensor
        for name, _, proc in installed
        for key, tensor in proc.state_dict(keep_vars=True).items()
    }
    given = {key.replace("__", "."): value for key, value in state.items()}
    missing = sorted(set(targets) - set(given))
    unexpected = sorted(set(given) - set(targets))
    if strict and missing:
        raise ValueError(f"SAA state dict is missing {len(missing)} key(s), first: {missing[0]}")
    if strict and unexpected:
        raise ValueError(f"SAA state dict has {len(unexpected)} unexpected key(s), first: {unexpected[0]}")
    for key in sorted(set(targets) & set(given)):
        want, got = tuple(targets[key].shape), tuple(given[key].shape)
        if want != got:
            raise ValueError(f"SAA state dict key {key}: shape {got} does not match the model's {want}")
    with torch.no_grad():
        for key in set(targets) & set(given):
            targets[key].copy_(given[key])
    return missing, unexpected


def merge_lora(unet: nn.Module) -> None:
    """Fold every LoRA delta into the base to_q/to_k/to_v/to_out[0] weights (idempotent).

    The adapters are removed afterwards, so inference pays nothing for them and
    ``saa_state_dict`` then holds only the ID projections.
    """
    for _, attn, proc in _installed(unet):
        proc.merge_into(attn)

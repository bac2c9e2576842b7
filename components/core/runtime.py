"""Glue between params and the model package: resolve storage URIs, then load."""

from __future__ import annotations

from pathlib import Path

from components.core.config import Params


def resolve_model_paths(params: Params) -> Params:
    """Return params whose sd15 base / image encoder are local paths (s3:// downloaded once)."""
    if params.model.profile != "sd15":
        return params
    from components.core.storage import resolve_local

    p = params.model_copy(deep=True)
    cache = p.model.sd15.cache_dir
    p.model.sd15.base = str(resolve_local(p.model.sd15.base, cache, p.storage))
    p.model.sd15.image_encoder = str(resolve_local(p.model.sd15.image_encoder, cache, p.storage))
    if p.model.sd15.tokenizer:
        p.model.sd15.tokenizer = str(resolve_local(p.model.sd15.tokenizer, cache, p.storage))
    return p


def pipeline_from_params(params: Params, checkpoint: str | Path | None, **kwargs):
    from model.loading import load_pipeline

    p = resolve_model_paths(params)
    return load_pipeline(p.model, p.face, checkpoint, cache_dir=p.storage.cache_dir, **kwargs)

"""params.yaml: the one source of configuration, loaded into typed, validated objects.

Sections follow the stages (DVC example-get-started style): each stage reads only its
own section plus ``model``/``face`` where it builds models. Environment variables are
honoured only where a library defines them (AWS_*, MLFLOW_TRACKING_URI, KF_PIPELINES_*),
so that switching to the production profile is a params/env change, never a code change.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import Field, ValidationError

from components.core.config.profiles import merge
from model.config import FaceParams, ModelParams, StrictModel
from components.core.config.sections import (
    DataParams,
    DeployParams,
    EvaluateParams,
    MlflowParams,
    PipelineParams,
    PrepareParams,
    GateParams,
    ServeParams,
    StorageParams,
    SynthParams,
    TrainParams,
)

DEFAULT_PARAMS = "params.yaml"
PARAMS_ENV = "DYNAMICID_PARAMS"


class ParamsError(ValueError):
    """A params file that does not validate; the message names every bad key path."""


class Params(StrictModel):
    model: ModelParams = ModelParams()
    face: FaceParams = FaceParams()
    storage: StorageParams = StorageParams()
    mlflow: MlflowParams = MlflowParams()
    data: DataParams = DataParams()
    synth: SynthParams = SynthParams()
    prepare: PrepareParams = PrepareParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    serve: ServeParams = ServeParams()
    pipeline: PipelineParams = PipelineParams()
    deploy: DeployParams = DeployParams()
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-profile settings (tiny, sd15): applied under the top-level values "
        "when model.profile selects the profile (components/core/config/profiles.py)")


def _model_at(path: tuple[Any, ...]) -> type[StrictModel] | None:
    """Walk the schema along a key path to find which model owns the last key."""
    cls: Any = Params
    for key in path:
        if not (isinstance(cls, type) and issubclass(cls, StrictModel)):
            return None
        field = cls.model_fields.get(str(key))
        if field is None:
            return None
        cls = field.annotation
    return cls if isinstance(cls, type) and issubclass(cls, StrictModel) else None


def _format_errors(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = prefix + (".".join(str(p) for p in loc) or "<root>")
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            allowed = sorted(owner.model_fields) if owner else []
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ParamsError(f"override {dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


class ParamsLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML follows YAML 1.1, where on/off/yes/no are booleans too, so
    ``compile_unet: off`` or ``-S train.compile_unet=off`` would reach validation as False instead of the
    option "off"; DVC (ruamel, YAML 1.2) reads the same file the 1.2 way."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def yaml_value(text: str) -> Any:
    """One YAML document read with YAML 1.2 booleans (see ParamsLoader)."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``key.path=value`` strings (value parsed as YAML) -> nested dict, like ``dvc exp run -S``."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml_value(raw))
    return tree


def params_from_dict(raw: dict | None, source: str = "params") -> Params:
    """Validate a params tree, with the chosen profile's settings (profiles.py) under its top-level values."""
    from components.core.config.profiles import chosen_profile, profile_layer

    raw = dict(raw or {})
    try:
        layer = profile_layer(raw, chosen_profile(raw, {}))
    except ValueError as err:
        raise ParamsError(f"{source}: invalid configuration\n  {err}") from None
    for name, section in (raw.get("profiles") or {}).items():
        try:  # each profile section on its own, so that an error names its path under profiles.<name>
            Params.model_validate(section or {})
        except ValidationError as err:
            raise ParamsError(_format_errors(err, source, prefix=f"profiles.{name}.")) from None
    try:
        return Params.model_validate(merge(layer, raw))
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Params:
    """Load and validate params.yaml (path, else $DYNAMICID_PARAMS, else ./params.yaml).

    A missing default file means "all defaults" (the embedded profile); a missing
    explicitly named file is an error.
    """
    explicit = path is not None or PARAMS_ENV in os.environ
    p = Path(path or os.environ.get(PARAMS_ENV, DEFAULT_PARAMS))
    raw: dict = {}
    if p.exists():
        loaded = yaml_value(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ParamsError(f"{p}: top level must be a mapping of sections")
        raw = loaded or {}
    elif explicit:
        raise ParamsError(f"params file not found: {p}")
    raw = merge(raw, parse_overrides(overrides))
    return params_from_dict(raw, str(p))


def params_hash(params: Params) -> str:
    """Stable hash of the resolved configuration (for lineage tags)."""
    import hashlib

    blob = json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(params: Params) -> dict[str, Any]:
    """Dotted-key view (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", params.model_dump(mode="json"))
    return out


__all__ = ["Params", "ParamsError", "load_params", "params_from_dict", "parse_overrides", "params_hash", "flatten"]

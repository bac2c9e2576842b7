"""Params as ``-S`` overrides: how the resolved configuration travels to other processes.

A pipeline step, a PyTorchJob pod or a predictor pod runs the project image, whose embedded
defaults are not the configuration the user resolved here. Rather than a second transport (a
ConfigMap per object, a params artefact, an RBAC rule to create them), the resolved params travel
as the CLI's own ``-S section=<YAML>`` overrides, one per top-level section: the receiving
``dynamicid`` rebuilds exactly the same validated object through ``load_params``.
"""

from __future__ import annotations

import yaml

from components.config import Params


def params_settings(params: Params) -> list[str]:
    """``section=<flow YAML>`` for every section; ``parse_overrides`` reads them back unchanged.

    YAML rather than JSON because the CLI parses override values with PyYAML (YAML 1.1), which
    reads JSON's ``1e-05`` as a string.
    """
    out = []
    for section, value in params.model_dump(mode="json").items():
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()
        out.append(f"{section}={text}")
    return out


def settings_args(settings: list[str]) -> list[str]:
    """Global CLI flags for a list of ``key=value`` settings."""
    return [f"--set={s}" for s in settings]

"""Params as ``-S`` overrides: how the resolved configuration travels to other processes.

A pipeline step, a PyTorchJob pod or a predictor pod runs the project image, whose embedded
defaults are not the configuration the user resolved here. Rather than a second transport (a
ConfigMap per object, a params artefact, an RBAC rule to create them), the resolved params travel
as the CLI's own ``-S section=<YAML>`` overrides, one per top-level section: the receiving
``dynamicid`` rebuilds exactly the same validated object through ``load_params``.
"""

from __future__ import annotations

import yaml

from components.core.config import Params


def check_no_credentials(params: Params) -> None:
    """Refuse params that carry a credential: a password in a URI, or a value under a secret-named
    key (``pipeline.env.MLFLOW_TRACKING_TOKEN``). Settings end up in pod command lines, the compiled
    pipeline and ``pipeline.env`` in plain pod env, all readable by anyone who can read the objects;
    credentials reach pods only by Secret reference (``pipeline.s3_secret`` with the keys listed in
    ``pipeline.s3_keys`` / ``pipeline.s3_optional_keys``)."""
    from components.core.errors import UserError
    from components.core.config import flatten
    from components.core.redact import NOT_SECRET_PARAMS, is_secret_name, uri_has_credentials

    for key, value in flatten(params).items():
        leaf = key.rsplit(".", 1)[-1]
        if key not in NOT_SECRET_PARAMS and is_secret_name(leaf) and value not in (None, ""):
            raise UserError(
                f"{key}: a credential in params would be written in plain text into the pods' specs; put it "
                f"in the Secret {params.pipeline.s3_secret!r} and list its key in pipeline.s3_optional_keys"
            )
        if isinstance(value, str) and uri_has_credentials(value):
            raise UserError(
                f"{key}: the URI carries a password (user:password@host), which would be written in plain text "
                "into the pods' specs; give the credentials by environment from a Secret instead "
                "(e.g. MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )


def params_settings(params: Params) -> list[str]:
    """``section=<flow YAML>`` for every section; ``parse_overrides`` reads them back unchanged.

    YAML rather than JSON because the CLI parses override values with PyYAML's number rules (YAML 1.1), which
    read JSON's ``1e-05`` as a string. Params with credentials are refused (check_no_credentials).
    """
    check_no_credentials(params)
    out = []
    for section, value in params.model_dump(mode="json").items():
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()
        out.append(f"{section}={text}")
    return out


def settings_args(settings: list[str]) -> list[str]:
    """Global CLI flags for a list of ``key=value`` settings."""
    return [f"--set={s}" for s in settings]

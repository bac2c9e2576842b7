"""``dynamicid pipeline compile|run-local|submit|status``: the Kubeflow driver of the stages."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

from components.core.errors import UserError

# Bearer token for the KFP API (e.g. from `kubectl create token` or an OIDC login).
TOKEN_ENV = "KF_PIPELINES_TOKEN"
FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="the same stages as a Kubeflow pipeline: compile, run locally, submit, follow",
        description="Kubeflow Pipelines (kfp v2) driver: prepare -> train anchor -> train reconfigure -> "
        "evaluate -> gate -> register -> deploy, each step a `dynamicid` subcommand in the project image. "
        "Cluster sizing and scheduling come from the `pipeline` params section (-S pipeline.nodes=2 ...).",
    )
    actions = p.add_subparsers(dest="pipeline_action", metavar="ACTION", required=True)

    c = actions.add_parser("compile", help="write the pipeline IR YAML",
                           description="Compile the pipeline for the current params to kfp's IR YAML "
                           "(upload it in the KFP UI, or use `submit`).")
    c.add_argument("--output", default=None, help="default pipeline.package")
    c.set_defaults(func=run_compile)

    lo = actions.add_parser("run-local", help="run the whole pipeline on this machine (kfp.local)",
                            description="Run the pipeline with kfp's local SubprocessRunner in this environment: "
                            "same components, artefacts under pipeline.local_root, training in-process "
                            "(one node), deploy as --dry-run unless --deploy.")
    lo.add_argument("--root", default=None, help="pipeline root for artefacts; default pipeline.local_root")
    lo.add_argument("--deploy", action="store_true", help="really deploy (needs a cluster and a remote store)")
    lo.set_defaults(func=run_local)

    s = actions.add_parser("submit", help="compile and start a run on a KFP server",
                           description="Compile for the current params and create a run. Auth: $"
                           f"{TOKEN_ENV}, else the KFP service-account token in a pod, else the kube config's "
                           "credentials.")
    s.add_argument("--host", default=None, help="KFP API URL; default pipeline.host or $KF_PIPELINES_ENDPOINT")
    s.add_argument("--namespace", default=None, help="KFP profile namespace; default pipeline.kfp_namespace")
    s.add_argument("--experiment", default=None, help="default pipeline.experiment")
    s.add_argument("--run-name", default=None)
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter (image, deploy_args; value parsed as YAML), repeatable")
    s.add_argument("--wait", action="store_true", help="follow the run until it finishes")
    s.add_argument("--timeout", type=int, default=7 * 24 * 3600)
    s.set_defaults(func=run_submit)

    st = actions.add_parser("status", help="state of a run and of its tasks")
    st.add_argument("run_id")
    st.add_argument("--host", default=None)
    st.add_argument("--namespace", default=None)
    st.add_argument("--wait", action="store_true", help="wait until the run finishes")
    st.add_argument("--timeout", type=int, default=7 * 24 * 3600)
    st.set_defaults(func=run_status)


def run_compile(args: argparse.Namespace, params) -> int:
    from pipelines.pipeline import compile_pipeline

    out = compile_pipeline(params, args.output or params.pipeline.package)
    print(f"pipeline: wrote {out}")
    return 0


def run_local(args: argparse.Namespace, params) -> int:
    from kfp import local

    from pipelines.pipeline import build_pipeline

    root = Path(args.root or params.pipeline.local_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    pipeline = build_pipeline(params, cluster=False)
    with warnings.catch_warnings():
        # The project image is not a "python" image by name; locally it is this environment anyway.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # Task names are for the cluster's UI; the local runner says it ignores them, once per named task.
        warnings.filterwarnings("ignore", message=r".*settings \['display_name'\] have no effect in the current "
                                "local runner.*", category=UserWarning)
        try:
            result = pipeline(deploy_args=["--wait"] if args.deploy else ["--dry-run"])
        except RuntimeError as err:
            from components.core.redact import known_secrets, redact_text

            print(f"pipeline run-local: {redact_text(str(err), known_secrets())}", file=sys.stderr)
            return 1
    passed = bool(result.output)
    print(f"pipeline run-local: finished; gate {'passed: registered and deployed' if passed else 'failed: nothing registered'}"
          f"{'' if args.deploy or not passed else ' (deploy was a dry run)'}; artefacts under {root}")
    return 0


def kube_config_token(context: str | None = None) -> str | None:
    """The bearer token the kube config would send (static token or exec plugin), if any."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg, context=context)
    except (config.ConfigException, FileNotFoundError, TypeError, OSError):
        return None
    auth = (cfg.api_key or {}).get("authorization") or ""
    return auth.removeprefix("Bearer ").strip() or None


def kfp_client(params, host: str | None, namespace: str | None):
    """kfp.Client with a token from $KF_PIPELINES_TOKEN, the pod's KFP token, or the kube config."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    from components.core.redact import redact_text, uri_has_credentials

    host = host or params.pipeline.host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if host and uri_has_credentials(host):
        # The KFP client sends no URL credentials; a password there would only end up in messages.
        raise UserError(f"KFP host {redact_text(host)}: credentials in the URL are not used; "
                        f"give a bearer token in ${TOKEN_ENV} instead")
    kwargs: dict = {}
    namespace = namespace or params.pipeline.kfp_namespace
    if namespace:
        kwargs["namespace"] = namespace
    token = os.environ.get(TOKEN_ENV)
    sa_token = Path(os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", "/var/run/secrets/kubeflow/pipelines/token"))
    if token:
        kwargs["existing_token"] = token
    elif sa_token.exists():
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(str(sa_token))
    elif host:
        kwargs["existing_token"] = kube_config_token()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return kfp.Client(host=host, **kwargs)
        except _api_errors() as err:  # the client checks the server's health on construction
            raise UserError(f"cannot reach the KFP API at {redact_text(str(host))}: {err}") from None


def parse_arguments(items: list[str], allowed: set[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        if key not in allowed:
            raise UserError(f"--param {key}: not a pipeline parameter; allowed: {', '.join(sorted(allowed))}")
        out[key] = yaml.safe_load(raw)
    return out


def pipeline_parameters(package: Path) -> set[str]:
    spec = next(yaml.safe_load_all(package.read_text()))  # the IR; a platform spec may follow
    return set(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def _api_errors():
    import urllib3
    from kfp_server_api.exceptions import ApiException

    return ApiException, urllib3.exceptions.HTTPError


def run_submit(args: argparse.Namespace, params) -> int:
    from pipelines.pipeline import compile_pipeline

    p = params.pipeline
    with tempfile.TemporaryDirectory(prefix="dynamicid-pipeline-") as tmp:
        package = compile_pipeline(params, Path(tmp) / "pipeline.yaml")
        arguments = parse_arguments(args.param, pipeline_parameters(package))
        client = kfp_client(params, args.host, args.namespace)
        try:
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=args.run_name,
                experiment_name=args.experiment or p.experiment, namespace=args.namespace or p.kfp_namespace,
                pipeline_root=p.pipeline_root, service_account=p.service_account,
            )
        except _api_errors() as err:
            raise UserError(f"submitting to {client._existing_config.host}: {err}") from None
    print(f"pipeline: submitted run {result.run_id}")
    print(f"pipeline: follow it with: dynamicid pipeline status {result.run_id} --wait")
    if args.wait:
        return _show(client, result.run_id, wait=True, timeout=args.timeout, poll_s=p.poll_s)
    return 0


def _show(client, run_id: str, wait: bool, timeout: int, poll_s: float) -> int:
    try:
        run = client.wait_for_run_completion(run_id, timeout, sleep_duration=poll_s) if wait else client.get_run(run_id)
    except _api_errors() as err:
        raise UserError(f"run {run_id}: {err}") from None
    except TimeoutError:
        raise UserError(f"run {run_id} did not finish within {timeout} s") from None
    print(f"run {run.run_id} ({run.display_name}): {run.state}")
    if run.error is not None and getattr(run.error, "message", None):
        print(f"  error: {run.error.message}")
    details = getattr(run, "run_details", None)
    for task in (getattr(details, "task_details", None) or []):
        print(f"  {task.display_name}: {task.state}")
    return 0 if run.state == "SUCCEEDED" or (not wait and run.state not in FINAL_STATES) else 1


def run_status(args: argparse.Namespace, params) -> int:
    client = kfp_client(params, args.host, args.namespace)
    return _show(client, args.run_id, args.wait, args.timeout, params.pipeline.poll_s)

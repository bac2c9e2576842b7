"""Credentials never leave a process in clear: not in logs, not in MLflow params/tags/metrics, not in
error messages (issue 9, secrets).

Every test plants unique canary credentials where real ones live: the environment (AWS keys,
MLflow and Kubeflow tokens) and the places params can hold them (URIs with ``user:password@``,
``pipeline.env``). Then it runs real code paths, several of them failing against an endpoint that
refuses connections, and scans everything they left behind (stdout, stderr, files, the MLflow
run read back through the tracking server) for each canary and for its base64 encodings.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import pytest
import yaml

from components.core import redact
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[1]

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "KF_PIPELINES_TOKEN")


@pytest.fixture(autouse=True)
def _restore_mlflow_globals():
    """setup_mlflow sets mlflow's process-wide tracking/registry URIs and exports them to the
    environment; a credentialed URI from these tests must not leak into later tests."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    names = ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {name: os.environ.get(name) for name in names}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def canaries(*names: str) -> dict[str, str]:
    """A fresh, unmistakable value per secret (long enough to count as a credential)."""
    return {n: f"cnry{uuid.uuid4().hex[:16]}" for n in names}


def encodings(secret: str) -> set[str]:
    """The secret and every base64 form it can take inside a longer encoded string (e.g. a Basic
    auth header of ``user:secret``): for each of the 3 byte alignments, the characters that depend
    on the secret's bytes only."""
    out = {secret}
    raw = secret.encode()
    for offset in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * offset + raw).decode()
            start, end = -(-offset * 4 // 3), (offset + len(raw)) * 4 // 3
            out.add(text[start:end])
    return out


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if any(v in text for v in encodings(value))]


def files_text(root: Path, skip: Iterable[Path] = ()) -> dict[str, str]:
    skip = {p.resolve() for p in skip}
    return {str(p.relative_to(root)): p.read_bytes().decode("utf-8", "replace")
            for p in root.rglob("*") if p.is_file() and p.resolve() not in skip}


# --- the rules themselves ------------------------------------------------------------------------


def test_encodings_find_a_secret_inside_a_basic_auth_header() -> None:
    secret = "cnry0123456789abcdef"
    for user in ("u", "us", "use"):  # every alignment of the secret in the encoded string
        header = base64.b64encode(f"{user}:{secret}".encode()).decode()
        assert leaks(f"Authorization: Basic {header}", {"s": secret}) == ["s"]
    assert leaks(base64.b64encode(b"someone:else").decode(), {"s": secret}) == []


def test_redaction_rules() -> None:
    text = ("GET http://alice:pw0rd-x@minio:9000/b?x=1 headers={'Authorization': b'AWS4-HMAC-SHA256 "
            "Credential=AKIDCANARY/2026', 'X-Amz-Date': b'2026'} token=tok-12345678")
    out = redact.redact_text(text, {"tok-12345678"})
    assert "pw0rd-x" not in out and "alice" not in out and "AKIDCANARY" not in out and "tok-12345678" not in out
    assert "http://***@minio:9000/b?x=1" in out and "'X-Amz-Date': b'2026'" in out  # the rest stays useful
    assert redact.redact_text("s3://bucket/key and /tmp/a:b@c") == "s3://bucket/key and /tmp/a:b@c"

    flat = {"storage.endpoint_url": "https://k:s@h:9000", "pipeline.env.MLFLOW_TRACKING_TOKEN": "t",
            "pipeline.env.MLFLOW_TRACKING_URI": "http://mlflow:5000", "model.tiny.num_id_tokens": 4,
            "pipeline.s3_secret": "dynamicid-s3", "pipeline.s3_keys": ["AWS_ACCESS_KEY_ID"],
            "deploy.api_key": None, "serve.prompt": "a photo with tok-12345678 in it"}
    got = redact.redact_params(flat, {"tok-12345678"})
    assert got == {**flat, "storage.endpoint_url": "https://***@h:9000",
                   "pipeline.env.MLFLOW_TRACKING_TOKEN": "***", "serve.prompt": "a photo with *** in it"}

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "KF_PIPELINES_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                 "db.password", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert redact.is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "num_id_tokens", "s3_keys", "MLFLOW_TRACKING_URI", "keypoints"):
        assert not redact.is_secret_name(name), name


def test_log_records_of_any_logger_are_redacted(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Also loggers with their own handler that do not propagate (MLflow configures its logger so)."""
    secrets = canaries("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets["AWS_SECRET_ACCESS_KEY"])
    import warnings

    previous = logging.getLogRecordFactory()
    capturing = getattr(warnings.showwarning, "__module__", "") == "logging"
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # install() may set it: restored afterwards
    own = logging.getLogger(f"isolated-{uuid.uuid4().hex}")
    handler = logging.StreamHandler(sys.stderr)
    own.addHandler(handler)
    own.propagate = False
    try:
        redact.install()
        redact.install()  # idempotent: one layer, re-reading the environment
        assert logging.getLogRecordFactory().base is getattr(previous, "base", previous)
        try:
            raise RuntimeError(f"failed with key {secrets['AWS_SECRET_ACCESS_KEY']}")
        except RuntimeError:
            own.exception("request to %s failed", "https://user:pw-canary-123@host/x")
    finally:
        logging.setLogRecordFactory(previous)
        if not capturing:
            logging.captureWarnings(False)
        own.removeHandler(handler)
    err = capsys.readouterr().err
    assert "request to https://***@host/x failed" in err and "RuntimeError: failed with key ***" in err
    assert not leaks(err, {**secrets, "url": "pw-canary-123"})


# --- a training run's MLflow record ----------------------------------------------------------------


def test_training_run_records_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """StageTracker (what `dynamicid train` records), with credentials in params (URIs, pipeline.env)
    and in the environment; the run is read back from the store with MlflowClient."""
    from mlflow import MlflowClient

    from components.core.config import params_from_dict
    from components.train.track import StageTracker

    env = canaries(*SECRET_ENV)
    secrets = {**env, **canaries("s3_password", "registry_password", "kfp_password", "pipeline_token")}
    for name in SECRET_ENV:
        monkeypatch.setenv(name, env[name])
    # mlflow.set_tracking_uri/set_registry_uri export these for subprocesses: restore them afterwards
    for name in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # the local store's artefacts land here too, and are scanned
    closed = free_port()
    store = f"sqlite:///{tmp_path / 'store.db'}"
    params = params_from_dict({
        "storage": {"endpoint_url": f"http://minio:{secrets['s3_password']}@127.0.0.1:{closed}"},
        "mlflow": {"tracking_uri": store, "registry_uri": f"http://reg:{secrets['registry_password']}@127.0.0.1:{closed}",
                   "experiment": "leaks"},
        "pipeline": {"host": f"https://kf:{secrets['kfp_password']}@kfp.example",
                     "env": {"MLFLOW_TRACKING_URI": "http://dynamicid-mlflow:5000",
                             "EXTRA_TOKEN": secrets["pipeline_token"]}},
        "data": {"prepared": str(tmp_path / "prepared")},
    })
    tracker = StageTracker(params, "anchor", tmp_path / "out", enabled=True)
    tracker.start(resume=False, extra_params={"world_size": 1,
                                              "trained_from": f"s3://bucket/base?token={env['AWS_SESSION_TOKEN']}"})
    tracker.loss_table("loss.tsv", ["loss"], 0)
    tracker.log_step(1, {"loss": 0.5}, "loss.tsv")
    tracker.write_metrics({"loss": 0.5})
    tracker.finish()

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(tracker.run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    out, err = capfd.readouterr()
    recorded = {"params": yaml.safe_dump(run.data.params), "tags": yaml.safe_dump(run.data.tags),
                "metrics": yaml.safe_dump(run.data.metrics), "stdout": out, "stderr": err,
                **files_text(tmp_path)}  # the run's outputs, the store itself and the artefacts
    found = {where: leaks(text, secrets) for where, text in recorded.items() if leaks(text, secrets)}
    assert not found, f"credentials leaked: {found}"
    # ... while the run still says where things are, and keeps every ordinary value
    p = run.data.params
    assert p["storage.endpoint_url"] == f"http://***@127.0.0.1:{closed}"
    assert p["mlflow.registry_uri"] == f"http://***@127.0.0.1:{closed}" and p["mlflow.tracking_uri"] == store
    assert p["pipeline.env.EXTRA_TOKEN"] == "***" and p["pipeline.host"] == "https://***@kfp.example"
    assert p["trained_from"] == "s3://bucket/base?token=***" and p["world_size"] == "1"
    assert p["model.tiny.num_id_tokens"] == str(params.model.tiny.num_id_tokens)
    assert p["pipeline.s3_secret"] == "dynamicid-s3" and len(p) > 200
    assert [m.value for m in history] == [0.5] and run.data.metrics["final/loss"] == 0.5


def test_a_tracking_uri_with_credentials_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow prints "View run ... at: <tracking URI>/#/..." after every run on a tracking server;
    setup_mlflow turns that off when the URI carries a password (and only then)."""
    from components.core.config import params_from_dict
    from components.core.tracking import public_uri, setup_mlflow

    for name in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()  # nothing listens: setting the experiment fails, after the URI is configured
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for uri, suppressed in ((f"http://127.0.0.1:{port}", None), (f"http://u:cnry-pw-123@127.0.0.1:{port}", "true")):
        with pytest.raises(Exception):
            setup_mlflow(params_from_dict({"mlflow": {"tracking_uri": uri}}))
        assert os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT") == suppressed, uri
    assert public_uri(f"http://u:cnry-pw-123@127.0.0.1:{port}") == f"http://***@127.0.0.1:{port}"


# --- failing CLI commands ----------------------------------------------------------------------------


def _cases(work: Path, closed: int, secrets: dict[str, str]) -> dict[str, tuple[list[str], int | None, tuple]]:
    """name -> (argv, expected exit status (None: any failure), texts the error must show)."""
    s3 = f"http://minio:{secrets['s3_password']}@127.0.0.1:{closed}"
    return {
        # sd15 weights from S3: StorageError raised through the CLI (a traceback), botocore debug logs
        "storage": (["-v", "-S", "model.profile=sd15", "-S", "model.sd15.base=s3://bucket/sd15",
                     "-S", f"model.sd15.cache_dir={work / 'cache'}", "-S", f"storage.endpoint_url={s3}",
                     "-S", "storage.max_attempts=1", "init", "--out", str(work / "init")],
                    None, ("s3://bucket/sd15", f"http://***@127.0.0.1:{closed}/bucket")),
        # the registry behind a URI with credentials, unreachable
        "registry": (["-v", "-S", f"mlflow.tracking_uri=http://ml:{secrets['tracking_password']}@127.0.0.1:{closed}",
                      "deploy", "--dry-run"],
                     2, (f"API request to http://***@127.0.0.1:{closed}/api/2.0/mlflow/registered-models/alias",)),
        # KFP with a bearer token from the environment, unreachable
        "kfp-token": (["-v", "pipeline", "submit", "--host", f"http://127.0.0.1:{closed}"],
                      2, (f"cannot reach the KFP API at http://127.0.0.1:{closed}",)),
        "kfp-url-credentials": (["-v", "pipeline", "status", "run-1", "--host",
                                 f"http://kf:{secrets['kfp_password']}@127.0.0.1:{closed}"],
                                2, (f"KFP host http://***@127.0.0.1:{closed}: credentials in the URL are not used",)),
        # the Kubernetes API with the kube config's token, unreachable
        "kubernetes": (["-v", "-S", f"pipeline.shared_dir={work / 'shared'}", "launch", "--stage", "anchor",
                        "--nodes", "2"], 2, ("cannot reach the Kubernetes API",)),
        # params that do not validate: the message quotes the bad value
        "params-error": (["-S", f"mlflow.tracking_uri=[http://ml:{secrets['tracking_password']}@127.0.0.1:{closed}]",
                          "params"], 2, (f"mlflow.tracking_uri: Input should be a valid string (got "
                                         f"['http://***@127.0.0.1:{closed}'])",)),
        # a credential in params for a pod: refused before anything is rendered or printed
        "pod-params": (["-v", "-S", f"pipeline.env.MLFLOW_TRACKING_TOKEN={secrets['pipeline_token']}", "launch",
                        "--stage", "anchor", "--nodes", "2", "--dry-run"],
                       2, ("pipeline.env.MLFLOW_TRACKING_TOKEN: a credential in params",)),
    }


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case as its own `dynamicid` process (what a user or a pipeline step sees), run
    concurrently; each in its own working directory, whose files are scanned afterwards."""
    base = tmp_path_factory.mktemp("cli-leaks")
    env_secrets = canaries(*SECRET_ENV)
    secrets = {**env_secrets, **canaries("s3_password", "tracking_password", "kfp_password", "pipeline_token",
                                         "kube_token")}
    closed = free_port()
    kubeconfig = base / "kubeconfig"  # outside the scanned directories: it holds the token on purpose
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{closed}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": secrets["kube_token"]}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "dynamicid"}}],
    }))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DYNAMICID_PARAMS", "KUBERNETES_SERVICE_HOST", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(env_secrets, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="5", AWS_EC2_METADATA_DISABLED="true", MLFLOW_DISABLE_TELEMETRY="true")
    cli = [sys.executable, "-c", "import sys; from components.cli import main; sys.exit(main())"]
    cases = _cases(base, closed, secrets)

    def run(name: str) -> dict:
        work = base / name
        work.mkdir()
        argv, expected, message = cases[name]
        done = subprocess.run(cli + argv, cwd=work, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=120)
        return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "files": files_text(work),
                "expected": expected, "message": message}

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    return {"secrets": secrets, "results": results}


@pytest.mark.parametrize("case", ["storage", "registry", "kfp-token", "kfp-url-credentials", "kubernetes",
                                  "params-error", "pod-params"])
def test_failing_commands_show_the_error_but_no_credentials(cli_runs: dict, case: str) -> None:
    r = cli_runs["results"][case]
    scanned = {"stdout": r["stdout"], "stderr": r["stderr"], **r["files"]}
    found = {where: leaks(text, cli_runs["secrets"]) for where, text in scanned.items()
             if leaks(text, cli_runs["secrets"])}
    assert not found, f"credentials leaked: {found}"
    assert r["rc"] == r["expected"] if r["expected"] is not None else r["rc"] != 0, r["stderr"][-3000:]
    for text in r["message"]:  # the error stays as useful as before
        assert text in r["stderr"], r["stderr"][-3000:]


def test_debug_logs_of_s3_requests_keep_everything_but_the_credentials(cli_runs: dict) -> None:
    """With -v botocore logs each request, headers included: the Authorization header (which
    carries the access key id) is masked, the rest of the request stays in the log."""
    err = cli_runs["results"]["storage"]["stderr"]
    sent = [ln for ln in err.splitlines() if "botocore.endpoint: Sending http request" in ln]
    assert sent, err[-2000:]
    assert all("'Authorization': b'***'" in ln and "X-Amz-Date" in ln for ln in sent)

"""Object-store faults and storage-path escapes (issue 9).

One moto S3 server per module, reached through ``tests.faults_s3.FaultProxy``, which injects
connection resets (before and after the server applied a request), HTTP 500, HTTP 503 SlowDown,
slow responses and truncated bodies on a schedule, or fails persistently. The real code paths run
against it: ``components.core.storage`` (boto3, botocore "standard" retries from params.storage),
``dynamicid prepare`` on an s3:// input, ``dvc push``/``pull`` to an S3 remote (dvc-s3 / s3fs /
aiobotocore), and ``dynamicid register`` against an ``mlflow server`` whose artefact store is the
faulty S3. Transient faults must be survived with byte-identical results; persistent ones must end
in a clear error with nothing half-done left behind (no partial mirror, no model version, no
moved alias). Each scenario prints the faults it survived and the time they cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.cli import main as cli_main
from tests.faults_s3 import FaultProxy, Rule
from tests.services import S3_ENV, moto_s3

BUCKET = "dynamicid"


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _report(what: str, proxy: FaultProxy, seconds: float, baseline: float | None = None) -> None:
    extra = f", +{seconds - baseline:.1f} s vs clean {baseline:.1f} s" if baseline is not None else ""
    print(f"\n[faults] {what}: {proxy.requests} requests, injected {dict(proxy.stats)} "
          f"({proxy.injected} faults) in {seconds:.1f} s{extra}")


pytestmark = pytest.mark.usefixtures("module_cwd")  # MLflow writes ./mlruns; params.yaml is not ours


@pytest.fixture(scope="module")
def s3():
    """(moto server, fault proxy in front of it), AWS test credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE"):
            mp.delenv(k, raising=False)
        with moto_s3(BUCKET) as server, FaultProxy(server.endpoint, seed=9) as proxy:
            yield server, proxy


def _storage(endpoint: str, **kw):
    from components.core.config.infra import StorageParams

    return StorageParams(endpoint_url=endpoint, **kw)


# --------------------------------------------------------------------------- components.core.storage


def test_download_prefix_survives_every_fault_kind(s3, tmp_path):
    """download_prefix (resolve_local's s3:// path) through resets, 500s, 503s, truncated bodies and
    one response slower than the read timeout: the mirror is byte-identical to the objects."""
    from components.core.storage import download_prefix

    server, proxy = s3
    client = server.client()
    want = {f"obj{i:02d}.bin": os.urandom(4096 + i) for i in range(12)}
    for rel, data in want.items():
        client.put_object(Bucket=BUCKET, Key=f"dl/{rel}", Body=data)
    storage = _storage(proxy.endpoint, read_timeout_s=1.0)
    t0 = time.monotonic()
    download_prefix(f"s3://{BUCKET}/dl", tmp_path / "clean", storage)
    clean = time.monotonic() - t0
    proxy.set_rules(Rule("truncate", method="GET", path="obj0[0-5]", first=2),
                    Rule("delay", method="GET", path="obj11", first=1, delay_s=2.0),
                    Rule("reset", method="GET", every=5), Rule("503", method="GET|HEAD", every=6),
                    Rule("500", method="HEAD", first=2))
    t0 = time.monotonic()
    dest = download_prefix(f"s3://{BUCKET}/dl", tmp_path / "mirror", storage)
    took = time.monotonic() - t0
    _report("download_prefix 12 objects", proxy, took, clean)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == want
    assert proxy.stats["reset"] >= 2 and proxy.stats["503"] >= 2 and proxy.stats["500"] == 2
    assert proxy.stats["truncate"] == 2 and proxy.stats["delay"] == 1
    proxy.heal()


def test_download_prefix_persistent_failure_leaves_nothing(s3, tmp_path):
    from components.core.storage import StorageError, resolve_local

    server, proxy = s3
    server.client().put_object(Bucket=BUCKET, Key="down/a.bin", Body=b"a" * 100)
    proxy.fail_all("503", method="GET")
    storage = _storage(proxy.endpoint, max_attempts=3)
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/down: download failed after retries"):
        resolve_local(f"s3://{BUCKET}/down", tmp_path / "cache", storage)
    assert proxy.injected >= 3  # retried (3 attempts per request), then gave up
    assert not any((tmp_path / "cache").rglob("*.bin")) and not list((tmp_path / "cache" / "s3").iterdir())
    proxy.heal()
    got = resolve_local(f"s3://{BUCKET}/down", tmp_path / "cache", storage)  # healthy again: works
    assert (got / "a.bin").read_bytes() == b"a" * 100


def test_retry_settings_come_from_params(s3):
    """Without retries (max_attempts 1) the first reset is the caller's error: the retries that the
    other tests rely on are botocore's, configured from params.storage, not luck."""
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

    from components.core.storage import s3_client

    server, proxy = s3
    server.client().put_object(Bucket=BUCKET, Key="cfg/x", Body=b"x")
    cfg = s3_client(_storage(proxy.endpoint, max_attempts=5, retry_mode="adaptive", read_timeout_s=7.0)).meta.config
    assert (cfg.retries, cfg.read_timeout, cfg.connect_timeout) == ({"total_max_attempts": 5, "mode": "adaptive"}, 7.0, 10.0)
    proxy.set_rules(Rule("503", method="GET", first=1))
    with pytest.raises(ClientError, match="SlowDown"):
        s3_client(_storage(proxy.endpoint, max_attempts=1)).get_object(Bucket=BUCKET, Key="cfg/x")
    proxy.set_rules(Rule("reset", method="GET", first=1))
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        s3_client(_storage(proxy.endpoint, max_attempts=1)).get_object(Bucket=BUCKET, Key="cfg/x")
    proxy.set_rules(Rule("reset", method="GET", first=2))
    assert s3_client(_storage(proxy.endpoint, max_attempts=3)).get_object(Bucket=BUCKET, Key="cfg/x")["Body"].read() == b"x"
    proxy.heal()


def test_read_object_survives_truncated_bodies(s3):
    """A GetObject body that breaks off mid-stream is not retried by botocore (only requests are):
    read_object goes through s3transfer, which retries it."""
    from botocore.exceptions import ResponseStreamingError

    from components.core.storage import read_object, s3_client

    server, proxy = s3
    data = os.urandom(50_000)
    server.client().put_object(Bucket=BUCKET, Key="trunc/x.bin", Body=data)
    client = s3_client(_storage(proxy.endpoint))
    proxy.set_rules(Rule("truncate", method="GET", path="trunc/", first=1))
    with pytest.raises(ResponseStreamingError):  # the bare call: headers fine, body cut -> the caller's problem
        client.get_object(Bucket=BUCKET, Key="trunc/x.bin")["Body"].read()
    proxy.set_rules(Rule("truncate", method="GET", path="trunc/", first=2), Rule("reset", method="HEAD", first=1))
    assert read_object(client, BUCKET, "trunc/x.bin") == data
    assert proxy.stats == {"truncate": 2, "reset": 1}
    proxy.heal()


# --------------------------------------------------------------------------- dynamicid prepare on s3://


@pytest.fixture(scope="module")
def raw_on_s3(s3, tmp_path_factory):
    """A small synthetic raw set (2 people x 4 images + 2 bad files + side files) under s3://dynamicid/raw."""
    from components.core.config.data import SynthParams
    from components.synth.dataset import synthesize

    server, _ = s3
    root = tmp_path_factory.mktemp("raw") / "raw"
    synthesize(root, SynthParams(identities=2, images_per_identity=4, size=64, bad_samples=2, workers=1),
               progress=False)
    client = server.client()
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    for p in files:
        client.put_object(Bucket=BUCKET, Key=f"raw/{p.relative_to(root).as_posix()}", Body=p.read_bytes())
    return f"s3://{BUCKET}/raw", len(files)


def _prepare(endpoint: str, work: Path, out: Path, *extra: str) -> int:
    sets = {"storage.endpoint_url": endpoint, "storage.cache_dir": str(work / "cache"), "prepare.workers": 1,
            "prepare.work_dir": str(work / "work"), "prepare.detection_check": 0}
    argv = [x for k, v in sets.items() for x in ("-S", f"{k}={json.dumps(v)}")]
    return cli_main([*argv, *extra, "prepare", "--input", f"s3://{BUCKET}/raw", "--output", str(out), "--no-progress"])


PREPARED = ("manifest.json", "index.parquet", "rejects.jsonl")


def test_prepare_reads_s3_through_faults_with_identical_output(s3, raw_on_s3, tmp_path):
    """The faulty run does the full analysis (fresh work dir). The clean run then re-reads every
    object (its fingerprint index is removed) but finds every analysis by content hash: 0 images
    analysed proves that each object the faulty run read had exactly the bytes read now."""
    server, proxy = s3
    uri, n_objects = raw_on_s3
    proxy.set_rules(Rule("reset", method="GET", every=3), Rule("503", method="GET", every=4),
                    Rule("500", method="GET", path="list-type", first=1), Rule("reset_after", method="GET", first=1),
                    Rule("delay", method="GET", path=r"id_0001", first=1, delay_s=1.5))
    t0 = time.monotonic()
    assert _prepare(proxy.endpoint, tmp_path, tmp_path / "faulty") == 0
    faulty_s = time.monotonic() - t0
    faults = dict(proxy.stats)
    proxy.heal()
    shutil.rmtree(tmp_path / "work" / "sources")
    t0 = time.monotonic()
    assert _prepare(proxy.endpoint, tmp_path, tmp_path / "clean") == 0
    clean_read_s = time.monotonic() - t0
    print(f"\n[faults] prepare read {n_objects} objects through {faults} in {faulty_s:.1f} s (full analysis); "
          f"clean re-read {clean_read_s:.1f} s")
    report = json.loads((tmp_path / "clean" / "data_report.json").read_text())
    assert report["counts"]["accepted"] == 8
    assert sum(faults.values()) >= 8 and faults["reset"] >= 3 and faults["503"] >= 2
    a, b = _digests(tmp_path / "faulty"), _digests(tmp_path / "clean")
    assert [k for k in a if k.startswith("shards/")] and {k for k in a if k.startswith("shards/")} == {
        k for k in b if k.startswith("shards/")}
    for rel in [*PREPARED, *(k for k in a if k.startswith("shards/"))]:
        assert a[rel] == b[rel], rel
    rejects = [json.loads(x)["reason"] for x in (tmp_path / "faulty" / "rejects.jsonl").read_text().splitlines()]
    assert "read_error" not in rejects and sorted(rejects) == ["empty_file", "unreadable"]


def test_prepare_outage_is_a_clear_error_and_writes_nothing(s3, raw_on_s3, tmp_path, capsys):
    server, proxy = s3
    uri, _ = raw_on_s3
    proxy.fail_all("503")
    t0 = time.monotonic()
    rc = _prepare(proxy.endpoint, tmp_path, tmp_path / "out", "-S", "storage.max_attempts=3")
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    print(f"\n[faults] prepare during an outage: exit {rc} after {proxy.injected} faults, {took:.1f} s")
    assert rc == 2
    assert f"cannot list {uri}" in err and "SlowDown" in err and "Traceback" not in err
    assert proxy.injected == 3  # max_attempts 3 = the first try + 2 retries with backoff
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "data_report.json").exists()
    proxy.heal()


def test_prepare_objects_unreadable_after_retries_fail_the_run_not_the_data(s3, raw_on_s3, tmp_path, capsys):
    """Listing works but one person's objects keep failing: that is an outage, not bad data. The
    run must not publish a data set silently missing them (as `read_error` rejects): exit 2,
    nothing written; once healthy the rerun completes with every image."""
    server, proxy = s3
    proxy.fail_all("503", method="GET", path=r"/raw/id_0001/")
    rc = _prepare(proxy.endpoint, tmp_path, tmp_path / "out", "-S", "storage.max_attempts=2")
    err = capsys.readouterr().err
    proxy.heal()
    assert rc == 2, err
    assert "could not be read after retries" in err and "nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert _prepare(proxy.endpoint, tmp_path, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["counts"]["accepted"] == 8


# --------------------------------------------------------------------------- dvc push / pull to S3


def _dvc(*args: str) -> int:
    from dvc.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def dvc_repo(s3, tmp_path_factory):
    """A git + DVC repository with 8 small files under data/ (dvc add), and an S3 remote whose
    endpoint is the fault proxy (dvc-s3's own defaults: no retry settings)."""
    server, proxy = s3
    repo = tmp_path_factory.mktemp("dvcrepo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    data = repo / "data"
    data.mkdir()
    for i in range(8):
        (data / f"part-{i:02d}.bin").write_bytes(os.urandom(3000 + i))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        assert _dvc("init", "-q") == 0
        assert _dvc("config", "core.autostage", "false") == 0
        assert _dvc("add", "-q", "data") == 0
        assert _dvc("remote", "add", "-f", "-d", "s3store", f"s3://{BUCKET}/dvc") == 0
        assert _dvc("remote", "modify", "s3store", "endpointurl", proxy.endpoint) == 0
    return repo, _digests(data)


def test_dvc_push_and_pull_survive_transient_faults(s3, dvc_repo, monkeypatch):
    server, proxy = s3
    repo, digests = dvc_repo
    monkeypatch.chdir(repo)
    proxy.set_rules(Rule("reset", method="PUT", every=3), Rule("503", method="PUT|HEAD", every=4),
                    Rule("500", method="PUT", every=5), Rule("reset_after", method="PUT", first=1),
                    Rule("delay", method="PUT", first=1, delay_s=1.0))
    t0 = time.monotonic()
    assert _dvc("push", "-q") == 0
    push_s = time.monotonic() - t0
    _report("dvc push 9 objects", proxy, push_s)
    pushed = proxy.injected
    assert pushed >= 6 and proxy.stats["reset"] >= 2 and proxy.stats["503"] >= 2
    cache = [p for p in (repo / ".dvc" / "cache" / "files").rglob("*") if p.is_file()]
    assert len(server.keys("dvc/")) == len(cache) == 9  # 8 files + the directory listing

    shutil.rmtree(repo / ".dvc" / "cache")  # a fresh clone: no cache, no data
    shutil.rmtree(repo / "data")
    proxy.set_rules(Rule("reset", method="GET", every=3), Rule("503", method="GET|HEAD", every=4),
                    Rule("500", method="GET", every=5), Rule("truncate", method="GET", first=2))
    t0 = time.monotonic()
    assert _dvc("pull", "-q") == 0
    _report("dvc pull 9 objects", proxy, time.monotonic() - t0)
    assert proxy.injected >= 6 and proxy.stats["truncate"] == 2
    assert _digests(repo / "data") == digests
    proxy.heal()
    assert _dvc("status", "-q", "-c") == 0  # cache and remote agree


def test_dvc_push_during_an_outage_fails_then_succeeds_when_healthy(s3, dvc_repo, monkeypatch):
    """An outage: push exits non-zero and says so (in a subprocess so that the documented knob
    AWS_MAX_ATTEMPTS bounds how long it retries); once healthy, the same push completes."""
    server, proxy = s3
    repo, _ = dvc_repo
    monkeypatch.chdir(repo)
    (repo / "more").mkdir()
    (repo / "more" / "new.bin").write_bytes(os.urandom(2000))
    assert _dvc("add", "-q", "more") == 0
    before = set(server.keys("dvc/"))
    proxy.fail_all("503", method="PUT")
    env = {**os.environ, "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=120)
    took = time.monotonic() - t0
    print(f"\n[faults] dvc push during an outage: exit {res.returncode} after {proxy.injected} faults, {took:.1f} s")
    assert res.returncode != 0
    assert "failed to push" in (res.stdout + res.stderr).lower()
    assert set(server.keys("dvc/")) == before  # nothing new landed
    proxy.heal()
    assert _dvc("push", "-q") == 0
    assert len(set(server.keys("dvc/")) - before) == 2  # the file + the directory listing
    assert _dvc("status", "-q", "-c") == 0


# --------------------------------------------------------------------------- dynamicid register, artefacts on S3


@pytest.fixture(scope="module")
def registry_env(s3, tiny_params, tmp_path_factory):
    """An ``mlflow server`` (sqlite store) whose artefact destination is the faulty S3, a tiny
    checkpoint, and its evaluation output. The evaluation files are written here in the format of
    ``dynamicid evaluate`` (metrics.json + report.json with the checkpoint's real digest) rather
    than by running an evaluation: this test is about the upload, the gate is tested elsewhere.
    The server's own S3 client retries as botocore's environment says (AWS_RETRY_MODE /
    AWS_MAX_ATTEMPTS, as a deployment sets them); the client's HTTP retries to the server are
    MLflow's (MLFLOW_HTTP_REQUEST_MAX_RETRIES), kept small so that an outage ends quickly."""
    from components.core.registry import checkpoint_digest
    from model.loading import init_checkpoint
    from tests.services import mlflow_server

    server, proxy = s3
    root = tmp_path_factory.mktemp("registry")
    ckpt = init_checkpoint(tiny_params.model, tiny_params.face, root / "ckpt", tiny_params.storage.cache_dir, seed=3)
    ev = root / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"single": {"clip_t": 0.25, "id_similarity": 0.4}}))
    (ev / "report.json").write_text(json.dumps({
        "checkpoint_digest": checkpoint_digest(ckpt), "eval_set_hash": "e" * 64, "checkpoint": str(ckpt),
        "checkpoint_dir": str(ckpt), "profile": "tiny", "face_backend": "dlib"}))
    srv_env = {"MLFLOW_S3_ENDPOINT_URL": proxy.endpoint, **S3_ENV, "AWS_RETRY_MODE": "standard",
               "AWS_MAX_ATTEMPTS": "3"}
    with pytest.MonkeyPatch.context() as mp, mlflow_server(f"sqlite:///{root}/server.db", f"s3://{BUCKET}/mlflow",
                                                            root, env=srv_env) as srv:
        mp.chdir(root)  # MLflow's client writes nothing here, but keep the repository clean anyway
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        mp.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        # a plumbing gate these written metrics meet: the upload is under test here, not the model
        sets = {"storage.cache_dir": str(tiny_params.storage.cache_dir), "mlflow.tracking_uri": srv.uri,
                "gate.output": str(root / "gate"), "gate.learning_checks": False,
                "gate.minimums": {"single.clip_t": 0.0}}
        try:
            yield {"root": root, "ckpt": ckpt, "metrics": ev / "metrics.json", "sets": sets, "uri": srv.uri}
        finally:  # drop MLflow's cached keep-alive sessions, or the server waits for them on SIGTERM
            import gc

            from mlflow.utils import request_utils

            request_utils._cached_get_request_session.cache_clear()
            gc.collect()


def _register(env) -> int:
    argv = [x for k, v in env["sets"].items() for x in ("-S", f"{k}={json.dumps(v)}")]
    return cli_main([*argv, "register", "--metrics", str(env["metrics"]), "--promote"])


def _state(env) -> tuple[list[int], dict[str, int | None]]:
    """(versions, {alias: version}) of the registered model, read from the server."""
    from mlflow import MlflowClient

    from components.core.registry import alias_version

    c = MlflowClient(env["uri"])
    versions = sorted(int(v.version) for v in c.search_model_versions("name='dynamicid'"))
    aliases = {}
    for a in ("candidate", "champion"):
        mv = alias_version(c, "dynamicid", a)
        aliases[a] = None if mv is None else int(mv.version)
    return versions, aliases


def test_register_survives_transient_artefact_store_faults(s3, registry_env):
    from mlflow import MlflowClient

    from components.core.registry import checkpoint_digest, download_checkpoint

    server, proxy = s3
    env = registry_env
    proxy.set_rules(Rule("reset", method="PUT", every=5), Rule("503", method="PUT|GET|HEAD", every=9),
                    Rule("500", method="GET", every=10), Rule("reset_after", method="PUT", first=1),
                    Rule("delay", method="GET", first=1, delay_s=1.0))
    t0 = time.monotonic()
    assert _register(env) == 0
    _report("register (artefacts up + verify down)", proxy, time.monotonic() - t0)
    assert proxy.injected >= 6 and proxy.stats["reset"] >= 2 and proxy.stats["503"] >= 2
    proxy.heal()
    assert _state(env) == ([1], {"candidate": 1, "champion": 1})
    mv = MlflowClient(env["uri"]).get_model_version("dynamicid", "1")
    assert mv.status == "READY" and mv.tags["verified"] == "true"
    import mlflow

    mlflow.set_tracking_uri(env["uri"])
    got = download_checkpoint("models:/dynamicid@champion", env["root"] / "download")
    assert checkpoint_digest(got) == checkpoint_digest(env["ckpt"])
    keys = server.keys("mlflow/")
    assert any(k.endswith(f"/artifacts/{env['ckpt'].name}/manifest.json") for k in keys)


@pytest.mark.parametrize("outage", ["upload", "verify"])
def test_register_during_an_outage_leaves_no_version_and_moves_no_alias(s3, registry_env, outage, capsys):
    """upload: the artefact PUTs fail, so no version is ever created. verify: the upload works but
    downloading the version back fails, so publish deletes the version it created. Either way the
    command exits 2 with one clear line and the registry is exactly as before."""
    server, proxy = s3
    env = registry_env
    proxy.heal()
    before = _state(env)
    assert before[1]["champion"] is not None  # an earlier registration holds the aliases
    proxy.fail_all("503", method="PUT" if outage == "upload" else "GET")
    t0 = time.monotonic()
    rc = _register(env)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    print(f"\n[faults] register, {outage} outage: exit {rc} after {proxy.injected} faults, {took:.1f} s")
    proxy.heal()
    assert rc == 2 and "registration failed, no alias moved" in err and "Traceback" not in err
    if outage == "upload":
        assert "uploading the model artefacts of dynamicid failed after retries" in err
        assert "nothing was registered" in err
    else:
        assert "the version was removed" in err or "registered checkpoint" in err
    assert _state(env) == before


# --------------------------------------------------------------------------- storage path escapes


@pytest.mark.parametrize("key", ["esc/../../outside.txt", "esc/a/../../../outside.txt", "esc//outside.txt",
                                 "esc/../esc/../../outside.txt"])
def test_download_refuses_keys_that_leave_the_destination(s3, tmp_path, key):
    """S3 stores such keys literally (moto too): a naive join would write next to (or above) the
    cache. One bad key refuses the whole prefix, and nothing is left behind."""
    from components.core.storage import StorageError, download_prefix

    server, proxy = s3
    client = server.client()
    prefix = "esc-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/ok.txt", Body=b"ok")
    client.put_object(Bucket=BUCKET, Key=key.replace("esc", prefix, 1), Body=b"evil")
    dest = tmp_path / "cache" / "s3" / "abc"
    dest.parent.mkdir(parents=True)
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/{prefix}: object key .* escapes the download root"):
        download_prefix(f"s3://{BUCKET}/{prefix}", dest, _storage(server.endpoint))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no outside.txt, no ok.txt, no .partial


def test_safe_join_holds_for_absolute_keys_and_symlinks(tmp_path):
    from components.core.storage import StorageError, _safe_join

    real = tmp_path / "real-cache"
    real.mkdir()
    linked = tmp_path / "linked-cache"
    linked.symlink_to(real, target_is_directory=True)  # a cache dir reached through a symlink still works
    assert _safe_join(linked, "a/b.png") == real / "a" / "b.png"
    outside = tmp_path / "outside"
    outside.mkdir()
    (real / "sub").symlink_to(outside, target_is_directory=True)  # a link inside the root pointing out
    for rel in ["/etc/passwd", "../x", "sub/x.png", "sub/../../outside/x", "", ".", "a/\x00b"]:
        with pytest.raises(StorageError, match="escapes the download root"):
            _safe_join(linked, rel)
    assert _safe_join(real, "a/../b.png") == real / "b.png"  # '..' that stays inside is fine


def test_download_never_writes_through_a_planted_partial_symlink(s3, tmp_path):
    """If the temp directory name is a symlink to elsewhere (left over, or planted), the download
    replaces the link with a real directory instead of writing into its target."""
    from components.core.storage import download_prefix

    server, _ = s3
    server.client().put_object(Bucket=BUCKET, Key="plant/x.txt", Body=b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "cache" / "mirror"
    dest.parent.mkdir()
    (dest.parent / "mirror.partial").symlink_to(elsewhere, target_is_directory=True)
    got = download_prefix(f"s3://{BUCKET}/plant", dest, _storage(server.endpoint))
    assert (got / "x.txt").read_bytes() == b"x" and not got.is_symlink()
    assert list(elsewhere.iterdir()) == []


def test_upload_refuses_a_tree_with_a_link_out_of_it(s3, tmp_path):
    from components.core.storage import StorageError, upload_dir

    server, _ = s3
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = not-for-upload")
    tree = tmp_path / "ckpt"
    tree.mkdir()
    (tree / "manifest.json").write_text("{}")
    (tree / "weights.bin").symlink_to(secret)
    with pytest.raises(StorageError, match="weights.bin.* escapes"):
        upload_dir(tree, f"s3://{BUCKET}/up", _storage(server.endpoint))
    assert server.keys("up/") == []  # checked before the first upload


@pytest.mark.parametrize("uri", ["s3:///key", "s3://", "s3://../x", "s3://b/../x", "s3://bucket/a/../../b",
                                 "s3://bucket/./a", "s3://user:pw@bucket/x", "s3://bucket:9000/x", "s3://UPPER/x",
                                 "s3://bucket/x?versionId=1", "file:///etc/passwd"])
def test_bad_s3_uris_are_refused(uri, tmp_path):
    from components.core.storage import StorageUriError, resolve_local, split_s3

    with pytest.raises(StorageUriError):
        split_s3(uri)
    if uri.startswith("s3://"):
        with pytest.raises(ValueError):  # StorageUriError is a ValueError and a StorageError
            resolve_local(uri, tmp_path)
        assert list(tmp_path.iterdir()) == []


def test_good_s3_uris_split():
    from components.core.storage import split_s3

    assert split_s3("s3://dynamicid/raw/faces") == ("dynamicid", "raw/faces")
    assert split_s3("s3://my.bucket-1/") == ("my.bucket-1", "")
    assert split_s3("s3://b12/a..b/c") == ("b12", "a..b/c")  # '..' inside a name is not a segment

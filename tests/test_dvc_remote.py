"""DVC: raw and prepared data as DVC outputs, pushed to and pulled back from a local-directory
remote and an S3 remote (dvc-s3, endpoint configured on the remote) served by moto on 127.0.0.1.

The prepare stage here is the one docs/data.md gives for dvc.yaml (cmd, deps, params, outs,
metrics, plots) minus the code deps, which a throw-away repository does not have; ``dvc repro``
runs the real ``dynamicid prepare``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.core.config.data import SynthParams
from components.synth.dataset import synthesize

OUTS = ["data/prepared/shards", "data/prepared/index.parquet", "data/prepared/manifest.json",
        "data/prepared/rejects.jsonl"]
STAGE = {
    "cmd": "dynamicid prepare --no-progress",
    "deps": ["data/raw"],
    "params": ["data", "prepare", "face", "model.profile"],
    "outs": OUTS,
    "metrics": [{"data/prepared/data_report.json": {"cache": False}}],
    "plots": [{"data/prepared/histograms.png": {"cache": False}}],
}


def run_dvc(*args: str) -> None:
    """Run dvc in this process (the CLI's own entry point; the cwd is the repository)."""
    from dvc.cli import main

    code = main(list(args))
    assert code == 0, f"dvc {' '.join(args)} exited {code}"


def _digests(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        p = root / rel
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _forget_local_copies(repo: Path) -> None:
    """What a fresh clone lacks: the DVC cache and every DVC-tracked output."""
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    for rel in OUTS:
        p = repo / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository whose raw test-bed is `dvc add`ed and whose prepare stage ran."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    cache = tmp_path_factory.mktemp("dvcrepo-cache")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    synthesize(repo / "data" / "raw", SynthParams(identities=3, images_per_identity=3, size=64, bad_samples=2,
                                                  workers=1), progress=False)
    (repo / "params.yaml").write_text(yaml.safe_dump({
        "storage": {"cache_dir": str(cache)},
        "data": {"raw": "data/raw", "prepared": "data/prepared"},
        "prepare": {"workers": 1, "test_fraction": 0.34, "detection_check": 4},
        "face": {"backend": "auto", "min_face_size": 24},
        "model": {"profile": "tiny"},
    }))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": STAGE}}, sort_keys=False))
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    old = {k: os.environ.get(k) for k in env}
    cwd = os.getcwd()
    os.environ.update(env)
    os.chdir(repo)
    try:
        run_dvc("init", "-q")
        run_dvc("config", "core.autostage", "false")
        run_dvc("add", "-q", "data/raw")
        run_dvc("repro", "-q", "prepare")
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    digests = _digests(repo, ["data/raw", *OUTS])
    return repo, digests


def test_prepare_stage_outputs_and_metrics(repo, monkeypatch):
    import dvc.api

    root, digests = repo
    monkeypatch.chdir(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    assert sorted(o["path"] for o in lock["outs"]) == sorted(OUTS + ["data/prepared/data_report.json",
                                                                   "data/prepared/histograms.png"])
    assert lock["params"]["params.yaml"]["prepare"]["detection_check"] == 4
    metrics = dvc.api.metrics_show()  # one metrics file: its numbers, as `dvc metrics show` reads them
    report = json.loads((root / "data/prepared/data_report.json").read_text())
    assert metrics["counts"] == report["counts"] and report["counts"]["accepted"] == 9
    assert report["rejects"] == {"empty_file": 1, "unreadable": 1}
    assert any(k.startswith("data/prepared/shards/part-") for k in digests)
    run_dvc("status", "-q")  # up to date: nothing changed since repro


def test_push_pull_local_directory_remote(repo, tmp_path, monkeypatch):
    root, digests = repo
    monkeypatch.chdir(root)
    remote = tmp_path / "remote"
    run_dvc("remote", "add", "-f", "localdir", str(remote))
    run_dvc("push", "-q", "-r", "localdir")
    assert any(remote.rglob("*"))  # content-addressed files/md5/xx/... objects
    _forget_local_copies(root)
    run_dvc("pull", "-q", "-r", "localdir")
    assert _digests(root, ["data/raw", *OUTS]) == digests


def test_push_pull_s3_remote_on_a_local_server(repo, monkeypatch):
    from tests.services import S3_ENV, moto_s3

    root, digests = repo
    monkeypatch.chdir(root)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint comes from the remote's config
    with moto_s3("dvc-store") as s3:
        run_dvc("remote", "add", "-f", "s3store", "s3://dvc-store/dynamicid")
        run_dvc("remote", "modify", "s3store", "endpointurl", s3.endpoint)
        run_dvc("push", "-q", "-r", "s3store")
        keys = s3.keys("dynamicid/")
        local_objects = [p for p in (root / ".dvc" / "cache" / "files").rglob("*") if p.is_file()]
        assert len(keys) == len(local_objects) > 0
        _forget_local_copies(root)
        run_dvc("pull", "-q", "-r", "s3store")
        assert _digests(root, ["data/raw", *OUTS]) == digests
        run_dvc("status", "-q", "-c", "-r", "s3store")  # cache and remote agree

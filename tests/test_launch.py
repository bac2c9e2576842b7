"""`dynamicid launch`: the PyTorchJob it builds (from k8s/base, validated strictly) and the
create/wait loop against a real HTTP server on 127.0.0.1 that speaks the few Kubernetes
endpoints the official client uses here; no client method is mocked.

``FakeKube`` also serves tests/test_deploy.py.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

import k8s_schema as ks
from components.cli import main
from components.core.config import params_from_dict, parse_overrides

Obj = dict[str, Any]
TOKEN = "test-token-0123"
SECRET_SENTINEL = "sentinel-secret-value-must-not-leak"


# --- a tiny Kubernetes API server -------------------------------------------------------------

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>log|status))?)?$"
)


class FakeKube:
    """Objects in memory behind the REST paths of the Kubernetes API (create, get, list with an
    equality label selector, replace with resourceVersion checks, delete, pod logs). ``on_get``
    hooks (by plural) play the controllers: they may change an object each time it is read."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Obj]] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth: set[str | None] = set()
        self.logs: dict[str, str] = {}
        self.on_get: dict[str, Callable[[Obj], None]] = {}
        self.lock = threading.RLock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _reply(self, code: int, body: Any, ctype: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Obj:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                fake.auth.add(self.headers.get("Authorization"))
                with fake.lock:
                    fake.requests.append((method, url.path))
                    m = _PATH.match(url.path)
                    if not m:
                        return self._reply(404, _status(404, "NotFound", f"no route {url.path}"))
                    code, body, ctype = fake.handle(method, m, parse_qs(url.query),
                                                    self._body() if method in ("POST", "PUT") else None)
                self._reply(code, body, ctype)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    # -- storage ---------------------------------------------------------------------------------

    def collection(self, group: str, ns: str, plural: str) -> dict[str, Obj]:
        return self.objects.setdefault((group, ns, plural), {})

    def put(self, group: str, ns: str, plural: str, obj: Obj) -> Obj:
        """Store an object as a controller would create it (pods)."""
        with self.lock:
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", ns)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["resourceVersion"] = str(int(meta.get("resourceVersion", "0")) + 1)
            self.collection(group, ns, plural)[meta["name"]] = obj
            return obj

    def get(self, group: str, ns: str, plural: str, name: str) -> Obj | None:
        with self.lock:
            return self.collection(group, ns, plural).get(name)

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    def handle(self, method: str, m: re.Match, query: dict, body: Obj | None) -> tuple[int, Any, str]:
        group = m["group"] or ""
        ns, plural, name, sub = m["ns"], m["plural"], m["name"], m["sub"]
        objs = self.collection(group, ns, plural)
        if name is None:
            if method == "GET":
                selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                items = [o for o in objs.values()
                         if all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
                return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}, "application/json"
            if method == "POST":
                key = body["metadata"]["name"]
                if key in objs:
                    return 409, _status(409, "AlreadyExists", f'{plural} "{key}" already exists'), "application/json"
                body["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion="1", generation=1)
                objs[key] = body
                return 201, body, "application/json"
        else:
            if sub == "log":
                return 200, self.logs.get(name, ""), "text/plain"
            if name not in objs:
                return 404, _status(404, "NotFound", f'{plural} "{name}" not found'), "application/json"
            if method == "GET":
                hook = self.on_get.get(plural)
                if hook:
                    hook(objs[name])
                return 200, objs[name], "application/json"
            if method == "PUT":
                old = objs[name]
                if body["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
                    return 409, _status(409, "Conflict", "the object has been modified"), "application/json"
                body["metadata"].update(
                    uid=old["metadata"]["uid"], namespace=ns,
                    resourceVersion=str(int(old["metadata"]["resourceVersion"]) + 1),
                    generation=old["metadata"].get("generation", 1) + (body.get("spec") != old.get("spec")),
                )
                if "status" in old:
                    body["status"] = old["status"]
                objs[name] = body
                return 200, body, "application/json"
            if method == "DELETE":
                del objs[name]
                return 200, _status(200, "Success", "deleted"), "application/json"
        return 405, _status(405, "MethodNotAllowed", method), "application/json"

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
        }))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure" if code >= 300 else "Success",
            "code": code, "reason": reason, "message": message}


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeKube()
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    fake.close()


# --- the training operator, scripted ------------------------------------------------------------


def _cond(kind: str, reason: str, message: str = "", status: str = "True", t: int = 0) -> Obj:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": f"2026-01-01T00:00:{t:02d}Z"}


def _pod(job: str, role: str, index: int, phase: str, waiting: str | None = None) -> Obj:
    name = f"{job}-{role}-{index}"
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"training.kubeflow.org/job-name": job,
                                              "training.kubeflow.org/replica-type": role}},
        "spec": {"containers": [{"name": "pytorch", "image": "x"}]},
        "status": {"phase": phase, "containerStatuses": [
            {"name": "pytorch", "image": "x", "imageID": "", "ready": phase == "Running", "restartCount": 0,
             "state": state}]},
    }


class Operator:
    """Each read of the job moves it one step along ``script``: (conditions, pods per role) and
    an optional action (e.g. the pods writing their output on the shared volume)."""

    def __init__(self, kube: FakeKube, script: list[tuple[list[Obj], list[tuple[str, str, str | None]]]],
                 on_finish: Callable[[Obj], None] | None = None):
        self.kube, self.script, self.on_finish, self.step = kube, script, on_finish, 0
        kube.on_get["pytorchjobs"] = self

    def __call__(self, job: Obj) -> None:
        conditions, pods = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        job["status"] = {"conditions": copy.deepcopy(conditions)}
        for i, (role, phase, waiting) in enumerate(pods):
            index = 0 if role == "master" else i - 1
            self.kube.put("", ns, "pods", _pod(name, role, index, phase, waiting))
        if self.on_finish and any(c["type"] == "Succeeded" for c in conditions):
            self.on_finish(job)
            self.on_finish = None


CREATED = _cond("Created", "PyTorchJobCreated", "created", t=1)
RUNNING = _cond("Running", "PyTorchJobRunning", "is running", t=2)
SUCCEEDED = _cond("Succeeded", "PyTorchJobSucceeded", "successfully completed", t=3)
FAILED = _cond("Failed", "PyTorchJobFailed", "Master replica failed with exit code 1", t=3)


# --- helpers ------------------------------------------------------------------------------------


def cluster_overrides(tmp_path: Path, **extra: Any) -> list[str]:
    base = {
        "pipeline.image": "registry.example/dynamicid:9.9",
        "pipeline.namespace": "train-ns",
        "pipeline.pvc": "shared-rwx",
        "pipeline.shared_dir": str(tmp_path / "shared"),
        "pipeline.s3_secret": "my-s3",
        "pipeline.node_selector": "{nvidia.com/gpu.product: H100}",
        "pipeline.tolerations": "[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
        "pipeline.train_cpu": "'30'",
        "pipeline.poll_s": "0.02",
        "data.prepared": "prepared",
        "train.anchor.output": "runs/anchor",
        "storage.cache_dir": str(tmp_path / "cache"),
    }
    base.update({k: str(v) for k, v in extra.items()})
    out = []
    for k, v in base.items():
        out += ["-S", f"{k}={v}"]
    return out


def dry_run(capsys, argv: list[str]) -> Obj:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def decode_settings(args: list[str]):
    """The params a pod's `dynamicid --set=... train` resolves (the CLI's own parser)."""
    sets = [a.removeprefix("--set=").replace("$$(", "$(") for a in args if a.startswith("--set=")]
    return params_from_dict(parse_overrides(sets))


def trainer(job: Obj, role: str) -> Obj:
    spec = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "pytorch")


# --- the object ---------------------------------------------------------------------------------


def test_multi_node_gpu_job_from_the_base_template(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_SENTINEL)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_SENTINEL)
    argv = cluster_overrides(tmp_path, **{"evaluate.prompts": "['costs $(HOME) dollars']"}) + [
        "launch", "--stage", "reconfigure", "--nodes", "3", "--gpus-per-node", "8", "--dry-run"]
    job = dry_run(capsys, argv)
    text = yaml.safe_dump(job)
    assert SECRET_SENTINEL not in text

    ks.validate(job, ks.MIN_KUBE_VERSION)  # strict: an unknown or misspelt field fails
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert re.fullmatch(r"dynamicid-reconfigure-[0-9a-f]{8}", job["metadata"]["name"])
    assert job["metadata"]["namespace"] == "train-ns"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2

    base = yaml.safe_load((Path(__file__).parents[1] / "k8s/base/pytorchjob-anchor.yaml").read_text())
    base_args = base["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    for role in ("Master", "Worker"):
        pod = replicas[role]["template"]["spec"]
        c = trainer(job, role)
        assert c["image"] == "registry.example/dynamicid:9.9"
        # GPUs: a limit of the device resource, one process per GPU (nprocPerNode above)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["resources"]["requests"]["cpu"] == "30"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        env = {e["name"]: e for e in c["env"]}
        # NCCL: the pod NIC, fail-fast collectives, and no CPU-accelerator switch on GPU nodes
        assert env["NCCL_SOCKET_IFNAME"]["value"] and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
        assert "NCCL_DEBUG" in env and "DS_ACCELERATOR" not in env
        # credentials only by reference, to the Secret params name
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert set(env[name]) == {"name", "valueFrom"}
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "my-s3", "key": name}
        secret_like = [e for e in c["env"] if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", e["name"])]
        assert secret_like and all("value" not in e for e in secret_like)
        # params travel in the args; no ConfigMap that only kustomize can name
        assert "DYNAMICID_PARAMS" not in env
        assert all(v["name"] != "params" for v in pod["volumes"])
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] \
            == ["shared-rwx"]
        assert c["workingDir"] == str(tmp_path / "shared")
        assert {"name": "data", "mountPath": str(tmp_path / "shared")} in c["volumeMounts"]
        # the template's torchrun flags, then the params, then the stage
        args = c["args"]
        assert args[: base_args.index("dynamicid") + 1] == base_args[: base_args.index("dynamicid") + 1]
        tail = args[args.index("train"):]
        assert tail == ["train", "--stage=reconfigure", "--resume"]
        sent = decode_settings(args)
        assert sent.train.anchor.output == "runs/anchor" and sent.data.prepared == "prepared"
        assert sent.evaluate.prompts == ["costs $(HOME) dollars"]
        assert any("$$(HOME)" in a for a in args)  # escaped against Kubernetes' $(VAR) expansion
        assert sent.storage.cache_dir == str(tmp_path / "cache")


def test_settings_carry_exactly_the_resolved_params(tmp_path, capsys) -> None:
    from components.core.config import load_params

    argv = cluster_overrides(tmp_path)
    job = dry_run(capsys, argv + ["-S", "train.anchor.lr=1e-05", "launch", "--stage", "anchor", "--nodes", "2",
                                  "--dry-run"])
    sent = decode_settings(trainer(job, "Master")["args"])
    overrides = [a for a in argv if a != "-S"] + ["train.anchor.lr=1e-05"]
    expected = load_params(None, overrides)
    assert sent == expected and sent.train.anchor.lr == pytest.approx(1e-5)


def test_cpu_single_node_job_and_stage_argument(tmp_path, capsys) -> None:
    job = dry_run(capsys, cluster_overrides(tmp_path) + [
        "launch", "--stage", "base", "--nodes", "1", "--gpus-per-node", "0", "--cluster", "--dry-run",
        "--name", "my-job", "--namespace", "other"])
    ks.validate(job, ks.MIN_KUBE_VERSION)
    assert job["metadata"]["name"] == "my-job" and job["metadata"]["namespace"] == "other"
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"} and job["spec"]["nprocPerNode"] == "1"
    c = trainer(job, "Master")
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
    assert c["args"][c["args"].index("train"):] == ["train", "--stage=base", "--resume"]


def test_job_name_is_stable_per_configuration(tmp_path, capsys) -> None:
    def name(*extra: str) -> str:
        return dry_run(capsys, cluster_overrides(tmp_path) + [*extra, "launch", "--stage", "anchor", "--nodes", "2",
                                                              "--dry-run"])["metadata"]["name"]

    first = name()
    assert name() == first
    assert name("-S", "train.anchor.steps=7") != first


def test_local_paths_without_the_shared_volume_are_refused(tmp_path, capsys) -> None:
    local = tmp_path / "artefacts" / "prepared"
    local.mkdir(parents=True)
    code = main(cluster_overrides(tmp_path, **{"data.prepared": str(local)})
                + ["launch", "--stage", "anchor", "--nodes", "2", "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.prepared" in err and str(local) in err and "cannot read" in err


def test_dry_run_with_the_volume_mounted_maps_paths_and_copies_nothing(tmp_path, capsys) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    local = tmp_path / "kfp" / "prepared"
    local.mkdir(parents=True)
    job = dry_run(capsys, cluster_overrides(tmp_path, **{"data.prepared": local, "train.anchor.output": "/out/x"})
                  + ["launch", "--stage", "anchor", "--nodes", "2", "--dry-run"])
    sent = decode_settings(trainer(job, "Master")["args"])
    assert Path(sent.data.prepared).parent == shared / "staging" / "inputs"
    assert sent.train.anchor.output == str(shared / "staging" / job["metadata"]["name"] / "output")
    assert not (shared / "staging").exists()


def test_placement_rules(tmp_path, capsys) -> None:
    assert main(["launch", "--stage", "anchor", "--nodes", "2", "--local"]) == 2
    assert "2 nodes need a cluster" in capsys.readouterr().err
    assert main(["launch", "--stage", "anchor", "--nodes", "0"]) == 2


def test_one_node_trains_in_this_process_with_the_same_params(tmp_path, capsys, monkeypatch) -> None:
    """Local placement hands over to `dynamicid train` with the caller's overrides: train sees the
    prepared-data path given to launch (and names it when it does not exist)."""
    monkeypatch.chdir(tmp_path)  # whatever train would write by default stays in the test's directory
    missing = tmp_path / "no-such-prepared-data"
    code = main(["-S", f"data.prepared={missing}", "-S", f"train.base.output={tmp_path / 'out'}",
                 "-S", f"storage.cache_dir={tmp_path / 'cache'}",
                 "launch", "--stage", "base", "--gpus-per-node", "0"])
    captured = capsys.readouterr()
    assert "on this machine" in captured.out
    assert code != 0 and "no-such-prepared-data" in captured.err


# --- create and wait ----------------------------------------------------------------------------


def test_waits_until_succeeded_and_copies_the_result_back(tmp_path, capsys, kube) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    artefacts = tmp_path / "kfp"
    prepared = artefacts / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "shard-0.bin").write_bytes(b"\x00\x01" * 100)
    upstream = artefacts / "anchor"
    (upstream / "export").mkdir(parents=True)
    (upstream / "export" / "manifest.json").write_text("{}")
    output = artefacts / "reconfigure"

    def pods_write_output(job: Obj) -> None:
        """What the job's pods do on the volume: read the staged inputs, write the export."""
        args = trainer(job, "Master")["args"]
        sent = decode_settings(args)
        assert (Path(sent.data.prepared) / "shard-0.bin").read_bytes() == b"\x00\x01" * 100
        assert (Path(sent.train.anchor.output) / "export" / "manifest.json").exists()
        export = Path(sent.train.reconfigure.output) / "export"
        export.mkdir(parents=True)
        (export / "imr.safetensors").write_bytes(b"weights")

    Operator(kube, [
        ([CREATED], [("master", "Pending", "ContainerCreating"), ("worker", "Pending", "ContainerCreating")]),
        ([CREATED, RUNNING], [("master", "Running", None), ("worker", "Running", None)]),
        ([CREATED, RUNNING], [("master", "Running", None), ("worker", "Running", None)]),
        ([CREATED, {**RUNNING, "status": "False"}, SUCCEEDED], [("master", "Succeeded", None),
                                                                ("worker", "Succeeded", None)]),
    ], on_finish=pods_write_output)
    argv = cluster_overrides(tmp_path, **{"data.prepared": prepared, "train.anchor.output": upstream,
                                          "train.reconfigure.output": output})
    code = main(argv + ["launch", "--stage", "reconfigure", "--nodes", "2", "--gpus-per-node", "4", "--wait"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (output / "export" / "imr.safetensors").read_bytes() == b"weights"
    staging = shared / "staging"
    assert [p.name for p in staging.iterdir()] == ["inputs"]  # the job's own output dir is cleaned up
    assert len(list((staging / "inputs").iterdir())) == 2  # prepared data and the upstream model, once each

    jobs = kube.collection("kubeflow.org", "train-ns", "pytorchjobs")
    assert len(jobs) == 1
    job = next(iter(jobs.values()))
    name = job["metadata"]["name"]
    assert trainer(job, "Worker")["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert kube.auth == {f"Bearer {TOKEN}"}  # the kube config's credentials were used
    # streamed: each condition and pod phase once, in order
    lines = [ln for ln in out.splitlines() if ln.startswith("launch: ")]
    order = [f"job {name}: Created=True", f"pod {name}-master-0: Pending (ContainerCreating)",
             f"job {name}: Running=True", f"pod {name}-master-0: Running",
             f"job {name}: Succeeded=True", f"pod {name}-master-0: Succeeded"]
    positions = [next(i for i, ln in enumerate(lines) if ln.startswith(f"launch: {o}")) for o in order]
    assert positions == sorted(positions)
    assert sum(ln.startswith(f"launch: pod {name}-master-0: Running") for ln in lines) == 1
    assert f"PyTorchJob train-ns/{name} succeeded" in out


def test_failure_exits_non_zero_with_reason_and_log_tail(tmp_path, capsys, kube) -> None:
    Operator(kube, [([CREATED, RUNNING], [("master", "Running", None)]),
                    ([CREATED, FAILED], [("master", "Failed", None)])])
    kube.logs = {}
    argv = cluster_overrides(tmp_path) + ["launch", "--stage", "anchor", "--nodes", "2", "--wait"]
    name = dry_run(capsys, argv + ["--dry-run"])["metadata"]["name"]
    kube.logs[f"{name}-master-0"] = "step 3 loss nan\nRuntimeError: CUDA out of memory\n"
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "failed: PyTorchJobFailed: Master replica failed with exit code 1" in captured.err
    assert "CUDA out of memory" in captured.err


def test_timeout_leaves_the_job_and_says_so(tmp_path, capsys, kube) -> None:
    Operator(kube, [([CREATED, RUNNING], [("master", "Running", None)])])
    code = main(cluster_overrides(tmp_path) + ["launch", "--stage", "anchor", "--nodes", "2", "--wait",
                                               "--timeout", "0.2"])
    assert code == 2
    assert "still running after" in capsys.readouterr().err
    assert len(kube.collection("kubeflow.org", "train-ns", "pytorchjobs")) == 1


def test_a_retry_attaches_to_the_running_job_and_replaces_a_failed_one(tmp_path, capsys, kube) -> None:
    argv = cluster_overrides(tmp_path) + ["launch", "--stage", "anchor", "--nodes", "2"]
    job = dry_run(capsys, argv + ["--dry-run"])
    name = job["metadata"]["name"]
    uid = kube.put("kubeflow.org", "train-ns", "pytorchjobs", copy.deepcopy(job))["metadata"]["uid"]
    Operator(kube, [([CREATED, RUNNING], []), ([CREATED, RUNNING, SUCCEEDED], [])])
    assert main(argv + ["--wait"]) == 0
    assert "already running; following it" in capsys.readouterr().out
    assert kube.get("kubeflow.org", "train-ns", "pytorchjobs", name)["metadata"]["uid"] == uid
    assert kube.count("DELETE", "pytorchjobs") == 0

    # a succeeded one is reused as it is
    assert main(argv + ["--wait"]) == 0
    assert "already succeeded with this configuration" in capsys.readouterr().out
    assert kube.get("kubeflow.org", "train-ns", "pytorchjobs", name)["metadata"]["uid"] == uid

    # a failed job of the same configuration is deleted and created again
    kube.get("kubeflow.org", "train-ns", "pytorchjobs", name)["status"] = {"conditions": [CREATED, FAILED]}
    kube.on_get.clear()
    assert main(argv) == 0  # without --wait: created, not followed
    out = capsys.readouterr().out
    assert "failed before; replacing it" in out and f"created PyTorchJob train-ns/{name}" in out
    assert kube.count("DELETE", f"pytorchjobs/{name}") == 1
    replaced = kube.get("kubeflow.org", "train-ns", "pytorchjobs", name)
    assert replaced["metadata"]["uid"] != uid and "status" not in replaced


def test_api_errors_are_one_line_user_errors(tmp_path, capsys, kube) -> None:
    kube.close()  # nothing listens any more
    code = main(cluster_overrides(tmp_path) + ["launch", "--stage", "anchor", "--nodes", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Kubernetes API" in err and "Traceback" not in err

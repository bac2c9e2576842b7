"""Every manifest the project renders takes credentials only from Secret references, holds no
literal credential, and runs its pods without root (issue 9, secrets and manifests).

"Every manifest": the kustomize builds (``k8s/overlays/dev`` and ``prod``), the InferenceService
``dynamicid deploy`` renders, the PyTorchJobs ``dynamicid launch --dry-run`` prints and the compiled
Kubeflow pipeline (IR + kfp-kubernetes platform spec). They are rendered with canary credentials in
the environment, which must not show up in any of them.
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml

from components.cli import main
from components.core.errors import UserError
from components.core.config import params_from_dict, parse_overrides
from tests import k8s_schema as ks

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
Obj = dict[str, Any]

# Env names that must never carry a literal value (the list, matched anywhere in the name).
SECRET_ENV_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)
# Literal strings that look like credentials, whatever field they sit in.
CREDENTIAL_LITERALS = {
    "password in a URL": re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s@:'\"]+:[^/\s@'\"]+@"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "JWT / service-account token": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "assigned secret": re.compile(r"(?i)\b(?:password|passwd|secret|token|api[_-]?key)\s*[=:]\s*['\"]?[^\s'\",}{$]{6,}"),
}
ENV_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "KF_PIPELINES_TOKEN")
CLUSTER = {"pipeline.image": "registry.example/dynamicid:1", "data.prepared": "prepared",
           "train.anchor.output": "runs/anchor", "train.reconfigure.output": "runs/reconfigure"}


def _sets(overrides: dict[str, str]) -> list[str]:
    return [a for k, v in overrides.items() for a in ("-S", f"{k}={v}")]


def _cli_yaml(capsys, argv: list[str]) -> Obj:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="module")
def env_canaries() -> Iterator[dict[str, str]]:
    values = {n: f"cnry{uuid.uuid4().hex[:16]}" for n in ENV_SECRETS}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in values.items():
            mp.setenv(name, value)
        yield values


@pytest.fixture(scope="module")
def rendered(env_canaries, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    """source -> objects, for every way the project produces manifests."""
    from components.deploy.inference_service import ModelRef, build_inference_service
    from pipelines.pipeline import compile_pipeline

    out: dict[str, list[Obj]] = {f"kustomize {b}": ks.render(K8S / "overlays" / b) for b in ("dev", "prod")}

    # A laptop's params: caches in the user's home, which the pod does not have (read-only root).
    params = params_from_dict({"storage": {"cache_dir": "/home/alice/.cache/dynamicid"},
                               "model": {"sd15": {"cache_dir": "/home/alice/.cache/dynamicid"}}})
    model = ModelRef("dynamicid", "3", "s3://bucket/models/3", "s3://bucket/models/3")
    out["deploy"] = [build_inference_service(params, model, name="dynamicid", namespace="serving",
                                             image="registry.example/predictor:1", canary_percent=None)]

    tmp = tmp_path_factory.mktemp("ir")
    for name, extra in (("kfp in-pod", {}), ("kfp multi-node", {"pipeline": {"nodes": 2, "gpus_per_node": 8}})):
        path = compile_pipeline(params_from_dict(extra), tmp / f"{name.replace(' ', '-')}.yaml")
        out[name] = list(yaml.safe_load_all(path.read_text()))
    return out


@pytest.fixture(scope="module")
def launched(env_canaries) -> dict[str, Obj]:
    """`dynamicid launch --dry-run`: a multi-node GPU job and a single-node CPU job."""
    import contextlib
    import io

    jobs = {}
    for name, flags in (("2x8 gpu", ["--nodes", "2", "--gpus-per-node", "8"]),
                        ("1 cpu", ["--nodes", "1", "--gpus-per-node", "0", "--cluster"])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(_sets(CLUSTER) + ["launch", "--stage", "anchor", *flags, "--dry-run"]) == 0
        jobs[name] = yaml.safe_load(buf.getvalue())
    return jobs


def all_sources(rendered: dict[str, list[Obj]], launched: dict[str, Obj]) -> dict[str, list[Obj]]:
    return {**rendered, **{f"launch {k}": [v] for k, v in launched.items()}}


# --- walking the objects ---------------------------------------------------------------------------


def pod_specs(obj: Obj) -> Iterator[tuple[str, Obj]]:
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job"):
        yield kind, obj["spec"]["template"]["spec"]
    elif kind == "PyTorchJob":
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            yield f"PyTorchJob/{role}", replica["template"]["spec"]
    elif kind == "InferenceService":
        yield "InferenceService/predictor", obj["spec"]["predictor"]


def env_entries(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, env entry) of every container of a Kubernetes object or of a kfp IR document."""
    for where, spec in pod_specs(obj):
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            for e in c.get("env", []):
                yield f"{where}/{c['name']}", e
            for e in c.get("envFrom", []):
                yield f"{where}/{c['name']}/envFrom", e
    for name, ex in (obj.get("deploymentSpec") or {}).get("executors", {}).items():  # kfp IR
        for e in (ex.get("container") or {}).get("env", []):
            yield f"IR/{name}", e


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def b64_forms(secret: str) -> set[str]:
    raw, out = secret.encode(), {secret}
    for offset in range(3):
        text = base64.b64encode(b"\0" * offset + raw).decode()
        out.add(text[-(-offset * 4 // 3):(offset + len(raw)) * 4 // 3])
    return out


def credential_findings(objs: list[Obj], canaries: dict[str, str]) -> list[str]:
    found = []
    for text in (s for obj in objs for s in strings(obj)):
        for what, pattern in CREDENTIAL_LITERALS.items():
            if pattern.search(text):
                found.append(f"{what}: {text[:120]!r}")
        for name, value in canaries.items():
            if any(form in text for form in b64_forms(value)):
                found.append(f"${name} copied into the manifest")
    return found


# --- secrets ---------------------------------------------------------------------------------------


def test_secret_env_vars_come_only_from_secret_references(rendered, launched) -> None:
    checked = 0
    for source, objs in all_sources(rendered, launched).items():
        for obj in objs:
            for where, e in env_entries(obj):
                if "name" not in e:  # envFrom: a whole Secret is fine, a ConfigMap must hold no secret
                    assert "secretRef" in e or "configMapRef" in e, f"{source} {where}: {e}"
                    continue
                if SECRET_ENV_NAME.search(e["name"]):
                    checked += 1
                    assert "value" not in e and set(e.get("valueFrom", {})) == {"secretKeyRef"}, \
                        f"{source} {where}: {e['name']} is not taken from a Secret: {e}"
        if source.startswith("kfp"):  # the steps get them from kfp-kubernetes' secretAsEnv
            platform = objs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            refs = {k["envVar"] for ex in platform.values() for s in ex.get("secretAsEnv", []) for k in s["keyToEnv"]}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= refs, source
            checked += 1
    assert checked >= 10


def test_no_literal_credentials_in_any_manifest(rendered, launched, env_canaries) -> None:
    for source, objs in all_sources(rendered, launched).items():
        assert not credential_findings(objs, env_canaries), source


def test_the_credential_patterns_catch_what_they_are_for(env_canaries) -> None:
    """The scan of the previous test, applied to manifests that do carry credentials."""
    bad = [
        {"env": [{"name": "MLFLOW_TRACKING_URI", "value": "https://admin:hunter22@mlflow.example"}]},
        {"args": ["--key", "AKIAIOSFODNN7EXAMPLE"]},
        {"data": {"key.pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIE..."}},
        {"annotations": {"token": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJlXzEyMw"}},
        {"command": ["sh", "-c", "export PASSWORD=s3cr3t-v4lue && run"]},
        {"value": env_canaries["AWS_SECRET_ACCESS_KEY"]},
        {"value": base64.b64encode(f"user:{env_canaries['KF_PIPELINES_TOKEN']}".encode()).decode()},
    ]
    for obj in bad:
        assert credential_findings([obj], env_canaries), obj


def test_committed_k8s_files_hold_no_credentials(env_canaries) -> None:
    """k8s/: the secret templates carry key names with empty values; filled-in copies are ignored."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "k8s/base/secrets/s3.env.example" in tracked
    assert not [f for f in tracked if f.endswith(".env")], "filled-in credentials are committed"
    for rel in tracked:
        text = (ROOT / rel).read_text()
        if rel.endswith(".env.example"):
            for line in text.splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    assert value == "", f"{rel}: {key} has a value"
        assert not credential_findings([text], {}), rel


@pytest.mark.parametrize("override", [
    "mlflow.tracking_uri=https://admin:{canary}@mlflow.example",
    "storage.endpoint_url=http://minio:{canary}@minio:9000",
    "pipeline.env.AWS_SECRET_ACCESS_KEY={canary}",
    "pipeline.env.MLFLOW_TRACKING_TOKEN={canary}",
])
def test_credentials_in_params_are_refused_for_pods(override: str, capsys, tmp_path) -> None:
    """Params travel to pods as --set arguments and pipeline.env as plain env: a credential there
    would be printed into the manifests, so launch, pipeline compile and deploy refuse it (exit 2,
    naming the key, not showing the value)."""
    from components.deploy.inference_service import ModelRef, build_inference_service

    canary = f"cnry{uuid.uuid4().hex[:16]}"
    setting = override.format(canary=canary)
    key = setting.split("=", 1)[0]
    for argv in (["launch", "--stage", "anchor", "--nodes", "2", "--dry-run"],
                 ["pipeline", "compile", "--output", str(tmp_path / "p.yaml")]):
        assert main(_sets(CLUSTER) + ["-S", setting, *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert f"error: {key}: " in err and canary not in out + err, (argv, err)
    assert not (tmp_path / "p.yaml").exists()
    params = params_from_dict(parse_overrides([setting]))
    with pytest.raises(UserError, match=re.escape(key)) as info:
        build_inference_service(params, ModelRef("m", "1", "s3://b/m", "s3://b/m"), name="x", namespace="y",
                                image="i", canary_percent=None)
    assert canary not in str(info.value)


def test_a_model_stored_behind_a_url_with_credentials_is_not_deployed() -> None:
    """KServe downloads STORAGE_URI as written in the object: a password in it would be readable by
    everyone who can read the InferenceService."""
    from components.deploy.inference_service import ModelRef, build_inference_service

    canary = f"cnry{uuid.uuid4().hex[:16]}"
    uri = f"https://models:{canary}@store.example/dynamicid/7"
    with pytest.raises(UserError, match="a URI with credentials") as info:
        build_inference_service(params_from_dict({}), ModelRef("m", "7", uri, uri), name="x", namespace="y",
                                image="i", canary_percent=None)
    assert canary not in str(info.value) and "https://***@store.example/dynamicid/7" in str(info.value)


def test_pods_get_extra_credentials_by_secret_reference(capsys) -> None:
    """The way that remains for a token a pod needs: a key of the Secret, listed in params."""
    job = _cli_yaml(capsys, _sets({**CLUSTER, "pipeline.s3_optional_keys": "[AWS_ENDPOINT_URL, MLFLOW_TRACKING_TOKEN]"})
                    + ["launch", "--stage", "anchor", "--nodes", "2", "--dry-run"])
    for _, spec in pod_specs(job):
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_TOKEN"] == {"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "dynamicid-s3", "key": "MLFLOW_TRACKING_TOKEN", "optional": True}}}


# --- non-root, read-only root filesystem -----------------------------------------------------------


def _container_checks(where: str, pod: Obj, c: Obj, read_only: bool) -> None:
    sc, pod_sc = c.get("securityContext", {}), pod.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
    assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) not in (0, None), where
    assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged", False), where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
    if read_only:
        assert sc.get("readOnlyRootFilesystem") is True, where


def _writable_paths(pod: Obj, c: Obj) -> list[PurePosixPath]:
    """Mount paths of writable volumes (emptyDir scratch, the data PVC)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return [PurePosixPath(m["mountPath"]) for m in c.get("volumeMounts", [])
            if not m.get("readOnly") and ({"emptyDir", "persistentVolumeClaim"} & set(volumes[m["name"]]))]


def _effective(path: str, env: dict[str, str], workdir: str) -> PurePosixPath:
    """A params path as the pod resolves it: ~ from $HOME, relative paths from the working dir."""
    if path.startswith("~"):
        path = env["HOME"] + path[1:]
    p = PurePosixPath(path)
    return p if p.is_absolute() else PurePosixPath(workdir) / p


def _pod_params(c: Obj, objs: list[Obj]):
    """The params the container's `dynamicid` resolves: its --set arguments, else the ConfigMap."""
    sets = [a.removeprefix("--set=").replace("$$(", "$(") for a in c.get("args", []) if a.startswith("--set=")]
    if sets:
        return params_from_dict(parse_overrides(sets))
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("dynamicid-params")]
    return params_from_dict(yaml.safe_load(cm["data"]["params.yaml"]))


def _read_only_pod_can_write_its_caches(where: str, pod: Obj, c: Obj, objs: list[Obj]) -> None:
    writable = _writable_paths(pod, c)
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp is not an emptyDir"
    env = {e["name"]: e.get("value") for e in c["env"] if "value" in e}
    params = _pod_params(c, objs)
    workdir = c.get("workingDir", "/")
    for what, path in (("HOME", env.get("HOME")), ("XDG_CACHE_HOME", env.get("XDG_CACHE_HOME")),
                       ("storage.cache_dir", params.storage.cache_dir),
                       ("model.sd15.cache_dir", params.model.sd15.cache_dir)):
        assert path, f"{where}: {what} unset"
        resolved = _effective(path, env, workdir)
        assert any(resolved.is_relative_to(w) for w in writable), f"{where}: {what}={resolved} is read-only"


def test_predictor_runs_as_non_root_on_a_read_only_root(rendered) -> None:
    seen = 0
    for source in ("kustomize dev", "kustomize prod", "deploy"):
        objs = rendered[source]
        (isvc,) = [o for o in objs if o["kind"] == "InferenceService"]
        pod = isvc["spec"]["predictor"]
        for c in pod["containers"]:
            where = f"{source} {c['name']}"
            _container_checks(where, pod, c, read_only=True)
            _read_only_pod_can_write_its_caches(where, pod, c, objs)
            seen += 1
        if source == "deploy":
            for version in ks.KUBE_VERSIONS:
                ks.validate(isvc, version)
    assert seen == 3


def test_training_pods_run_as_non_root_on_a_read_only_root(rendered, launched) -> None:
    sources = {s: rendered[s] for s in ("kustomize dev", "kustomize prod")}
    sources.update({f"launch {k}": [v] for k, v in launched.items()})
    seen = 0
    for source, objs in sources.items():
        (job,) = [o for o in objs if o["kind"] == "PyTorchJob"]
        for role, pod in pod_specs(job):
            (c,) = pod["containers"]
            where = f"{source} {role}"
            _container_checks(where, pod, c, read_only=True)
            _read_only_pod_can_write_its_caches(where, pod, c, objs)
            assert pod.get("automountServiceAccountToken") is False, where
            seen += 1
        if source.startswith("launch"):
            for version in ks.KUBE_VERSIONS:
                ks.validate(job, version)
    assert seen == 1 + 2 + 2 + 1  # dev: Master; prod: Master + Worker; launch 2x8: both; launch 1 cpu: Master


def test_images_run_as_the_manifests_non_root_user(rendered) -> None:
    for dockerfile, kind in ((ROOT / "serving" / "Dockerfile", "InferenceService"), (ROOT / "Dockerfile", "PyTorchJob")):
        final = dockerfile.read_text().split("\nFROM ")[-1]
        users = re.findall(r"^USER\s+(\S+)", final, re.M)
        assert users, f"{dockerfile}: the final stage runs as root"
        uid = int(users[-1].split(":")[0])  # numeric, so that the kubelet can check runAsNonRoot
        assert uid != 0
        (obj,) = [o for o in rendered["kustomize prod"] if o["kind"] == kind]
        for _, pod in pod_specs(obj):
            c = pod["containers"][0]
            assert c.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser")) == uid

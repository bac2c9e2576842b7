"""k8s/ and the Dockerfiles: rendered with kustomize, validated strictly (tests/k8s_schema.py),
and held to what k8s/README.md promises: no credentials in the repository, least privilege,
sizes per overlay, and references that resolve (names, keys, ports, uids) across files."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml

from components.core.config import params_from_dict
from tests import k8s_schema as ks

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BUILDS = ("base", "overlays/dev", "overlays/prod")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY|API_KEY", re.I)
CREDENTIALS_IN_URL = re.compile(r"://[^/@\s:]+:[^/@\s]+@")

Obj = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: ks.render(K8S / name) for name in BUILDS}


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """The credentials kustomization, filled from its committed examples (as a user would)."""
    work = tmp_path_factory.mktemp("secrets") / "secrets"
    shutil.copytree(K8S / "base" / "secrets", work)
    for example in work.glob("*.env.example"):
        shutil.copy(example, work / example.name.removesuffix(".example"))
    return ks.render(work)


@pytest.fixture(scope="module")
def prod_canary(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    tree = tmp_path_factory.mktemp("canary") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    overlay = tree / "overlays" / "prod-canary"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../prod]\ncomponents: [../../components/canary]\n"
    )
    return ks.render(overlay)


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_specs(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, pod spec) for every pod an object creates; a predictor spec is a pod spec."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet"):
        yield f"{kind}/{name}", obj["spec"]["template"]["spec"]
    elif kind == "PyTorchJob":
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            yield f"{kind}/{name}/{role}", replica["template"]["spec"]
    elif kind == "InferenceService":
        yield f"{kind}/{name}/predictor", obj["spec"]["predictor"]


def containers(objs: list[Obj]) -> Iterator[tuple[str, Obj, Obj, Obj]]:
    """(where, owning object, pod spec, container) for every container of every pod."""
    for obj in objs:
        for where, spec in pod_specs(obj):
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield f"{where}/{c['name']}", obj, spec, c


def params_of(objs: list[Obj]) -> Obj:
    cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("dynamicid-params")]
    assert len(cms) == 1
    return yaml.safe_load(cms[0]["data"]["params.yaml"])


# --- schema validation ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ks.KUBE_VERSIONS)
@pytest.mark.parametrize("build", BUILDS)
def test_every_object_validates_strictly(rendered: dict[str, list[Obj]], build: str, version: str) -> None:
    objs = rendered[build]
    assert {"PyTorchJob", "InferenceService", "Deployment", "StatefulSet", "Role"} <= {o["kind"] for o in objs}
    for obj in objs:
        try:
            ks.validate(obj, version)
        except jsonschema.ValidationError as err:
            pytest.fail(f"{build}: {obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.absolute_path)}")


def _rename(path: tuple, new: str) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[new] = node.pop(path[-1])
    return apply


def _set(path: tuple, value: Any) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return apply


_MASTER = ("spec", "pytorchReplicaSpecs", "Master")
_WORKER_C0 = ("spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "containers", 0)
_PRED = ("spec", "predictor")
# case -> (kind, mutation, what the error must name)
MISSPELT = {
    "pytorchjob-replica": ("PyTorchJob", _rename(_MASTER + ("replicas",), "replica"), "replica"),
    "pytorchjob-role": ("PyTorchJob", _rename(("spec", "pytorchReplicaSpecs", "Worker"), "Wroker"), "Wroker"),
    "pytorchjob-container": ("PyTorchJob", _rename(_WORKER_C0 + ("volumeMounts",), "volumeMount"), "volumeMount"),
    "pytorchjob-enum": ("PyTorchJob", _set(("spec", "runPolicy", "cleanPodPolicy"), "Nothing"), "Nothing"),
    "pytorchjob-type": ("PyTorchJob", _set(("spec", "nprocPerNode"), 8), "8"),
    "isvc-predictor-field": ("InferenceService", _rename(_PRED + ("minReplicas",), "minReplica"), "minReplica"),
    "isvc-spec-field": ("InferenceService", _rename(_PRED, "predicter"), "predicter"),
    "isvc-container": ("InferenceService", _rename(
        _PRED + ("containers", 0, "securityContext", "readOnlyRootFilesystem"), "readOnlyRootFileSystem"),
        "readOnlyRootFileSystem"),
    "isvc-enum": ("InferenceService", _set(_PRED + ("scaleMetric",), "concurency"), "concurency"),
    "deployment": ("Deployment", _rename(("spec", "template", "spec", "containers", 0, "env"), "envs"), "envs"),
    "statefulset": ("StatefulSet", _rename(("spec", "volumeClaimTemplates"), "volumeClaimTemplate"),
                    "volumeClaimTemplate"),
    "pvc": ("PersistentVolumeClaim", _rename(("spec", "accessModes"), "accessMode"), "accessMode"),
    "role": ("Role", _rename(("rules", 0, "verbs"), "verb"), "verb"),
}


@pytest.mark.parametrize("case", sorted(MISSPELT))
def test_a_misspelt_field_is_rejected(rendered: dict[str, list[Obj]], case: str) -> None:
    kind, mutate, culprit = MISSPELT[case]
    original = find(rendered["overlays/prod"], kind)
    bad = copy.deepcopy(original)
    mutate(bad)
    for version in ks.KUBE_VERSIONS:
        ks.validate(original, version)
        with pytest.raises(jsonschema.ValidationError) as err:
            ks.validate(bad, version)
        assert culprit in err.value.message, err.value.message


def test_a_field_newer_than_the_oldest_supported_cluster_is_rejected(rendered: dict[str, list[Obj]]) -> None:
    """Embedded Kubernetes types follow the cluster version, inside custom resources too."""
    job = copy.deepcopy(find(rendered["overlays/prod"], "PyTorchJob"))
    # Pod-level resources exist from Kubernetes 1.32 on.
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["resources"] = {"limits": {"cpu": "1"}}
    ks.validate(job, ks.KUBE_VERSIONS[-1])
    with pytest.raises(jsonschema.ValidationError):
        ks.validate(job, ks.MIN_KUBE_VERSION)


# --- credentials -----------------------------------------------------------------------------


def test_secret_templates_carry_keys_but_no_values(secrets: list[Obj]) -> None:
    assert sorted(o["metadata"]["name"] for o in secrets) == ["dynamicid-postgres", "dynamicid-s3"]
    for obj in secrets:
        assert obj["kind"] == "Secret" and obj["metadata"]["namespace"] == "dynamicid"
        assert obj["data"], "the template must name the keys the workloads reference"
        assert all(base64.b64decode(v) == b"" for v in obj["data"].values()), obj["metadata"]["name"]
        assert "stringData" not in obj
        for version in ks.KUBE_VERSIONS:
            ks.validate(obj, version)
    s3 = find(secrets, "Secret", "dynamicid-s3")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(s3["data"])
    assert "serving.kserve.io/s3-endpoint" in s3["metadata"]["annotations"]


def test_filled_in_secret_files_are_ignored_by_git() -> None:
    for name in ("s3.env", "postgres.env"):
        path = f"k8s/base/secrets/{name}"
        assert subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT).returncode == 0, path
    assert subprocess.run(["git", "check-ignore", "--no-index", "-q", "k8s/base/secrets/s3.env.example"],
                          cwd=ROOT).returncode == 1


def test_workloads_take_credentials_only_by_secret_reference(
    rendered: dict[str, list[Obj]], secrets: list[Obj]
) -> None:
    secret_keys = {o["metadata"]["name"]: set(o["data"]) for o in secrets}
    for build, objs in rendered.items():
        for obj in objs:
            assert obj["kind"] != "Secret", f"{build}: Secrets belong in k8s/base/secrets only"
            for literal in _strings(obj):
                assert not CREDENTIALS_IN_URL.search(literal), f"{build}: credentials in a URL: {literal}"
        seen_refs = 0
        for where, _, _, c in containers(objs):
            assert not any("secretRef" in e for e in c.get("envFrom", [])), f"{where}: envFrom secretRef"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if SECRET_NAME.search(env["name"]):
                    assert ref is not None and "value" not in env, f"{build} {where}: {env['name']} not from a Secret"
                if ref is not None:
                    seen_refs += 1
                    assert ref["key"] in secret_keys.get(ref["name"], set()), f"{where}: {ref} not in the templates"
        assert seen_refs >= 6, build


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_every_pod_reference_resolves_in_the_same_build(rendered: dict[str, list[Obj]]) -> None:
    """Generated names carry a content hash; a reference kustomize failed to rewrite dangles."""
    for build, objs in rendered.items():
        names = {(o["kind"], o["metadata"]["name"]) for o in objs}
        for obj in objs:
            for where, spec in pod_specs(obj):
                if "serviceAccountName" in spec:
                    assert ("ServiceAccount", spec["serviceAccountName"]) in names, f"{build} {where}"
                for volume in spec.get("volumes", []):
                    if "configMap" in volume:
                        assert ("ConfigMap", volume["configMap"]["name"]) in names, f"{build} {where}"
                    if "persistentVolumeClaim" in volume:
                        claim = volume["persistentVolumeClaim"]["claimName"]
                        assert ("PersistentVolumeClaim", claim) in names, f"{build} {where}"


# --- security context --------------------------------------------------------------------------


def test_every_container_runs_non_root_without_privileges(rendered: dict[str, list[Obj]]) -> None:
    """The "restricted" Pod Security profile, which the namespace reports on."""
    for build, objs in rendered.items():
        labels = find(objs, "Namespace", "dynamicid")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/warn"] == "restricted"
        assert labels["pod-security.kubernetes.io/enforce"] in ("baseline", "restricted")
        for where, obj, pod, c in containers(objs):
            sc = c.get("securityContext", {})
            pod_sc = pod.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{build} {where}"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, f"{build} {where}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{build} {where}"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{build} {where}"
            assert not sc.get("privileged", False)
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{build} {where}"
            declared = {v["name"] for v in pod.get("volumes", [])}
            declared |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            assert {m["name"] for m in c.get("volumeMounts", [])} <= declared, f"{build} {where}"


def test_predictor_has_a_read_only_root_and_writable_scratch(rendered: dict[str, list[Obj]]) -> None:
    for build, objs in rendered.items():
        predictor = find(objs, "InferenceService", "dynamicid")["spec"]["predictor"]
        (c,) = predictor["containers"]
        assert c["name"] == "kserve-container"  # the only name KServe injects the model into
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in predictor["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp"] and mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e.get("value") for e in c["env"]}
        for var in ("HOME", "XDG_CACHE_HOME"):
            assert Path(env[var]).is_relative_to("/tmp"), var
        assert env["STORAGE_URI"].startswith("s3://")
        assert c["args"][c["args"].index("--model-uri") + 1] == "/mnt/models"


# --- serving, training, tracking ---------------------------------------------------------------


def test_predictor_probes_scaling_and_credentials(rendered: dict[str, list[Obj]]) -> None:
    for build, objs in rendered.items():
        predictor = find(objs, "InferenceService")["spec"]["predictor"]
        c = predictor["containers"][0]
        (port,) = [p["containerPort"] for p in c["ports"]]
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
        assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
        assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
        serve = params_from_dict(params_of(objs)).serve
        assert (serve.host, serve.http_port) == ("0.0.0.0", port)
        assert predictor["containerConcurrency"] == serve.max_queue
        sa = find(objs, "ServiceAccount", predictor["serviceAccountName"])
        assert sa["secrets"] == [{"name": "dynamicid-s3"}] and sa["automountServiceAccountToken"] is False
        assert "canaryTrafficPercent" not in predictor
    prod = find(rendered["overlays/prod"], "InferenceService")["spec"]["predictor"]
    assert prod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert prod["nodeSelector"] and prod["tolerations"] and prod["maxReplicas"] > prod["minReplicas"] >= 2


def test_canary_component_sets_a_traffic_split(prod_canary: list[Obj]) -> None:
    isvc = find(prod_canary, "InferenceService")
    for version in ks.KUBE_VERSIONS:
        ks.validate(isvc, version)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10


def _trainer(job: Obj, role: str) -> tuple[Obj, Obj]:
    spec = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
    (c,) = spec["containers"]
    return spec, c


def test_training_launches_the_cli_under_torchrun(rendered: dict[str, list[Obj]]) -> None:
    operator_env = {"PET_NNODES", "PET_NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT"}
    for build, objs in rendered.items():
        job = find(objs, "PyTorchJob", "dynamicid-anchor")
        for role in job["spec"]["pytorchReplicaSpecs"]:
            spec, c = _trainer(job, role)
            assert c["name"] == "pytorch" and c["command"] == ["torchrun"]
            assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"pytorchjob-port": 23456}
            args = c["args"]
            cli = args[args.index("dynamicid") + 1:]
            assert cli == ["train", "--stage=anchor", "--resume"], build
            assert {"--rdzv_backend=c10d", "--no-python", "--nnodes=$(PET_NNODES)",
                    "--nproc_per_node=$(PET_NPROC_PER_NODE)"} <= set(args)
            env = {e["name"]: e for e in c["env"]}
            referenced = set(re.findall(r"\$\((\w+)\)", " ".join(args)))
            assert referenced <= operator_env | set(env), referenced - operator_env - set(env)
            assert env["NCCL_DEBUG"]["value"] == "WARN" and env["NCCL_SOCKET_IFNAME"]["value"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
            claim = mounts["/data"]["persistentVolumeClaim"]["claimName"]
            find(objs, "PersistentVolumeClaim", claim)
            assert c["workingDir"] == "/data"
            cm = mounts[str(Path(env["DYNAMICID_PARAMS"]["value"]).parent)]["configMap"]["name"]
            assert "params.yaml" in find(objs, "ConfigMap", cm)["data"]


def test_prod_trains_on_two_nodes_of_eight_gpus(rendered: dict[str, list[Obj]]) -> None:
    job = find(rendered["overlays/prod"], "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 1}
    for role in replicas:
        spec, c = _trainer(job, role)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 == int(job["spec"]["nprocPerNode"]), role
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), role
    pvc = find(rendered["overlays/prod"], "PersistentVolumeClaim", "dynamicid-data")["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"] and pvc["resources"]["requests"]["storage"] == "2Ti"
    assert params_from_dict(params_of(rendered["overlays/prod"])).model.profile == "sd15"


def test_dev_is_one_cpu_node_on_the_tiny_profile(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/dev"]
    job = find(objs, "PyTorchJob")
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1 and job["spec"]["nprocPerNode"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(objs)
    _, c = _trainer(job, "Master")
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
    assert find(objs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert params_from_dict(params_of(objs)).model.profile == "tiny"
    assert find(objs, "InferenceService")["spec"]["predictor"]["maxReplicas"] == 1


def test_mlflow_uses_postgres_and_proxies_s3_artifacts(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/prod"]
    (c,) = find(objs, "Deployment", "dynamicid-mlflow")["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    backend = re.fullmatch(r"postgresql://(\w+)@([\w-]+):(\d+)/(\w+)", args["backend-store-uri"])
    assert backend, "no password in the URI: it comes from PGPASSWORD"
    assert args["artifacts-destination"].startswith("s3://") and "--serve-artifacts" in c["args"]
    pg_service = find(objs, "Service", backend[2])
    assert int(backend[3]) in {p["port"] for p in pg_service["spec"]["ports"]}
    # Only the MLflow pods may open connections to the database.
    policy = find(objs, "NetworkPolicy", "dynamicid-postgres")["spec"]
    assert policy["podSelector"]["matchLabels"] == pg_service["spec"]["selector"]
    mlflow_labels = find(objs, "Deployment", "dynamicid-mlflow")["spec"]["template"]["metadata"]["labels"]
    assert [src["podSelector"]["matchLabels"] for rule in policy["ingress"] for src in rule["from"]] == [mlflow_labels]
    (pg,) = find(objs, "StatefulSet", "dynamicid-postgres")["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in pg["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == backend[1] and pg_env["POSTGRES_DB"]["value"] == backend[4]
    mlflow_env = {e["name"]: e for e in c["env"]}
    assert mlflow_env["PGPASSWORD"]["valueFrom"] == pg_env["POSTGRES_PASSWORD"]["valueFrom"]
    # The trainers' tracking URI names this server's Service and port.
    _, trainer = _trainer(find(objs, "PyTorchJob"), "Master")
    uri = next(e["value"] for e in trainer["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
    assert int(port) in {p["port"] for p in find(objs, "Service", host)["spec"]["ports"]}


def _allowed(role: Obj, verb: str, group: str, resource: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])


def test_pipeline_account_drives_jobs_and_services_and_nothing_else(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/prod"]
    binding = find(objs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dynamicid-pipeline", "namespace": "dynamicid"}]
    find(objs, "ServiceAccount", "dynamicid-pipeline")
    role = find(objs, "Role", binding["roleRef"]["name"])
    for verb in ("create", "get", "watch", "delete"):
        assert _allowed(role, verb, "kubeflow.org", "pytorchjobs"), verb
        assert _allowed(role, verb, "serving.kserve.io", "inferenceservices"), verb
    for resource in ("pods", "pods/log"):
        assert _allowed(role, "get", "", resource) and _allowed(role, "watch", "", resource)
    assert not _allowed(role, "get", "", "secrets") and not _allowed(role, "create", "", "pods")
    assert not any("*" in r["verbs"] + r["resources"] + r["apiGroups"] for r in role["rules"])


# --- images --------------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[list[tuple[str, str]]]:
    """Stages as lists of (INSTRUCTION, arguments), comments dropped, lines joined, and the ARG
    defaults declared before the first FROM substituted into FROM."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages: list[list[tuple[str, str]]] = [[]]
    global_args: dict[str, str] = {}
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], rest)
            stages.append([])
        elif instr == "ARG" and len(stages) == 1:
            name, _, default = rest.partition("=")
            global_args[name] = default
        stages[-1].append((instr, rest.strip()))
    return stages[1:]


def _one(instructions: list[tuple[str, str]], name: str) -> str:
    (value,) = [rest for instr, rest in instructions if instr == name]
    return value


def _uid(user: str) -> int:
    return int(user.split(":")[0])


def test_predictor_image_matches_the_inference_service(rendered: dict[str, list[Obj]]) -> None:
    stages = dockerfile(ROOT / "serving" / "Dockerfile")
    image = stages[-1]
    assert _one(image, "FROM") == "python:3.11-slim"
    assert json.loads(_one(image, "CMD")) == ["dynamicid", "serve", "--model-uri", "/mnt/models"]
    runs = " ".join(rest for stage in stages for instr, rest in stage if instr == "RUN")
    installs = re.findall(r'"/src\[([^\]]*)\]"', runs)
    assert installs == ["serve"] and "deepspeed" not in runs.lower()
    env = dict(re.findall(r"(\w+)=(\S+)", _one(image, "ENV")))
    assert all(Path(env[v]).is_relative_to("/tmp") for v in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME"))
    predictor = find(rendered["overlays/prod"], "InferenceService")["spec"]["predictor"]
    c = predictor["containers"][0]
    assert int(_one(image, "EXPOSE")) == c["ports"][0]["containerPort"]
    assert _uid(_one(image, "USER")) == c["securityContext"]["runAsUser"] == 1000


def test_project_image_is_non_root_with_the_cli_as_entrypoint(rendered: dict[str, list[Obj]]) -> None:
    image = dockerfile(ROOT / "Dockerfile")[-1]
    assert _one(image, "FROM") == "python:3.11-slim"
    assert json.loads(_one(image, "ENTRYPOINT")) == ["dynamicid"]
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG EXTRAS=train,serve,pipeline" in text and '"/src[${EXTRAS}]"' in text
    assert re.search(r"ARG TORCH_BACKEND=\S+", text) and '--torch-backend "${TORCH_BACKEND}"' in text
    uid = _uid(_one(image, "USER"))
    assert uid != 0
    objs = rendered["overlays/prod"]
    pods = [spec for obj in objs for _, spec in pod_specs(obj) if obj["kind"] in ("PyTorchJob", "Deployment")]
    for spec in pods:
        if spec["containers"][0]["image"].startswith("ghcr.io/dynamicid/dynamicid:"):
            assert spec["securityContext"]["runAsUser"] == uid


def test_build_context_is_an_allow_list_of_the_packaged_sources() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "deny everything first, so data and credentials never reach the daemon"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    hatch = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]
    wheel = hatch["build"]["targets"]["wheel"]
    packages = set(wheel["packages"]) | set(wheel.get("force-include", {}))
    assert allowed == packages | {"pyproject.toml", "README.md"}
    for path in (ROOT / "Dockerfile", ROOT / "serving" / "Dockerfile"):
        copied = {src for line in re.findall(r"^COPY (?!--from)(.+)$", path.read_text(), re.M)
                  for src in line.split()[:-1]}
        assert copied <= allowed, f"{path.name} copies files the build context leaves out: {copied - allowed}"


def test_images_are_pinned_per_overlay(rendered: dict[str, list[Obj]]) -> None:
    for build, tag in (("overlays/dev", "dev"), ("overlays/prod", "0.1.0")):
        own = {c["image"] for _, _, _, c in containers(rendered[build]) if c["image"].startswith("ghcr.io/dynamicid/")}
        assert own == {f"ghcr.io/dynamicid/dynamicid:{tag}", f"ghcr.io/dynamicid/dynamicid-predictor:{tag}"}

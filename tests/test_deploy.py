"""deploy/ validated offline: built-in kinds with kubernetes-validate, Dask kinds against the
CRD schemas that dask-kubernetes ships, pod specs as Pods, kustomize overlays applied, the
commands in the manifests checked against the CLIs, and the Dockerfiles' conventions."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
dask_kubernetes = pytest.importorskip("dask_kubernetes")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
CRDS = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
KUBERNETES_VERSION = "1.30"


def crd_schemas() -> dict:
    schemas = {}
    for file in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(file.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


SCHEMAS = crd_schemas()


def manifests():
    """Every resource document under deploy/k8s except kustomizations and patches."""
    out = []
    for file in sorted(K8S.rglob("*.yaml")):
        if file.name == "kustomization.yaml" or "overlays" in file.parts:
            continue
        for doc in yaml.safe_load_all(file.read_text()):
            out.append((file.relative_to(DEPLOY), doc))
    return out


def pod_specs(doc):
    """(role, PodSpec) pairs inside a Dask resource (none for built-in kinds)."""
    if doc["kind"] not in ("DaskCluster", "DaskWorkerGroup", "DaskJob"):
        return []
    spec = doc["spec"]
    if doc["kind"] == "DaskCluster":
        return [("scheduler", spec["scheduler"]["spec"]), ("worker", spec["worker"]["spec"])]
    if doc["kind"] == "DaskWorkerGroup":
        return [("worker", spec["worker"]["spec"])]
    if doc["kind"] == "DaskJob":
        return [("job", spec["job"]["spec"])] + pod_specs(
            {"kind": "DaskCluster", "spec": spec["cluster"]["spec"]})
    return []


def validate(doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in SCHEMAS:
        jsonschema.validate(doc, SCHEMAS[key])
        for role, spec in pod_specs(doc):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"check-{role}"},
                   "spec": spec}
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


MANIFESTS = manifests()


def test_the_expected_resources_are_there():
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == ["DaskCluster", "DaskJob", "DaskWorkerGroup", "Secret", "ServiceAccount"]
    assert {("kubernetes.dask.org/v1", "DaskJob"), ("kubernetes.dask.org/v1", "DaskCluster"),
            ("kubernetes.dask.org/v1", "DaskWorkerGroup")} <= set(SCHEMAS)


@pytest.mark.parametrize("path, doc", MANIFESTS, ids=[f"{p}:{d['kind']}" for p, d in MANIFESTS])
def test_manifest_validates(path, doc):
    validate(doc)


def test_validation_catches_mistakes():
    job = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "DaskJob"))
    del job["spec"]["cluster"]
    with pytest.raises(jsonschema.ValidationError):
        validate(job)
    group = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "DaskWorkerGroup"))
    group["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["8"]
    with pytest.raises(jsonschema.ValidationError):
        validate(group)
    # a misspelt pod field passes the CRD (pod specs are open there) but not the Pod schema
    cluster = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "DaskCluster"))
    cluster["spec"]["worker"]["spec"]["containers"][0]["comand"] = ["dask", "worker"]
    jsonschema.validate(cluster, SCHEMAS[("kubernetes.dask.org/v1", "DaskCluster")])
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(cluster)


def test_gpu_workers_declare_the_gpu_to_kubernetes_and_dask():
    group = next(d for _, d in MANIFESTS if d["kind"] == "DaskWorkerGroup")
    container = group["spec"]["worker"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    command = container["command"]
    assert command[command.index("--resources") + 1] == "GPU=1"
    assert group["spec"]["cluster"] == next(d for _, d in MANIFESTS
                                            if d["kind"] == "DaskCluster")["metadata"]["name"]


def _merge(base, patch):
    """Strategic merge of the subset kustomize patches use here (lists merge by name)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(x, dict) and "name" in x for x in base + patch):
        by_name = {x["name"]: x for x in base}
        return [_merge(by_name[x["name"]], x) if x["name"] in by_name else x for x in patch] + [
            x for x in base if x["name"] not in {p["name"] for p in patch}]
    return patch


def build(folder: Path):
    """Resources of a kustomization after its patches (a small kustomize build)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        assert target.exists(), f"{folder}: {entry} does not exist"
        docs += build(target) if target.is_dir() else list(yaml.safe_load_all(target.read_text()))
    for patch in spec.get("patches", []):
        body = yaml.safe_load((folder / patch["path"]).read_text())
        matched = [i for i, d in enumerate(docs) if d["kind"] == patch["target"]["kind"]
                   and d["metadata"]["name"] == patch["target"]["name"]]
        assert matched, f"{folder}: patch {patch['path']} matches nothing"
        for i in matched:
            docs[i] = _merge(docs[i], body)
    return docs


@pytest.mark.parametrize("folder", ["cluster", "job", "overlays/small", "overlays/large"])
def test_kustomizations_build_and_validate(folder):
    docs = build(K8S / folder)
    assert docs
    for doc in docs:
        validate(doc)
    if folder.startswith("overlays"):
        job = next(d for d in docs if d["kind"] == "DaskJob")
        replicas = job["spec"]["cluster"]["spec"]["worker"]["replicas"]
        assert replicas == {"overlays/small": 2, "overlays/large": 16}[folder]


def _memory_bytes(text):
    number, unit = re.fullmatch(r"(\d+)(GiB|Gi)", text).groups()
    return int(number) * 2**30


@pytest.mark.parametrize("folder", ["cluster", "job", "overlays/small", "overlays/large"])
def test_worker_memory_limits_fit_their_pods(folder):
    for doc in build(K8S / folder):
        for role, spec in pod_specs(doc):
            for container in spec["containers"]:
                command = container.get("command", [])
                if "--memory-limit" in command:
                    dask_limit = _memory_bytes(command[command.index("--memory-limit") + 1])
                    pod_limit = _memory_bytes(container["resources"]["limits"]["memory"])
                    assert dask_limit < pod_limit, f"{folder} {role}: Dask limit >= pod limit"
                if "--nthreads" in command and "--resources" not in command:  # CPU workers
                    threads = int(command[command.index("--nthreads") + 1])
                    cpus = int(container["resources"]["limits"]["cpu"])
                    assert threads == cpus, f"{folder} {role}: {threads} threads on {cpus} CPUs"


def test_job_commands_exist_in_the_cli():
    from dflashdeconv.cli import build_parser

    parser = build_parser()
    for _, doc in MANIFESTS:
        for _, spec in pod_specs(doc):
            for container in spec["containers"]:
                if "args" in container:  # the image's entry point is `dflashdeconv`
                    args = parser.parse_args(container["args"])
                    assert args.command == "deconvolve" and args.resume
                command = container.get("command")
                if command:
                    assert command[:2] in (["dask", "worker"], ["dask", "scheduler"])
                    if command[1] == "worker":  # codec and kernel threads per worker
                        preload = command.index("--preload")
                        assert command[preload + 1] == "dflashdeconv.engine.worker_setup"
                    option_names = {a for a in command if a.startswith("--")}
                    help_text = subprocess.run(
                        [str(Path(sys.executable).with_name("dask")), command[1], "--help"],
                        capture_output=True, text=True, check=True).stdout
                    for option in option_names:
                        assert option in help_text, f"dask {command[1]} has no {option}"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pin_the_base_run_as_non_root_and_enter_the_cli(name):
    text = (DEPLOY / "docker" / name).read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest") and re.search(r":\d+\.\d+", base)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT (\[.*\])", text, re.M).group(1)
    assert "dflashdeconv" in entry
    assert "torch==2.13.0" in text or "-c constraints-cpu.txt" in text  # the pinned torch
    assert "pip install --user" not in text  # installs into the image, not a home folder
    # the worker environment connect() gives its LocalCluster's workers, for `dask worker`
    from dflashdeconv.engine.cluster import WORKER_ENVIRON, WORKER_PRE_SPAWN_ENVIRON

    for key, value in {**WORKER_ENVIRON, **WORKER_PRE_SPAWN_ENVIRON}.items():
        assert re.search(rf"^\s+{key}={value}\b", text, re.M), f"{name} does not set {key}={value}"


def test_kube_cluster_spec_is_a_valid_daskcluster():
    from dflashdeconv.engine.cluster import kube_cluster_spec

    spec = kube_cluster_spec("atlas", "ghcr.io/dflashdeconv/dflashdeconv:0.1.0-cpu", n_workers=8,
                             worker_memory="16Gi", worker_cpu="4",
                             secret="dflashdeconv-object-store")
    validate(spec)
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    assert spec["spec"]["worker"]["replicas"] == 8
    assert worker["args"][worker["args"].index("--memory-limit") + 1] == "16GiB"
    preload = worker["args"].index("--preload")
    assert worker["args"][preload + 1] == "dflashdeconv.engine.worker_setup"
    assert worker["envFrom"] == [{"secretRef": {"name": "dflashdeconv-object-store"}}]

"""Offline validation of infra/: the Ray cluster launcher config, the KubeRay manifests, the MLflow server.

Everything runs for real: Ray's own autoscaler validation and packaging code, kustomize (kubectl's built-in
copy), systemd's unit verifier, shells that expand the RayJob entrypoints, and `infra/mlflow/serve.sh`
serving the MLflow REST API and UI with its artifacts in a local S3 (moto) bucket.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port

INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
K8S = INFRA / "k8s"
SERVE_SH = INFRA / "mlflow" / "serve.sh"
UNIT = INFRA / "mlflow" / "ldm-mlflow.service"
REMOTE_REPO = "/home/ubuntu/ldm"  # where cluster.yaml mounts this checkout on every node
IMAGE_WORKDIR = "/app"  # where infra/docker/Dockerfile puts it in the image


def project_pins() -> dict[str, str]:
    """`name==version` pins of pyproject.toml's dependencies, by name (extras dropped)."""
    pins = re.findall(r'"([\w-]+)(?:\[[\w,]+\])?==([\w.]+)"', (REPO / "pyproject.toml").read_text())
    return dict(pins)


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_manifests() -> dict[Path, list[dict]]:
    """Every Kubernetes object file under infra/k8s (kustomization files excluded)."""
    return {p: k8s_docs(p) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"}


def objects_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, docs in k8s_manifests().items() for d in docs if d["kind"] == kind]


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs inside a Deployment, RayCluster or RayJob (none for other kinds)."""
    if obj["kind"] not in ("Deployment", "RayCluster", "RayJob"):
        return []
    spec = obj["spec"]
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if obj["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def text_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]


def repo_paths_named_in(text: str) -> set[str]:
    """Repository paths a document names: pipelines/*.py, configs/*.yaml, infra/... files."""
    found = set(re.findall(r"(?<![\w/.-])((?:pipelines|configs)/[\w./-]+\.(?:py|ya?ml))", text))
    found |= set(re.findall(r"(?<![\w/.-])(infra/[\w./-]+\.(?:py|sh|ya?ml|json|service))", text))
    return found


# --------------------------------------------------------------------------------------------------------
# Ray cluster launcher config (AWS)
# --------------------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster()
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises on any schema or consistency error

    # The validator is strict (a misspelt top-level key fails), so passing it means something.
    broken = copy.deepcopy(raw)
    broken["availabe_node_types"] = broken.pop("available_node_types")
    with pytest.raises(Exception, match="availabe_node_types"):
        validate_config(prepare_config(broken))


def test_cluster_node_types_cpu_head_autoscaling_spot_gpu_and_cpu_workers():
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(load_cluster())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "training and data tasks must stay off the head"
    assert "InstanceMarketOptions" not in head["node_config"], "the head runs on demand"

    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert gpu and cpu, "need a GPU worker type (training, encoding) and a CPU one (Ray Data decoding)"
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] > 0, "worker types autoscale from zero"
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert sum(t["max_workers"] for t in workers.values()) >= cfg["max_workers"] > 0

    # One AMI everywhere: Ray needs the same Python on every node.
    assert len({t["node_config"]["ImageId"] for t in types.values()}) == 1


def test_cluster_setup_installs_this_project_with_the_pinned_torch():
    cfg = load_cluster()
    assert cfg["file_mounts"] == {REMOTE_REPO: "."}
    assert ".venv" in cfg["rsync_exclude"] and ".git" in cfg["rsync_exclude"]
    setup = "\n".join(cfg["setup_commands"])
    assert f"pip install -q -e {REMOTE_REPO}" in setup

    pins = project_pins()
    for name in ("torch", "torchvision"):
        assert f"{name}=={pins[name]}" in setup, f"cluster nodes must install {name}=={pins[name]} like the Makefile"

    # The region the nodes' AWS clients use is the region the cluster runs in.
    assert f"export AWS_DEFAULT_REGION={cfg['provider']['region']}" in setup


def test_cluster_scripts_and_files_it_names_exist_in_the_repo():
    text = CLUSTER_YAML.read_text() + UNIT.read_text()
    remote = set(re.findall(rf"{REMOTE_REPO}/([\w./-]+\.(?:py|sh|service))", text))
    assert {"infra/aws/fetch_secret.py", "infra/aws/head_setup.sh", "infra/mlflow/serve.sh"} <= remote
    for rel in remote:
        path = REPO / rel
        assert path.is_file(), f"{rel} is run on the cluster but missing from the repo"
        if path.suffix == ".sh":
            assert path.stat().st_mode & stat.S_IXUSR, f"{rel} must be executable"
            subprocess.run(["bash", "-n", str(path)], check=True)


def test_cluster_secure_defaults():
    from ray.autoscaler._private.aws.config import _configure_security_group
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(load_cluster())
    assert cfg["provider"]["use_internal_ips"] is True

    # Every node type names its security group, so Ray never creates its default group (SSH from
    # 0.0.0.0/0). Ray's own code returns without calling AWS; with a missing group it would try to.
    for node_type in cfg["available_node_types"].values():
        node_config = node_type["node_config"]
        assert node_config["SecurityGroupIds"]
        assert node_config["MetadataOptions"]["HttpTokens"] == "required"
        assert all(b["Ebs"]["Encrypted"] for b in node_config["BlockDeviceMappings"])
        assert "IamInstanceProfile" in node_config, "AWS access through instance profiles, not keys"
    before = copy.deepcopy(cfg["available_node_types"])
    _configure_security_group(cfg)
    assert cfg["available_node_types"] == before

    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    setup = " ".join(cfg["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup
    assert re.search(r"fetch_secret\.py \S+ ~/\.ray/auth_token", setup), "token from Secrets Manager"
    # Job drivers and workers find the tracking server through the environment of `ray start`.
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:" in " ".join(cfg["worker_start_ray_commands"])
    assert "/etc/ldm/head.env" in head_start


def test_runtime_env_ships_the_code_not_the_environment(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(INFRA / "runtime_env.yaml"))  # what `ray job submit` reads
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."

    # Package the checkout exactly as `ray job submit --runtime-env infra/runtime_env.yaml` from the repo
    # root does (Ray honours .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
    pkg = tmp_path / "working_dir.zip"
    create_package(str(REPO), pkg, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    assert "pipelines/runtime.py" in names and "ldm_core/config.py" in names
    heavy = [n for n in names if n.split("/")[0] in {".venv", ".git", "outputs", "mlruns", "mlartifacts"}]
    assert not heavy, heavy[:5]
    assert pkg.stat().st_size < 20 * 2**20


# --------------------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------------------


def test_k8s_manifests_parse_with_the_fields_kuberay_requires():
    manifests = k8s_manifests()
    assert manifests
    for path, docs in manifests.items():
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), path
            assert d["metadata"].get("name"), path

    clusters = objects_of_kind("RayCluster")
    jobs = objects_of_kind("RayJob")
    assert len(clusters) == 1 and len(jobs) >= 2
    for path, obj in clusters + jobs:
        assert obj["apiVersion"] == "ray.io/v1", path
        spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        assert spec["enableInTreeAutoscaling"] is True, path
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), path
        assert head["template"]["spec"]["containers"][0]["image"], path
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        for name, g in groups.items():
            assert isinstance(g["rayStartParams"], dict), (path, name)
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (path, name)
            assert g["template"]["spec"]["containers"][0]["image"], (path, name)
        limits = {name: g["template"]["spec"]["containers"][0]["resources"]["limits"] for name, g in groups.items()}
        gpu = [g for name, g in groups.items() if "nvidia.com/gpu" in limits[name]]
        assert gpu and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu), path
        assert len(gpu) < len(groups), f"{path}: also needs a CPU group for Ray Data decoding"
        assert spec["rayVersion"] == project_pins()["ray"], path

    for path, job in jobs:
        assert job["spec"]["entrypoint"].strip(), path
        assert job["spec"]["shutdownAfterJobFinishes"] is True, path


def test_rayjobs_run_on_the_same_cluster_spec_as_the_raycluster():
    ((_, cluster),) = objects_of_kind("RayCluster")
    for path, job in objects_of_kind("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{path} drifted from raycluster.yaml"


def expand_entrypoint(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The argv the job's python gets, through the same shells KubeRay and Ray put it through.

    1. KubeRay's submitter pod runs `... ray job submit ... -- <entrypoint> ...` in a shell, without the
       pipeline's settings in its environment: expand the entrypoint there.
    2. `ray job submit` re-joins its arguments with shlex.join; Ray's job supervisor runs that string with
       a shell on the head, whose environment has the settings (envFrom ldm-settings).
    """
    print0 = "printf '%s\\0'"
    clean = {"PATH": os.environ["PATH"]}
    submitted = subprocess.run(["sh", "-c", f"{print0} {entrypoint}"], env=clean, capture_output=True, check=True)
    argv = submitted.stdout.decode().split("\0")[:-1]
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv
    on_head = shlex.split(shlex.join(argv))
    prefix = f"cd {IMAGE_WORKDIR} && exec "
    assert on_head[2].startswith(prefix), on_head[2]
    command = on_head[2][len(prefix) :]
    expanded = subprocess.run(
        ["bash", "-c", f"{print0} {command}"], env={**clean, **env}, capture_output=True, check=True
    )
    return expanded.stdout.decode().split("\0")[:-1]


def test_rayjob_entrypoints_run_existing_scripts_and_configs_with_settings_from_the_configmap():
    settings = {d["metadata"]["name"]: d["data"] for _, d in objects_of_kind("ConfigMap")}["ldm-settings"]
    env = {k: f"s3://bucket-{uuid.uuid4().hex[:6]}/{k.lower()}" for k in settings if k.startswith("LDM_")}
    scripts = set()
    for path, job in objects_of_kind("RayJob"):
        argv = expand_entrypoint(job["spec"]["entrypoint"], env)
        assert argv[0] == "python", argv
        script, args = argv[1], argv[2:]
        scripts.add(script)
        assert (REPO / script).is_file(), f"{path}: {script} does not exist in the repo"
        config = args[args.index("--config") + 1]
        assert (REPO / config).is_file(), f"{path}: {config} does not exist in the repo"
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        # The pipeline's own loader accepts the file and every override (unknown keys raise).
        from pipelines.config import load_config

        cfg = load_config(REPO / config, sets)
        assert cfg.data.uri == env["LDM_DATA_URI"]
        assert cfg.run.output_uri == env["LDM_OUTPUT_URI"]
        assert cfg.run.storage_path == env["LDM_CHECKPOINT_URI"]
        assert cfg.stage_a.scaling.use_gpu is True
    assert {"pipelines/run.py", "pipelines/stage_a.py"} <= scripts

    # The image the entrypoints `cd` into holds the code and configs they name.
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_WORKDIR}" in dockerfile
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", dockerfile, flags=re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which does not exist"
    assert {"configs", "pipelines", "infra"} <= set(re.findall(r"^COPY (?:--chown=\S+ )?(\w+) ", dockerfile, re.M))
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_kustomizations_name_existing_resources():
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 4
    for k in kustomizations:
        doc = yaml.safe_load(k.read_text())
        for entry in doc.get("resources", []) + doc.get("components", []):
            assert (k.parent / entry).exists(), f"{k}: {entry} does not exist"
        for entry in doc.get("components", []):
            component = yaml.safe_load((k.parent / entry / "kustomization.yaml").read_text())
            assert component["kind"] == "Component"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_builds_and_puts_the_project_image_in_every_container():
    image = yaml.safe_load((K8S / "image" / "kustomization.yaml").read_text())["images"][0]
    want = f"{image['newName']}:{image['newTag']}"
    kinds = set()
    for target in [K8S, *sorted(p.parent for p in (K8S / "jobs").rglob("kustomization.yaml"))]:
        out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, check=True)
        for obj in yaml.safe_load_all(out.stdout):
            kinds.add(obj["kind"])
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "ldm", obj["metadata"]["name"]
            for spec in pod_specs(obj):
                for c in spec["containers"]:
                    assert c["image"] == want, (target, obj["metadata"]["name"], c["name"])
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds


def test_k8s_secure_defaults():
    manifests = k8s_manifests()
    kinds = {d["kind"] for docs in manifests.values() for d in docs}
    assert "Secret" not in kinds, "secrets are created with kubectl, never committed"
    assert "Ingress" not in kinds
    for _, svc in objects_of_kind("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"

    for path, obj in objects_of_kind("RayCluster") + objects_of_kind("RayJob") + objects_of_kind("Deployment"):
        spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        if obj["kind"] != "Deployment":
            assert spec["authOptions"] == {"mode": "token", "secretName": "ldm-ray-auth"}, path
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        for pod in pod_specs(obj):
            assert not pod.get("hostNetwork"), path
            assert pod.get("serviceAccountName") in {"ldm-ray", "ldm-mlflow"}, path
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (path, c["name"])
                assert not c["securityContext"].get("privileged"), (path, c["name"])
                assert all("hostPort" not in p for p in c.get("ports", [])), (path, c["name"])
                for e in c.get("env", []):
                    assert "value" in e and not re.search(r"(?i)password|secret|token", e["name"]), e

    # Kubernetes API tokens: only the Ray head gets one (its autoscaler sidecar scales the worker groups).
    for _, sa in objects_of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for path, obj in objects_of_kind("RayCluster") + objects_of_kind("RayJob") + objects_of_kind("Deployment"):
        head, *others = pod_specs(obj)
        if obj["kind"] != "Deployment":
            assert head["automountServiceAccountToken"] is True, path
        else:
            others = [head]
        assert not any(pod.get("automountServiceAccountToken") for pod in others), path

    ((_, policy),) = objects_of_kind("NetworkPolicy")
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Ingress"]
    assert {"podSelector": {}} in policy["spec"]["ingress"][0]["from"]

    ((_, mlflow),) = objects_of_kind("Deployment")
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert container["command"] == [f"{IMAGE_WORKDIR}/infra/mlflow/serve.sh"]
    env = {e["name"]: e["value"] for e in container["env"]}
    uri_file = env["MLFLOW_BACKEND_STORE_URI_FILE"]
    mount = next(m for m in container["volumeMounts"] if uri_file.startswith(m["mountPath"]))
    volume = next(v for v in mlflow["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "ldm-mlflow-db", "the database URI comes from a Secret"


# --------------------------------------------------------------------------------------------------------
# Whole-tree checks
# --------------------------------------------------------------------------------------------------------

CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"(?i)aws_secret_access_key\s*[:=]\s*\S",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "password in a URI": r"://[^/\s:@'\"]+:(?!\$)[^@\s/'\"]+@",
    "Ray token value": r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?(?!\$)[\w-]{8,}",
}


def test_no_open_ingress_or_literal_credentials_anywhere_in_infra():
    files = text_files(INFRA)
    assert len(files) > 10
    for path in files:
        text = path.read_text()
        for cidr in ("0.0.0.0/0", "::/0"):
            assert cidr not in text, f"{path.relative_to(REPO)} opens ingress to the world ({cidr})"
        for what, pattern in CREDENTIAL_PATTERNS.items():
            match = re.search(pattern, text)
            assert match is None, f"{path.relative_to(REPO)}: {what}: {match.group(0)!r}"

    # The scanner catches what it is meant to catch.
    leaky = "postgresql://mlflow:hunter2@db:5432/mlflow\nAKIAABCDEFGHIJKLMNOP\nRAY_AUTH_TOKEN=abcdef123456"
    assert {w for w, p in CREDENTIAL_PATTERNS.items() if re.search(p, leaky)} >= {
        "AWS access key id",
        "password in a URI",
        "Ray token value",
    }


def test_iam_policies_scope_data_and_secrets_and_match_the_configs():
    buckets = set()
    for path in sorted((INFRA / "aws" / "iam").glob("*-policy.json")):
        for statement in json.loads(path.read_text())["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            if any(a.split(":")[0] in {"s3", "secretsmanager", "iam"} for a in actions):
                assert "*" not in resources, f"{path.name}: {statement.get('Sid')} is not scoped"
            if "iam:PassRole" in actions:
                assert all(r.endswith(":role/ldm-ray-worker") for r in resources)
            buckets |= {r.split(":::")[1].split("/")[0] for r in resources if r.startswith("arn:aws:s3:::")}
    # One bucket across the IAM policies, the cluster config and the Kubernetes settings.
    assert len(buckets) == 1
    (bucket,) = buckets
    used = set(re.findall(r"s3://([\w.-]+)/", CLUSTER_YAML.read_text() + (K8S / "settings.yaml").read_text()))
    assert used == {bucket}


def test_docs_and_manifests_name_only_existing_repo_paths():
    docs = [INFRA / "README.md", CLUSTER_YAML, *K8S.rglob("*.yaml"), INFRA / "docker" / "Dockerfile"]
    named = {}
    for doc in docs:
        for rel in repo_paths_named_in(doc.read_text()):
            named.setdefault(rel, doc.relative_to(REPO))
    expected = {"pipelines/run.py", "pipelines/stage_a.py", "configs/photos.yaml"}
    assert expected <= named.keys(), expected - named.keys()
    missing = {rel: str(doc) for rel, doc in named.items() if not (REPO / rel).is_file()}
    assert not missing, f"named but missing from the repo: {missing}"

    # infra/README.md also names its own files relative to infra/ (`aws/cluster.yaml`, `k8s/jobs/stage-a`).
    local = re.findall(r"`((?:aws|k8s|mlflow|docker)/[\w./*-]+)`", (INFRA / "README.md").read_text())
    assert len(local) > 10
    assert [p for p in local if not list(INFRA.glob(p))] == []


# --------------------------------------------------------------------------------------------------------
# Secrets on the VM cluster
# --------------------------------------------------------------------------------------------------------


def test_fetch_secret_writes_an_owner_only_file_and_prints_no_secret(moto_server, tmp_path):
    import boto3

    secret_id = f"ldm/test-{uuid.uuid4().hex[:8]}"
    value = f"tok-{uuid.uuid4().hex}"
    boto3.client("secretsmanager", endpoint_url=moto_server).create_secret(Name=secret_id, SecretString=value)
    dest = tmp_path / "home" / ".ray" / "auth_token"
    script = str(INFRA / "aws" / "fetch_secret.py")

    done = subprocess.run([sys.executable, script, secret_id, str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert dest.read_text() == value
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert value not in done.stdout + done.stderr

    missing = subprocess.run(
        [sys.executable, script, "ldm/absent", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert missing.returncode != 0
    assert "ldm/absent" in missing.stderr and "ResourceNotFoundException" in missing.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_mlflow_systemd_unit_verifies_and_takes_the_database_uri_as_a_credential(tmp_path):
    unit = UNIT.read_text()
    lines = [line for line in unit.splitlines() if "=" in line and not line.startswith("#")]
    directives = dict(line.split("=", 1) for line in lines if not line.startswith("Environment="))
    env = dict(line.split("=", 2)[1:] for line in lines if line.startswith("Environment="))
    assert directives["ExecStart"] == f"{REMOTE_REPO}/infra/mlflow/serve.sh"
    cred_name = directives["LoadCredential"].split(":")[0]
    assert env["MLFLOW_BACKEND_STORE_URI_FILE"] == f"%d/{cred_name}"
    assert "MLFLOW_BACKEND_STORE_URI" not in env, "the URI itself never goes into the unit"

    # systemd's own verifier on the unit as installed, with the checkout in place of the node's copy.
    local = tmp_path / UNIT.name
    local.write_text(unit.replace(REMOTE_REPO, str(REPO)))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------------
# The MLflow tracking server (infra/mlflow/serve.sh)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MLFLOW_HOST": "0.0.0.0"}, "MLFLOW_HOST"),
        ({"MLFLOW_HOST": "8.8.8.8"}, "MLFLOW_HOST"),
        ({"MLFLOW_HOST": "mlflow.example.com"}, "MLFLOW_HOST"),
        ({"MLFLOW_ARTIFACTS_DESTINATION": ""}, "MLFLOW_ARTIFACTS_DESTINATION"),
        ({"MLFLOW_BACKEND_STORE_URI": ""}, "MLFLOW_BACKEND_STORE_URI"),
        ({"MLFLOW_BACKEND_STORE_URI_FILE": "/nonexistent/uri"}, "MLFLOW_BACKEND_STORE_URI_FILE"),
        ({"MLFLOW_PORT": "http"}, "MLFLOW_PORT"),
    ],
)
def test_mlflow_serve_refuses_unsafe_or_missing_settings(env, named):
    base = {
        "PATH": os.environ["PATH"],
        "MLFLOW_BACKEND_STORE_URI": "sqlite:///unused.db",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts",
        # Were validation to pass, exec would fail with 127 instead of the script's own exit code 2.
        "MLFLOW_BIN": "/nonexistent/mlflow",
    }
    done = subprocess.run([str(SERVE_SH)], env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr


def test_mlflow_serve_allows_all_interfaces_only_when_asked():
    env = {
        "PATH": os.environ["PATH"],
        "MLFLOW_BACKEND_STORE_URI": "sqlite:///unused.db",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts",
        "MLFLOW_HOST": "0.0.0.0",
        "MLFLOW_BIND_ALL_INTERFACES": "true",
        "MLFLOW_BIN": "/nonexistent/mlflow",
    }
    done = subprocess.run([str(SERVE_SH)], env=env, capture_output=True, text=True)
    assert done.returncode == 127 and "--host 0.0.0.0" in done.stderr, done.stderr


def http(url: str, *, method: str = "GET", body: dict | None = None, host: str | None = None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if host:
        headers["Host"] = host
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def descendants(pid: int) -> list[int]:
    children = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@pytest.fixture
def mlflow_server(moto_server, s3_bucket, tmp_path):
    """infra/mlflow/serve.sh on 127.0.0.1: SQLite metadata, artifacts proxied to the moto S3 bucket."""
    port = free_port()
    marker = f"backend-{uuid.uuid4().hex[:8]}"
    uri_file = tmp_path / "db-uri"
    uri_file.write_text(f"sqlite:///{tmp_path / marker}.db\n")
    uri_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"),
        MLFLOW_BACKEND_STORE_URI_FILE=str(uri_file),
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{s3_bucket}/mlartifacts",
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_SERVER_ALLOWED_HOSTS=f"127.0.0.1:{port},mlflow:{port}",
        MLFLOW_S3_ENDPOINT_URL=moto_server,
    )
    log_path = tmp_path / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(SERVE_SH)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.sh exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if http(f"{url}/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "port": port, "pid": proc.pid, "bucket": s3_bucket, "marker": marker, "log": log_path}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_mlflow_server_serves_api_and_ui_and_stores_artifacts_in_s3(mlflow_server, moto_server, monkeypatch, tmp_path):
    import boto3
    import mlflow

    url, port = mlflow_server["url"], mlflow_server["port"]

    # REST API and UI.
    status, _, body = http(f"{url}/api/2.0/mlflow/experiments/search", method="POST", body={"max_results": 10})
    assert status == 200 and "experiments" in json.loads(body)
    status, content_type, body = http(f"{url}/")
    assert status == 200 and content_type.startswith("text/html") and b"<html" in body.lower()

    # Host-header protection as configured by MLFLOW_SERVER_ALLOWED_HOSTS.
    search = f"{url}/api/2.0/mlflow/experiments/search"
    assert http(search, method="POST", body={"max_results": 1}, host=f"mlflow:{port}")[0] == 200
    assert http(search, method="POST", body={"max_results": 1}, host="evil.example.com")[0] == 403

    # A client run logs a metric and an artifact through the server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        exp_id = mlflow.create_experiment(f"infra-{uuid.uuid4().hex[:8]}")
        assert mlflow.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
        artifact = tmp_path / "notes.txt"
        artifact.write_text(f"artifact {uuid.uuid4().hex}")
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_metric("loss", 0.25, step=3)
            mlflow.log_artifact(str(artifact), artifact_path="reports")
        fetched = mlflow.get_run(run.info.run_id)
        assert fetched.data.metrics["loss"] == 0.25
    finally:
        mlflow.set_tracking_uri(None)

    # The artifact landed in the bucket, under the server's artifacts destination.
    s3 = boto3.client("s3", endpoint_url=moto_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server["bucket"]).get("Contents", [])]
    (key,) = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/reports/notes.txt")]
    assert key.startswith("mlartifacts/")
    assert s3.get_object(Bucket=mlflow_server["bucket"], Key=key)["Body"].read().decode() == artifact.read_text()

    # The database URI reached the server through the environment only: not on any command line, not logged.
    for pid in descendants(mlflow_server["pid"]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert mlflow_server["marker"] not in cmdline, cmdline
    assert mlflow_server["marker"] not in mlflow_server["log"].read_text()

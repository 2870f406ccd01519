"""Offline validation of infra/: the Ray cluster launcher config, the KubeRay manifests, the MLflow server.

Everything runs for real: Ray's own autoscaler validation and packaging code, kustomize (kubectl's built-in
copy), systemd's unit verifier, shells that expand the RayJob entrypoints, and `infra/mlflow/serve.sh`
serving the MLflow REST API and UI with its artifacts in a local S3 (moto) bucket.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client as http_client
import json
import os
import re
import shlex
import shutil
import ssl
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
from tests.helpers import stop_process_group
from tests.iam_eval import ALLOW, decide

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
    """The pod specs inside a Deployment, RayCluster or RayJob (none for other kinds): head first, then the worker
    groups, then a RayJob's submitter pod."""
    if obj["kind"] not in ("Deployment", "RayCluster", "RayJob"):
        return []
    spec = obj["spec"]
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    submitter = [spec["submitterPodTemplate"]["spec"]] if "submitterPodTemplate" in spec else []
    if obj["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups] + submitter


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
    text = CLUSTER_YAML.read_text()
    remote = set(re.findall(rf"{REMOTE_REPO}/([\w./-]+\.(?:py|sh|service))", text))
    assert {"infra/aws/fetch_secret.py", "infra/aws/mlflow_client_setup.sh"} <= remote
    # The MLflow host runs these (from /opt/ldm-mlflow, where infra/aws/mlflow_host_setup.sh installs them).
    host_setup = (INFRA / "aws" / "mlflow_host_setup.sh").read_text()
    remote |= set(re.findall(r'"\$repo/(infra/[\w./-]+\.(?:py|sh|service))"', host_setup)) | {"infra/aws/mlflow_host_setup.sh"}
    assert {"infra/mlflow/serve.sh", "infra/mlflow/ldm-mlflow.service", "infra/aws/fetch_secret.py"} <= remote
    for rel in remote:
        path = REPO / rel
        assert path.is_file(), f"{rel} is run on the cluster but missing from the repo"
        if path.suffix == ".sh":
            assert path.stat().st_mode & stat.S_IXUSR, f"{rel} must be executable"
            subprocess.run(["bash", "-n", str(path)], check=True)


def test_cluster_secure_defaults():
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces, _configure_security_group
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(load_cluster())
    assert cfg["provider"]["use_internal_ips"] is True

    # Every node type names its security group, so Ray never creates its default group (SSH from
    # 0.0.0.0/0). Ray's own code returns without calling AWS; with a missing group it would try to.
    for node_type in cfg["available_node_types"].values():
        node_config = node_type["node_config"]
        # A node type with an EFA interface names its group on the interface (EC2 takes one or the other).
        interfaces = node_config.get("NetworkInterfaces", [])
        assert node_config.get("SecurityGroupIds") or (interfaces and all(i["Groups"] for i in interfaces))
        assert node_config["MetadataOptions"]["HttpTokens"] == "required"
        assert all(b["Ebs"]["Encrypted"] for b in node_config["BlockDeviceMappings"])
        assert "IamInstanceProfile" in node_config, "AWS access through instance profiles, not keys"
    cfg = _configure_from_network_interfaces(cfg)  # Ray's bootstrap reads EFA interfaces' groups first
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
    # Job drivers and workers get the MLflow settings and credentials from the file the setup wrote (the
    # server is on its own host, reached over https only).
    assert ". ~/.ldm/mlflow.env;" in " ".join(cfg["worker_start_ray_commands"])
    assert ". ~/.ldm/mlflow.env;" in head_start
    assert re.search(r"LDM_MLFLOW_URI=https://\S+ bash \S+/mlflow_client_setup\.sh", setup)
    assert not load_cluster()["head_setup_commands"], "nothing of the MLflow server on the Ray head"
    assert "mlflow-db-uri" not in CLUSTER_YAML.read_text()


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
    assert "pipelines/platform/runtime.py" in names and "ldm_core/config.py" in names
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


# The Kubernetes versions whose API schemas the manifests must meet: the oldest EKS still supports, the newest known.
KUBERNETES_VERSIONS = ("1.31.0", "latest")


def test_manifests_validate_against_the_kubernetes_api_schemas():
    """No API server runs offline here (kind needs images, Debian ships no kube-apiserver, and no registry package
    carries one: infra/README.md). What the API server would check first, the OpenAPI schemas of its built-in kinds,
    comes from kubernetes-validate, strictly (an unknown field fails): every object of a built-in kind, and inside the
    RayCluster and RayJobs (custom kinds) every pod template, as a v1 PodTemplate, and the autoscaler sidecar's
    options, as the v1 Container KubeRay makes of them."""
    import kubernetes_validate

    versions = [kubernetes_validate.latest_version() if v == "latest" else v for v in KUBERNETES_VERSIONS]

    def validate(obj: dict, where: str) -> None:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where} (Kubernetes {version}): {e.message} at {'.'.join(map(str, e.path))}")

    def as_pod_template(name: str, pod: dict) -> dict:
        return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": {"spec": pod}}

    checked = set()
    for path, docs in k8s_manifests().items():
        for obj in docs:
            where = f"{path.relative_to(REPO)}: {obj['kind']} {obj['metadata']['name']}"
            if obj["kind"] in ("RayCluster", "RayJob"):
                for i, pod in enumerate(pod_specs(obj)):
                    validate(as_pod_template(f"pod-{i}", pod), f"{where}, pod template {i}")
                spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
                options = spec["autoscalerOptions"]
                sidecar = {"name": "autoscaler", "image": "rayproject/ray:2.60.0",
                           **{k: options[k] for k in ("securityContext", "volumeMounts", "resources", "env") if k in options}}
                validate(as_pod_template("autoscaler", {"containers": [sidecar]}), f"{where}, autoscalerOptions")
            else:
                validate(obj, where)
            checked.add(obj["kind"])
    assert {"Namespace", "ServiceAccount", "ConfigMap", "NetworkPolicy", "Deployment", "Service", "RayCluster",
            "RayJob"} <= checked

    # Strict means strict: a misspelt field of the token volume, a protocol that is no string, are refused.
    ((_, cluster),) = objects_of_kind("RayCluster")
    head = copy.deepcopy(pod_specs(cluster)[0])
    (token,) = [v for v in head["volumes"] if "projected" in v]
    token["projected"]["sources"][0]["serviceAccountToken"]["expirySeconds"] = 600
    with pytest.raises(kubernetes_validate.ValidationError, match="expirySeconds"):
        kubernetes_validate.validate(as_pod_template("head", head), versions[0], strict=True)
    ((_, egress),) = [(p, d) for p, d in objects_of_kind("NetworkPolicy") if d["metadata"]["name"] == "ldm-egress"]
    broken = copy.deepcopy(egress)
    broken["spec"]["egress"][1]["ports"][0]["protocol"] = 6
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, versions[0], strict=True)


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
    for target in [K8S, K8S / "mlflow", *sorted(p.parent for p in (K8S / "jobs").rglob("kustomization.yaml"))]:
        out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, check=True)
        namespace = "ldm-mlflow" if target.name == "mlflow" else "ldm"
        for obj in yaml.safe_load_all(out.stdout):
            kinds.add(obj["kind"])
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
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
                    # A secret comes from a Secret (secretKeyRef) or a file in a mounted Secret, never as a value.
                    if re.search(r"(?i)password|secret|token", e["name"]) and not e["name"].endswith("_FILE"):
                        assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], e
                    else:
                        assert "value" in e or "secretKeyRef" in e["valueFrom"], e

    # Kubernetes API tokens: no pod gets one automatically (test_only_the_autoscaler_sidecar_holds_an_api_token).
    for _, sa in objects_of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for path, obj in objects_of_kind("RayCluster") + objects_of_kind("RayJob") + objects_of_kind("Deployment"):
        assert all(pod.get("automountServiceAccountToken") is False for pod in pod_specs(obj)), path

    # The MLflow server gets every secret serve.sh needs as a file of a mounted Secret, and serves TLS.
    ((_, mlflow),) = objects_of_kind("Deployment")
    pod = mlflow["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [f"{IMAGE_WORKDIR}/infra/mlflow/serve.sh"]
    env = {e["name"]: e["value"] for e in container["env"]}
    secret_of = {}
    for var in ("MLFLOW_BACKEND_STORE_URI_FILE", "MLFLOW_AUTH_DATABASE_URI_FILE", "MLFLOW_AUTH_ADMIN_PASSWORD_FILE",
                "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE", "MLFLOW_TLS_CERT_FILE", "MLFLOW_TLS_KEY_FILE"):
        mount = next(m for m in container["volumeMounts"] if env[var].startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        key = env[var][len(mount["mountPath"]) + 1:]
        assert key in {i["path"] for i in volume["secret"]["items"]}, var
        secret_of[var] = volume["secret"]["secretName"]
    assert secret_of["MLFLOW_BACKEND_STORE_URI_FILE"] == "ldm-mlflow-db"
    assert secret_of["MLFLOW_TLS_KEY_FILE"] == "ldm-mlflow-tls"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    # Every Ray container reaches it over TLS as the pipeline's user, with the password from the Secret.
    settings = {d["metadata"]["name"]: d["data"] for _, d in objects_of_kind("ConfigMap")}["ldm-settings"]
    assert settings["MLFLOW_TRACKING_URI"].startswith("https://")
    for path, obj in objects_of_kind("RayCluster") + objects_of_kind("RayJob"):
        spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c["env"]}
                assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ldm-mlflow-client"
                ca = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]["value"]
                assert any(ca.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), (path, c["name"])


# The Pod Security Standards' "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards),
# written out: what the API server of the namespace checks on admission.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict, extra_containers: list[dict] = ()) -> list[str]:
    """What in a pod spec the restricted Pod Security profile (baseline included) forbids. `extra_containers`:
    containers an operator adds to the pod (KubeRay's autoscaler sidecar), given as their securityContext."""
    bad = []
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"{field}: true")
    for v in pod.get("volumes", []):
        kind = (set(v) - {"name"}).pop()
        if kind not in RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {v['name']}: type {kind}")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {s['name']}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    if (psc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                              "container_kvm_t", "container_engine_t"):
        bad.append("pod seLinuxOptions.type")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        bad.append("pod appArmorProfile Unconfined")
    containers = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", []),
                  *({"name": "(sidecar)", "securityContext": sc} for sc in extra_containers)]
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
        if not (sc.get("runAsNonRoot") if "runAsNonRoot" in sc else psc.get("runAsNonRoot")):
            bad.append(f"{where}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{where}: procMount")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{where}: hostProcess")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                bad.append(f"{where}: hostPort {port['hostPort']}")
    return bad


def test_every_pod_meets_the_restricted_pod_security_standard_which_the_namespace_enforces():
    namespaces = {d["metadata"]["name"]: d["metadata"]["labels"] for _, d in objects_of_kind("Namespace")}
    assert set(namespaces) == {"ldm", "ldm-mlflow"}
    for labels in namespaces.values():
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    checked = 0
    for path, obj in objects_of_kind("Deployment") + objects_of_kind("RayCluster") + objects_of_kind("RayJob"):
        sidecars = []
        if obj["kind"] != "Deployment":
            spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
            # KubeRay's autoscaler sidecar joins the head pod with autoscalerOptions.securityContext.
            sidecars = [spec["autoscalerOptions"].get("securityContext") or {}]
        for i, pod in enumerate(pod_specs(obj)):
            assert restricted_violations(pod, sidecars if i == 0 else []) == [], (path, i)
            checked += 1
        if obj["kind"] == "RayJob":
            assert "submitterPodTemplate" in obj["spec"], f"{path}: KubeRay's default submitter pod is not restricted"
    assert checked >= 12

    # The checks catch what they are meant to catch.
    ok = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
          "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                           "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_violations(ok) == []
    breaks = [
        ("hostNetwork: true", {"hostNetwork": True}),
        ("type hostPath", {"volumes": [{"name": "v", "hostPath": {"path": "/"}}]}),
        ("seccompProfile Unconfined", {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "Unconfined"}}}),
        ("runAsNonRoot not true", {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}),
        ("adds capabilities ['SYS_ADMIN']", {"containers": [{"name": "c", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}}]}),
        ("allowPrivilegeEscalation not false", {"containers": [{"name": "c", "securityContext": {
            "capabilities": {"drop": ["ALL"]}}}]}),
    ]
    for what, change in breaks:
        assert any(what in v for v in restricted_violations({**copy.deepcopy(ok), **change})), what
    assert any("sidecar" in v for v in restricted_violations(ok, [{"allowPrivilegeEscalation": False}]))


def test_network_policies_admit_the_operator_by_namespace_and_label_and_block_instance_metadata():
    policies = {d["metadata"]["name"]: d["spec"] for _, d in objects_of_kind("NetworkPolicy")}
    ingress = policies["ldm-ingress"]
    assert ingress["podSelector"] == {} and ingress["policyTypes"] == ["Ingress"]
    peers = [peer for rule in ingress["ingress"] for peer in rule["from"]]
    assert {"podSelector": {}} in peers
    assert not any("ipBlock" in peer for peer in peers), "no address range may reach the pods"
    for peer in peers:
        if "namespaceSelector" in peer:
            # Namespace AND pod label in one peer: the label alone (which any pod can carry) admits nothing.
            assert peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name"), peer
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}, peer

    # The MLflow server, in its own namespace, admits the jobs' namespace only, on its port.
    mlflow_ingress = policies["mlflow-ingress"]
    assert mlflow_ingress["podSelector"] == {}
    assert [peer for rule in mlflow_ingress["ingress"] for peer in rule["from"]] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ldm"}}}]
    assert [p["port"] for rule in mlflow_ingress["ingress"] for p in rule["ports"]] == [5000]

    import ipaddress

    for name in ("ldm-egress", "mlflow-egress"):
        egress = policies[name]
        assert egress["podSelector"] == {} and egress["policyTypes"] == ["Egress"], name
        blocks = [peer["ipBlock"] for rule in egress["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
        for metadata in ("169.254.169.254", "fd00:ec2::254"):
            ip = ipaddress.ip_address(metadata)
            reaching = [b for b in blocks if ip in ipaddress.ip_network(b["cidr"])
                        and not any(ip in ipaddress.ip_network(e) for e in b.get("except", []))]
            assert reaching == [], f"{name} reaches the instance metadata service {metadata}"
        assert any(ipaddress.ip_address("169.254.170.23") in ipaddress.ip_network(b["cidr"]) for b in blocks), \
            f"{name}: the EKS Pod Identity agent must stay reachable"


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_only_the_autoscaler_sidecar_holds_an_api_token():
    """The ray-head container runs job drivers: with the autoscaler's token a job could patch the RayCluster's worker
    template (image, command). The head pod turns automounting off and hands a projected token of its service account
    to KubeRay's autoscaler sidecar alone (autoscalerOptions.volumeMounts), where Ray's KubeRay node provider reads it."""
    from ray.autoscaler._private.kuberay.node_provider import IN_CLUSTER_CA_CERT_PATH, IN_CLUSTER_TOKEN_PATH

    assert {IN_CLUSTER_TOKEN_PATH, IN_CLUSTER_CA_CERT_PATH} == {f"{SERVICE_ACCOUNT_DIR}/token", f"{SERVICE_ACCOUNT_DIR}/ca.crt"}
    checked = 0
    for path, obj in objects_of_kind("RayCluster") + objects_of_kind("RayJob") + objects_of_kind("Deployment"):
        pods = pod_specs(obj)
        projected_tokens = {(i, v["name"]) for i, pod in enumerate(pods) for v in pod.get("volumes", [])
                            if any("serviceAccountToken" in src for src in v.get("projected", {}).get("sources", []))}
        for pod in pods:
            assert pod.get("automountServiceAccountToken") is False, path
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                mounted = [m for m in c.get("volumeMounts", []) if m["mountPath"].startswith("/var/run/secrets/kubernetes.io")]
                assert not mounted, f"{path}: container {c['name']} mounts {mounted}"
        if obj["kind"] == "Deployment":
            assert not projected_tokens, path
            continue
        spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        ((index, volume_name),) = projected_tokens
        assert index == 0, f"{path}: the token volume must be in the head pod"
        (volume,) = [v for v in pods[0]["volumes"] if v["name"] == volume_name]
        sources = {k: src[k] for src in volume["projected"]["sources"] for k in src}
        assert sources["serviceAccountToken"]["path"] == "token"
        assert sources["configMap"] == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
        assert sources["downwardAPI"]["items"] == [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
        assert 600 <= sources["serviceAccountToken"]["expirationSeconds"] <= 3607, "a short-lived token"
        (mount,) = spec["autoscalerOptions"]["volumeMounts"]
        assert mount == {"name": volume_name, "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}, path
        checked += 1
    assert checked == 3


def _labels_match(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions are not used here
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def egress_allowed(policies: list[tuple[str, dict]], source: tuple[str, dict], dest: dict) -> bool:
    """Kubernetes NetworkPolicy egress semantics (kubernetes.io/docs/concepts/services-networking/network-policies):
    a pod that no Egress policy selects may connect anywhere; otherwise a connection is allowed when a rule of any
    policy selecting it admits the destination (peers: podSelector in the policy's namespace, namespaceSelector with an
    optional podSelector, ipBlock minus its excepts for addresses outside the pod network) and its port.
    policies: (namespace, spec); source: (namespace, pod labels); dest: {"ip", "port", "protocol", and for a pod
    "namespace" and "labels"}."""
    import ipaddress

    namespace, labels = source
    selecting = [spec for ns, spec in policies if ns == namespace and "Egress" in spec.get("policyTypes", [])
                 and _labels_match(spec["podSelector"], labels)]
    if not selecting:
        return True

    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            if "namespace" in dest:  # a pod: ipBlock is for addresses outside the cluster
                return False
            ip = ipaddress.ip_address(dest["ip"])
            block = peer["ipBlock"]
            return ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(e) for e in block.get("except", []) if ip.version == ipaddress.ip_network(e).version)
        if "namespace" not in dest:
            return False
        if "namespaceSelector" in peer:
            ns_ok = _labels_match(peer["namespaceSelector"], {"kubernetes.io/metadata.name": dest["namespace"]})
        else:
            ns_ok = dest["namespace"] == namespace
        return ns_ok and _labels_match(peer.get("podSelector", {}), dest["labels"])

    def port_admits(ports: list[dict] | None) -> bool:
        return ports is None or any(p.get("port") in (None, dest["port"]) and p.get("protocol", "TCP") == dest["protocol"]
                                    for p in ports)

    return any(("to" not in rule or any(peer_admits(p) for p in rule["to"])) and port_admits(rule.get("ports"))
               for spec in selecting for rule in spec.get("egress", []))


def test_egress_reaches_dns_s3_mlflow_and_the_cluster_only():
    """Every Ray pod reaches its own namespace's pods, the MLflow server's HTTPS port, cluster DNS, the S3 interface
    endpoint and the EKS Pod Identity agent; nothing else: not the internet, not the metadata service, not the
    Kubernetes API (the head pod alone, for its autoscaler). The MLflow server reaches DNS, S3, its database and
    the Pod Identity agent only."""
    policies = [(namespace_of(p), d["spec"]) for p, d in objects_of_kind("NetworkPolicy")]
    named = {d["metadata"]["name"]: d["spec"] for _, d in objects_of_kind("NetworkPolicy")}

    def cidrs(name: str, port: int) -> list[str]:
        return [peer["ipBlock"]["cidr"] for rule in named[name]["egress"] for peer in rule.get("to", [])
                if "ipBlock" in peer and any(p["port"] == port for p in rule.get("ports", []))]

    s3 = cidrs("ldm-egress", 443)
    assert s3 and s3 == cidrs("mlflow-egress", 443), "one S3 endpoint for both namespaces"
    import ipaddress

    def first_ip(cidr: str) -> str:
        return str(next(ipaddress.ip_network(cidr).hosts()))

    (api,) = cidrs("ldm-head-kube-api", 443)
    (database,) = cidrs("mlflow-egress", 5432)
    head, worker = ("ldm", {"ray.io/node-type": "head", "ray.io/cluster": "ldm"}), ("ldm", {"ray.io/node-type": "worker"})
    mlflow_pod = ("ldm-mlflow", {"app.kubernetes.io/name": "mlflow"})
    kube_dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}, "ip": "10.100.0.10"}

    def out(ip: str, port: int, protocol: str = "TCP") -> dict:
        return {"ip": ip, "port": port, "protocol": protocol}

    reachable = {
        "a pod of the namespace (GCS)": {"namespace": "ldm", "labels": worker[1], "ip": "10.1.0.9", "port": 6379, "protocol": "TCP"},
        "the MLflow server": {"namespace": "ldm-mlflow", "labels": mlflow_pod[1], "ip": "10.1.0.8", "port": 5000, "protocol": "TCP"},
        "DNS over UDP": {**kube_dns, "port": 53, "protocol": "UDP"},
        "DNS over TCP": {**kube_dns, "port": 53, "protocol": "TCP"},
        "the S3 endpoint": out(first_ip(s3[-1]), 443),
        "the Pod Identity agent": out("169.254.170.23", 80),
    }
    unreachable = {
        "the internet": out("52.94.236.248", 443),
        "S3 over plain HTTP": out(first_ip(s3[0]), 80),
        "the metadata service": out("169.254.169.254", 80),
        "the metadata service over IPv6": out("fd00:ec2::254", 80),
        "the database": out(first_ip(database), 5432),
        "MLflow on another port": {"namespace": "ldm-mlflow", "labels": mlflow_pod[1], "ip": "10.1.0.8", "port": 22, "protocol": "TCP"},
        "a pod of another namespace": {"namespace": "default", "labels": {}, "ip": "10.1.0.7", "port": 8080, "protocol": "TCP"},
        "DNS elsewhere": out("8.8.8.8", 53, "UDP"),
    }
    for pod in (head, worker):
        for what, dest in reachable.items():
            assert egress_allowed(policies, pod, dest), f"{pod[1]}: {what} unreachable"
        for what, dest in unreachable.items():
            assert not egress_allowed(policies, pod, dest), f"{pod[1]}: reaches {what}"
    assert egress_allowed(policies, head, out(first_ip(api), 443))
    assert not egress_allowed(policies, worker, out(first_ip(api), 443)), "worker pods reach the Kubernetes API"

    for what in ("DNS over UDP", "the S3 endpoint", "the Pod Identity agent"):
        assert egress_allowed(policies, mlflow_pod, reachable[what]), what
    assert egress_allowed(policies, mlflow_pod, out(first_ip(database), 5432))
    for what in ("the internet", "the metadata service", "a pod of another namespace"):
        assert not egress_allowed(policies, mlflow_pod, unreachable[what]), what
    assert not egress_allowed(policies, mlflow_pod, reachable["a pod of the namespace (GCS)"])
    # The evaluator is not vacuous: a pod that no policy selects reaches everything.
    assert egress_allowed(policies, ("default", {}), unreachable["the internet"])


def test_images_follow_the_immutable_tag_or_digest_policy():
    """The project image: one immutable release tag (semver, never `latest`, the ECR repository created
    IMMUTABLE) or a digest; kustomize puts it in every container. The base image: a fixed release."""
    (image,) = yaml.safe_load((K8S / "image" / "kustomization.yaml").read_text())["images"]
    if "digest" in image:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"])
    else:
        assert re.fullmatch(r"\d+\.\d+\.\d+", image["newTag"]), image
    assert "--image-tag-mutability IMMUTABLE" in (INFRA / "README.md").read_text()
    for path, obj in objects_of_kind("Deployment") + objects_of_kind("RayCluster") + objects_of_kind("RayJob"):
        for pod in pod_specs(obj):
            for c in pod["containers"]:
                assert c["image"].startswith(image["name"] + ":") and not c["image"].endswith(":latest"), path
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py\d+-\w+(@sha256:[0-9a-f]{64})?", base), base


# --------------------------------------------------------------------------------------------------------
# Whole-tree checks
# --------------------------------------------------------------------------------------------------------

CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    # moto's documented placeholder ("testing", infra/README.md's one-machine walkthrough) is no credential.
    "AWS secret key setting": r"(?i)aws_secret_access_key\s*[:=]\s*(?!testing\b)\S",
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
            assert cidr not in text, f"{path.relative_to(REPO)} opens traffic to or from the world ({cidr})"
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


def policy(name: str) -> list[dict]:
    return json.loads((INFRA / "aws" / "iam" / f"{name}-policy.json").read_text())["Statement"]


def allows(statements: list[dict], action: str, resource: str, context: dict | None = None) -> bool:
    """Whether a role with these statements may make this request (tests/iam_eval.py: explicit Deny over Allow,
    NotAction/NotResource, IAM's condition operators; a key the request does not carry is absent)."""
    return decide([{"Statement": statements}], action, resource, context) == ALLOW


def test_iam_roles_act_only_on_this_clusters_instances_and_their_own_secrets():
    cluster = load_cluster()["cluster_name"]
    head, worker, server = policy("head"), policy("worker"), policy("mlflow")
    ours = {"ec2:ResourceTag/ray-cluster-name": cluster}
    theirs = {"ec2:ResourceTag/ray-cluster-name": "someone-elses"}
    instance = "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0"

    # The autoscaler starts, stops, terminates and tags the instances of this cluster, none other.
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances", "ec2:CreateTags"):
        assert allows(head, action, instance, ours), action
        assert not allows(head, action, instance, theirs), action
        assert not allows(head, action, instance), f"{action} on an untagged instance"
    # It launches instances only when they carry this cluster's tag, and tags them only while launching.
    launch = {"aws:RequestTag/ray-cluster-name": cluster, "ec2:InstanceType": "g5.2xlarge",
              "ec2:MetadataHttpTokens": "required"}
    assert allows(head, "ec2:RunInstances", instance, launch)
    assert not allows(head, "ec2:RunInstances", instance, {**launch, "aws:RequestTag/ray-cluster-name": "x"})
    assert not allows(head, "ec2:RunInstances", instance, {k: v for k, v in launch.items() if "RequestTag" not in k})
    assert allows(head, "ec2:CreateTags", instance, {"ec2:CreateAction": "RunInstances"})
    assert allows(head, "ec2:RunInstances", "arn:aws:ec2:us-east-1::image/ami-0123", {"ec2:Owner": "amazon"})
    # Unconditioned "*" only for read-only Describe calls.
    for st in head:
        if st["Resource"] == "*":
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert all(a.startswith("ec2:Describe") for a in actions), st["Sid"]
    # The head hands instances the worker role only, and only to EC2; the workers manage no instances.
    assert allows(head, "iam:PassRole", "arn:aws:iam::123456789012:role/ldm-ray-worker",
                  {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not allows(head, "iam:PassRole", "arn:aws:iam::123456789012:role/ldm-ray-head",
                      {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not allows(head, "iam:PassRole", "arn:aws:iam::123456789012:role/admin",
                      {"iam:PassedToService": "ec2.amazonaws.com"})
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "iam:PassRole"):
        assert not any(allows(worker, action, r, ctx) for r in (instance, "arn:aws:iam::1:role/ldm-ray-worker")
                       for ctx in (ours, {"aws:RequestTag/ray-cluster-name": cluster}))

    # Secrets: the jobs' roles read what jobs hold anyway (the Ray token, the pipeline's MLflow password, the CA
    # certificate); only the MLflow server's role reads the database URIs, the admin password and the TLS key.
    secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:{}-AbCdEf"
    job_secrets = ["ldm/ray-auth-token", "ldm/mlflow-pipeline-password", "ldm/mlflow-ca-cert"]
    server_secrets = ["ldm/mlflow-db-uri", "ldm/mlflow-auth-db-uri", "ldm/mlflow-admin-password",
                      "ldm/mlflow-flask-secret-key", "ldm/mlflow-tls-key"]
    for role in (head, worker):
        assert all(allows(role, "secretsmanager:GetSecretValue", secret.format(s)) for s in job_secrets)
        assert not any(allows(role, "secretsmanager:GetSecretValue", secret.format(s)) for s in server_secrets)
    assert all(allows(server, "secretsmanager:GetSecretValue", secret.format(s)) for s in server_secrets)
    assert not allows(server, "secretsmanager:GetSecretValue", secret.format("ldm/mlflow-pipeline-password"))
    # The server writes artifacts under its prefix only; the jobs' data is out of its reach.
    assert allows(server, "s3:PutObject", "arn:aws:s3:::ldm-example-bucket/mlartifacts/1/run/a.png")
    assert not allows(server, "s3:GetObject", "arn:aws:s3:::ldm-example-bucket/datasets/photos/manifest.json")


def s3_object_arn(uri: str, bucket: str, leaf: str = "some/object") -> str:
    """arn of an object under the key prefix of `uri`, in the policies' bucket (the examples name other buckets)."""
    key = uri.removeprefix("s3://").partition("/")[2].strip("/")
    return f"arn:aws:s3:::{bucket}/{key}/{leaf}"


def s3_locations() -> tuple[set[str], set[str]]:
    """(what jobs read and write, where the MLflow server keeps artifacts): every s3:// URI of the configs' values,
    the Kubernetes settings and infra/README.md's commands, sorted by who uses it."""
    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
        elif isinstance(node, str) and node.startswith("s3://"):
            yield node

    readme = (INFRA / "README.md").read_text()
    jobs = {u for path in sorted((REPO / "configs").glob("*.yaml")) for u in walk(yaml.safe_load(path.read_text()))}
    jobs |= set(walk(yaml.safe_load((K8S / "settings.yaml").read_text())))
    jobs |= set(re.findall(r"--set [\w.]+=(s3://\S+)", readme))
    server = set(walk(yaml.safe_load((K8S / "mlflow" / "settings.yaml").read_text())))
    server |= set(re.findall(r"LDM_MLFLOW_ARTIFACTS=(s3://\S+)", readme))
    return jobs, server


def test_job_roles_write_only_the_job_prefixes_and_only_the_mlflow_server_writes_its_artifacts():
    """The jobs' roles (head, worker, and on Kubernetes the Pod Identity role made from worker-policy.json) cannot
    touch the MLflow server's artifact prefix: job code could otherwise overwrite any user's artifacts and
    registered-model weights behind MLflow's permissions."""
    head, worker, server = policy("head"), policy("worker"), policy("mlflow")
    (bucket,) = {r.split(":::")[1].split("/")[0] for st in head for r in
                 (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]) if ":s3:::" in r}
    jobs, artifacts = s3_locations()
    assert {u.split("/")[3] for u in jobs} >= {"datasets", "checkpoints", "runs"}, jobs
    assert artifacts and all(u.rstrip("/").endswith("/mlartifacts") for u in artifacts), artifacts
    writes = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
    for name, role in (("head", head), ("worker", worker)):
        for uri in jobs:
            for action in ("s3:GetObject", *writes):
                assert allows(role, action, s3_object_arn(uri, bucket)), f"{name} cannot {action} under {uri}"
        for uri in artifacts:
            for action in ("s3:GetObject", *writes):
                assert not allows(role, action, s3_object_arn(uri, bucket, "1/models/m-1/artifacts/model.pt")), \
                    f"{name} may {action} under the MLflow server's {uri}"
        # Nothing at the bucket's top level, nor a prefix that merely starts like a job prefix.
        for key in ("x.bin", "runsx/y", "mlartifacts", "datasets"):
            assert not allows(role, "s3:PutObject", f"arn:aws:s3:::{bucket}/{key}"), f"{name} may write {key}"
    for uri in artifacts:
        for action in ("s3:GetObject", *writes):
            assert allows(server, action, s3_object_arn(uri, bucket)), f"mlflow cannot {action} under {uri}"
    for uri in jobs:
        assert not allows(server, "s3:PutObject", s3_object_arn(uri, bucket)), uri


# node_config keys of cluster.yaml -> the requests EC2 authorizes when RunInstances launches with them (besides the
# instance, its network interface and its volumes, which every launch creates), each with the condition keys AWS puts
# in its request context. A key missing here fails the tests below: say what a new key needs before the autoscaler
# meets a refusal on AWS.
def _run_instances_requests(key: str, value, region: str, account: str, image_owner: str) -> list[tuple[str, str, dict]]:
    ec2 = f"arn:aws:ec2:{region}:{account}"
    if key in {"InstanceType", "MetadataOptions", "BlockDeviceMappings"}:
        return []  # the instance's own fields (its request context) and the volumes (always checked)
    if key == "IamInstanceProfile":  # roles and profiles share names (infra/README.md)
        return [("iam:PassRole", f"arn:aws:iam::{account}:role/{value['Name']}",
                 {"iam:PassedToService": "ec2.amazonaws.com"})]
    if key == "ImageId":
        image = ("ec2:RunInstances", f"arn:aws:ec2:{region}::image/ami-0123456789abcdef0", {"ec2:Owner": image_owner})
        if value.startswith("resolve:ssm:"):  # EC2 reads the parameter with the caller's rights
            return [("ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{value.removeprefix('resolve:ssm:')}", {}),
                    image]
        return [(image[0], f"arn:aws:ec2:{region}::image/{value}", image[2])]
    if key == "KeyName":
        return [("ec2:RunInstances", f"{ec2}:key-pair/{value}", {})]
    if key == "SubnetIds":
        return [("ec2:RunInstances", f"{ec2}:subnet/{s}", {}) for s in value]
    if key == "SecurityGroupIds":
        return [("ec2:RunInstances", f"{ec2}:security-group/{g}", {}) for g in value]
    if key == "NetworkInterfaces":
        return [("ec2:RunInstances", arn, {}) for nic in value for arn in
                [f"{ec2}:subnet/{nic['SubnetId']}", *(f"{ec2}:security-group/{g}" for g in nic.get("Groups", []))]]
    if key == "Placement":
        assert set(value) == {"GroupName"}, value
        return [("ec2:RunInstances", f"{ec2}:placement-group/{value['GroupName']}", {})]
    if key == "InstanceMarketOptions":
        assert value["MarketType"] == "spot", value
        return [("ec2:RunInstances", f"{ec2}:spot-instances-request/sir-0123abcd", {})]
    pytest.fail(f"node_config key {key}: add the resources RunInstances is authorized against for it")


def launch_requests(cfg: dict, node_type: str, *, image_owner: str = "amazon") -> list[tuple[str, str, dict]]:
    """(action, resource ARN, request context) of every authorization AWS makes when the autoscaler (the head's role)
    launches one node of `node_type` with its node_config, tagged the way Ray's AWS node provider tags it.
    `image_owner`: the account that owns the AMI (the SSM alias resolves to Amazon's Deep Learning AMI)."""
    from ray.autoscaler.tags import (TAG_RAY_CLUSTER_NAME, TAG_RAY_LAUNCH_CONFIG, TAG_RAY_NODE_KIND,
                                     TAG_RAY_NODE_NAME, TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)

    region, account, cluster = cfg["provider"]["region"], "123456789012", cfg["cluster_name"]
    ec2 = f"arn:aws:ec2:{region}:{account}"
    node_config = cfg["available_node_types"][node_type]["node_config"]
    tags = {TAG_RAY_CLUSTER_NAME: cluster, TAG_RAY_NODE_NAME: f"ray-{cluster}-worker", TAG_RAY_NODE_KIND: "worker",
            TAG_RAY_USER_NODE_TYPE: node_type, TAG_RAY_LAUNCH_CONFIG: "0123abcd", TAG_RAY_NODE_STATUS: "pending"}
    tagging = {**{f"aws:RequestTag/{k}": v for k, v in tags.items()}, "aws:TagKeys": list(tags)}
    instance = {**tagging, "ec2:InstanceType": node_config["InstanceType"],
                # EC2's default without MetadataOptions is the AMI's, IMDSv1 allowed on the Ubuntu DLAMI.
                "ec2:MetadataHttpTokens": node_config.get("MetadataOptions", {}).get("HttpTokens", "optional")}
    requests = [("ec2:RunInstances", f"{ec2}:instance/*", instance),
                ("ec2:RunInstances", f"{ec2}:network-interface/*", {}), ("ec2:RunInstances", f"{ec2}:volume/*", {}),
                ("ec2:CreateTags", f"{ec2}:instance/*", {**tagging, "ec2:CreateAction": "RunInstances"})]
    for key, value in node_config.items():
        requests += _run_instances_requests(key, value, region, account, image_owner)
    return requests


def worker_types(cfg: dict) -> list[str]:
    """The node types the autoscaler launches (`ray up` launches the head with the operator's own rights)."""
    return [name for name in cfg["available_node_types"] if name != cfg["head_node_type"]]


def test_head_role_may_launch_every_node_type_of_the_cluster_config():
    """For each worker type, every request EC2 authorizes when the autoscaler (the head's role) runs RunInstances
    with its node_config is allowed: an unlisted one (the p4d type's placement group, say) refuses that type on AWS."""
    cfg = load_cluster()
    head = policy("head")
    seen_keys = set()
    for name in worker_types(cfg):
        seen_keys |= set(cfg["available_node_types"][name]["node_config"])
        refused = [(a, r) for a, r, context in launch_requests(cfg, name) if not allows(head, a, r, context)]
        assert refused == [], f"node type {name}: the head role may not {refused}"
    # The p4d type's EFA interface and placement group are among what was checked.
    assert {"Placement", "NetworkInterfaces", "SubnetIds", "SecurityGroupIds", "KeyName", "ImageId",
            "InstanceMarketOptions", "BlockDeviceMappings", "IamInstanceProfile"} <= seen_keys
    ec2 = f"arn:aws:ec2:{cfg['provider']['region']}:123456789012"
    without = [{**st, "Resource": [r for r in st["Resource"] if "placement-group" not in r]}
               if isinstance(st["Resource"], list) else st for st in head]
    assert not allows(without, "ec2:RunInstances", f"{ec2}:placement-group/ldm-efa")


def _node_config_values(node_config: dict, key: str) -> set[str]:
    """Subnet (key "SubnetId") or security-group (key "Groups") IDs a node_config launches into."""
    flat = "SubnetIds" if key == "SubnetId" else "SecurityGroupIds"
    nics = node_config.get("NetworkInterfaces", [])
    return set(node_config.get(flat, [])) | {v for nic in nics for v in _as_list(nic.get(key, []))}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _launch_elsewhere(node_config: dict, what: str) -> None:
    """Change a node_config in place so that it launches `what` the cluster config does not name."""
    if what == "subnet":
        if "SubnetIds" in node_config:
            node_config["SubnetIds"] = ["subnet-0ddddddddddddddd0"]
        for nic in node_config.get("NetworkInterfaces", []):
            nic["SubnetId"] = "subnet-0ddddddddddddddd0"
    elif what == "security-group":
        if "SecurityGroupIds" in node_config:
            node_config["SecurityGroupIds"] = ["sg-0eeeeeeeeeeeeeee0"]
        for nic in node_config.get("NetworkInterfaces", []):
            nic["Groups"] = ["sg-0eeeeeeeeeeeeeee0"]
    elif what == "imdsv1":
        node_config["MetadataOptions"] = {**node_config.get("MetadataOptions", {}), "HttpTokens": "optional"}
    elif what == "no-metadata-options":
        node_config.pop("MetadataOptions", None)
    elif what == "instance-type":
        node_config["InstanceType"] = "p5.48xlarge"
    elif what == "image":
        node_config["ImageId"] = "ami-0badbadbadbadbad0"
    else:
        raise AssertionError(what)


def test_head_role_refuses_launches_the_cluster_config_does_not_make():
    """What the head's role fails to forbid is what a job that holds it can launch: each worker type's launch, changed
    in one way (an AMI of another account, another subnet or security group, IMDSv1, another instance type), is
    refused, and refused for the resource that changed. The policy names exactly the cluster config's subnets,
    security groups and worker instance types."""
    cfg = load_cluster()
    head = policy("head")
    refused_at = {"image": ":image/", "subnet": ":subnet/", "security-group": ":security-group/",
                  "imdsv1": ":instance/", "no-metadata-options": ":instance/", "instance-type": ":instance/"}
    for name in worker_types(cfg):
        for what, where in refused_at.items():
            changed = copy.deepcopy(cfg)
            _launch_elsewhere(changed["available_node_types"][name]["node_config"], what)
            owner = "444455556666" if what == "image" else "amazon"
            refused = [(a, r) for a, r, context in launch_requests(changed, name, image_owner=owner)
                       if not allows(head, a, r, context)]
            assert refused, f"node type {name}: the head role may launch with another {what}"
            assert all(a == "ec2:RunInstances" and where in r for a, r in refused), (name, what, refused)
        # Amazon's own AMIs stay launchable when named by ID instead of the SSM alias.
        changed = copy.deepcopy(cfg)
        _launch_elsewhere(changed["available_node_types"][name]["node_config"], "image")
        assert all(allows(head, a, r, c) for a, r, c in launch_requests(changed, name, image_owner="amazon"))

    # The policy's lists are the cluster config's, exactly (both are EDITed together: infra/README.md).
    nodes = [cfg["available_node_types"][n]["node_config"] for n in worker_types(cfg)]
    named = {r.rsplit("/", 1)[1] for st in head if st["Effect"] == "Allow" for r in _as_list(st["Resource"])
             if ":subnet/" in r or ":security-group/" in r}
    assert named == set().union(*(_node_config_values(n, "SubnetId") | _node_config_values(n, "Groups") for n in nodes))
    (types,) = [st["Condition"]["StringEquals"]["ec2:InstanceType"] for st in head
                if "ec2:InstanceType" in st.get("Condition", {}).get("StringEquals", {})]
    assert sorted(types) == sorted({n["InstanceType"] for n in nodes})


def test_head_role_cannot_rename_the_cluster_of_an_existing_instance():
    """An instance whose ray-cluster-name changed is no longer this cluster's: neither the autoscaler nor `ray down`
    would terminate it. The head's role tags this cluster's instances (node status, as the autoscaler does) but never
    their cluster name, nor any tag of another cluster's instance."""
    cfg = load_cluster()
    head = policy("head")
    instance = f"arn:aws:ec2:{cfg['provider']['region']}:123456789012:instance/i-0123456789abcdef0"
    ours = {"ec2:ResourceTag/ray-cluster-name": cfg["cluster_name"]}

    def create_tags(tags: dict[str, str], resource_tags: dict[str, str] = ours) -> bool:
        context = {**resource_tags, **{f"aws:RequestTag/{k}": v for k, v in tags.items()}, "aws:TagKeys": list(tags)}
        return allows(head, "ec2:CreateTags", instance, context)

    assert create_tags({"ray-node-status": "up-to-date"})
    assert create_tags({"ray-node-status": "up-to-date", "ray-runtime-config": "abc"})
    assert not create_tags({"ray-cluster-name": "escaped"})
    assert not create_tags({"ray-node-status": "up-to-date", "ray-cluster-name": ""})
    assert not create_tags({"ray-cluster-name": cfg["cluster_name"]}), "no exception for the same name either"
    assert not create_tags({"ray-node-status": "up-to-date"}, {"ec2:ResourceTag/ray-cluster-name": "other"})
    assert not allows(head, "ec2:DeleteTags", instance, {**ours, "aws:TagKeys": ["ray-cluster-name"]})


def test_tracking_uri_with_credentials_is_refused_without_echoing_them():
    """A password in mlflow.tracking_uri would sit in a config file or on a command line: the config refuses it in one
    line that names the environment variables to use, and quotes the value with its credentials masked."""
    from ldm_core.config import ConfigError
    from pipelines.config import load_config

    quickstart = REPO / "configs" / "quickstart.yaml"
    for uri in ("https://alice:s3cr3t-pw@mlflow.example:5000", "HTTP://s3cr3t-pw@127.0.0.1:5000/",
                "https://alice:s3cr3t-pw@mlflow.example:5000/path?x=@y"):
        with pytest.raises(ConfigError) as e:
            load_config(quickstart, [f"mlflow.tracking_uri={uri}"])
        message = str(e.value)
        (line,) = message.splitlines()[1:]
        assert line.startswith("mlflow.tracking_uri: ") and "MLFLOW_TRACKING_USERNAME" in line, message
        assert "MLFLOW_TRACKING_PASSWORD" in line and "***@" in line, message
        assert "s3cr3t-pw" not in message and "alice" not in message, message
    for uri in ("https://mlflow.example:5000", "https://mlflow.example:5000/x?user=a@b", "sqlite:////tmp/m.db",
                "postgresql://mlflow@db:5432/mlflow"):
        assert load_config(quickstart, [f"mlflow.tracking_uri={uri}"]).mlflow.tracking_uri == uri


def test_tracking_uri_variable_with_credentials_is_refused_without_echoing_them(monkeypatch):
    """The same rule for the MLFLOW_TRACKING_URI variable, which wins over the config."""
    from ldm_core.config import ConfigError
    from pipelines.platform import tracking
    from pipelines.config import load_config

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cr3t-pw@mlflow.example:5000")
    with pytest.raises(ConfigError) as e:
        tracking.tracking_uri(cfg.mlflow)
    assert "MLFLOW_TRACKING_PASSWORD" in str(e.value) and "***@" in str(e.value)
    assert "s3cr3t-pw" not in str(e.value) and "alice" not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example:5000")
    assert tracking.tracking_uri(cfg.mlflow) == "https://mlflow.example:5000"


def namespace_of(path: Path) -> str:
    """The namespace kustomize puts a manifest's objects in: that of the nearest kustomization above it."""
    for folder in path.parents:
        kustomization = folder / "kustomization.yaml"
        if kustomization.is_file() and "namespace" in yaml.safe_load(kustomization.read_text()):
            return yaml.safe_load(kustomization.read_text())["namespace"]
    raise AssertionError(f"{path}: no kustomization names its namespace")


def readme_commands() -> list[list[str]]:
    """infra/README.md's shell commands, continuation lines joined, split into words."""
    blocks = re.findall(r"```bash\n(.*?)```", (INFRA / "README.md").read_text(), re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for word in [*lexer, ";"]:
            if word.strip(";&|()"):
                words.append(word)
            elif words:
                commands.append(words)
                words = []
    return commands


def test_readme_creates_k8s_secrets_from_files_with_the_keys_the_manifests_read_and_binds_roles_per_namespace():
    """Secrets reach kubectl as files (a --from-literal value is on a command line, readable by every user of the
    machine) under the keys the manifests read, in the namespaces of the pods that read them; each Pod Identity
    association names a service account in the namespace it lives in."""
    def mappings(node):
        if isinstance(node, dict):
            yield node
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            yield from mappings(child)

    wanted: dict[tuple[str, str], set[str]] = {}  # (namespace, secret) -> keys the manifests read
    for path, docs in k8s_manifests().items():
        for m in mappings(docs):
            if "secretKeyRef" in m:
                ref = m["secretKeyRef"]
                wanted.setdefault((namespace_of(path), ref["name"]), set()).add(ref["key"])
            if "secretName" in m:  # a secret volume (its items' keys), or KubeRay's authOptions
                keys = {i["key"] for i in m.get("items", [])}
                wanted.setdefault((namespace_of(path), m["secretName"]), set()).update(keys)
    assert {("ldm-mlflow", "ldm-mlflow-db"), ("ldm", "ldm-mlflow-client"), ("ldm", "ldm-ray-auth")} <= wanted.keys()

    created: dict[tuple[str, str], set[str]] = {}
    associations = []
    for words in readme_commands():
        assert not any(w.startswith("--from-literal") for w in words), f"a secret on a command line: {words}"
        if words[:1] == ["kubectl"] and "create" in words and "secret" in words:
            namespace = words[words.index("-n") + 1]
            kind, name = words[words.index("secret") + 1: words.index("secret") + 3]
            if kind == "tls":
                keys = {"tls.crt", "tls.key"}
            else:
                sources = [w.split("=", 1)[1] for w in words if w.startswith("--from-file=")]
                keys = {s.split("=", 1)[0] if "=" in s else Path(s).name for s in sources}
                assert keys, f"no --from-file in {words}"
            created[(namespace, name)] = keys
        if words[:3] == ["aws", "eks", "create-pod-identity-association"]:
            associations.append((words[words.index("--namespace") + 1], words[words.index("--service-account") + 1]))
    for (namespace, name), keys in wanted.items():
        assert (namespace, name) in created, f"infra/README.md never creates Secret {name} in namespace {namespace}"
        assert keys <= created[(namespace, name)], f"Secret {name}: the manifests read {keys - created[(namespace, name)]}"

    accounts = {(namespace_of(p), d["metadata"]["name"]) for p, d in objects_of_kind("ServiceAccount")}
    assert sorted(associations) == sorted(accounts), (associations, accounts)


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


def test_mlflow_client_setup_puts_the_credentials_in_the_environment_of_ray_start_only(moto_server, tmp_path):
    import boto3

    password, cert = f"pw-{uuid.uuid4().hex}", f"-----BEGIN CERTIFICATE-----\n{uuid.uuid4().hex}\n"
    sm = boto3.client("secretsmanager", endpoint_url=moto_server)
    for name, value in (("ldm/mlflow-pipeline-password", password), ("ldm/mlflow-ca-cert", cert)):
        try:
            sm.create_secret(Name=name, SecretString=value)
        except sm.exceptions.ResourceExistsException:
            sm.put_secret_value(SecretId=name, SecretString=value)
    script = str(INFRA / "aws" / "mlflow_client_setup.sh")
    env = {**os.environ, "HOME": str(tmp_path), "LDM_PYTHON": sys.executable}

    plain = subprocess.run(["bash", script], env={**env, "LDM_MLFLOW_URI": "http://mlflow:5000"},
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "https only" in plain.stderr
    assert not (tmp_path / ".ldm").exists()

    done = subprocess.run(["bash", script], env={**env, "LDM_MLFLOW_URI": "https://mlflow.ldm.internal:5000"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    ldm = tmp_path / ".ldm"
    assert stat.S_IMODE(ldm.stat().st_mode) == 0o700
    for f in ("mlflow-password", "mlflow.env"):
        assert stat.S_IMODE((ldm / f).stat().st_mode) == 0o600, f
    assert password not in (ldm / "mlflow.env").read_text(), "the env file reads the password, it does not hold it"
    # What `ray start` (and so every job) sees after sourcing ~/.ldm_env.
    shown = subprocess.run(["bash", "-c", ". ~/.ldm_env && env"], env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert {"MLFLOW_TRACKING_URI=https://mlflow.ldm.internal:5000", "MLFLOW_TRACKING_USERNAME=pipeline",
            f"MLFLOW_TRACKING_PASSWORD={password}", f"MLFLOW_TRACKING_SERVER_CERT_PATH={ldm / 'mlflow-ca.pem'}"} <= set(shown)
    assert (ldm / "mlflow-ca.pem").read_text() == cert


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_mlflow_systemd_unit_verifies_and_takes_every_secret_as_a_credential_of_its_own_user(tmp_path):
    unit = UNIT.read_text()
    lines = [line for line in unit.splitlines() if "=" in line and not line.startswith("#")]
    directives = dict(line.split("=", 1) for line in lines if not line.startswith(("Environment=", "LoadCredential=")))
    env = dict(line.split("=", 2)[1:] for line in lines if line.startswith("Environment="))
    credentials = dict(line.split("=", 1)[1].split(":", 1) for line in lines if line.startswith("LoadCredential="))
    opt = "/opt/ldm-mlflow"
    assert directives["ExecStart"] == f"{opt}/serve.sh" and env["MLFLOW_BIN"].startswith(f"{opt}/")
    # Its own unprivileged user, not the user that runs Ray and the jobs.
    assert directives["User"] == "ldm-mlflow" and directives["NoNewPrivileges"] == "yes"
    assert directives["CapabilityBoundingSet"] == "" and directives["ProtectHome"] == "yes"
    # Every secret serve.sh reads is a credential (a file only this service can read), never a value in the unit.
    for var in ("MLFLOW_BACKEND_STORE_URI_FILE", "MLFLOW_AUTH_DATABASE_URI_FILE", "MLFLOW_AUTH_ADMIN_PASSWORD_FILE",
                "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE", "MLFLOW_TLS_KEY_FILE", "MLFLOW_TLS_CERT_FILE"):
        name = env[var].removeprefix("%d/")
        assert env[var] == f"%d/{name}" and credentials[name].startswith("/etc/ldm-mlflow/"), var
        assert var in SERVE_SH.read_text()
    assert not {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} & env.keys()
    # The setup fetches exactly the secrets the unit loads, from the names the MLflow role may read.
    host_setup = (INFRA / "aws" / "mlflow_host_setup.sh").read_text()
    fetched = set(re.search(r"for name in ([^;]+); do", host_setup).group(1).replace("\\\n", " ").split())
    assert {Path(f).name for f in credentials.values()} == fetched

    # systemd's own verifier on the unit as installed, with the checkout's serve.sh in place of the host's copy.
    local = tmp_path / UNIT.name
    local.write_text(unit.replace(f"{opt}/serve.sh", str(SERVE_SH)))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------------
# The MLflow tracking server (infra/mlflow/serve.sh)
# --------------------------------------------------------------------------------------------------------


def serve_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A complete environment for serve.sh with throwaway secret files (the exec'd binary is overridable)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    files = {}
    for name, value in (("auth-db-uri", f"sqlite:///{tmp_path / 'auth.db'}"), ("flask-key", uuid.uuid4().hex),
                        ("admin-password", f"adm-{uuid.uuid4().hex}")):
        (secrets / name).write_text(value + "\n")
        (secrets / name).chmod(0o600)
        files[name] = str(secrets / name)
    return {
        "PATH": os.environ["PATH"],
        "MLFLOW_BACKEND_STORE_URI": "sqlite:///unused.db",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts",
        "MLFLOW_AUTH_DATABASE_URI_FILE": files["auth-db-uri"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": files["flask-key"],
        "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": files["admin-password"],
        # Were validation to pass, exec would fail with 127 instead of the script's own exit code 2.
        "MLFLOW_BIN": "/nonexistent/mlflow",
        "TMPDIR": str(tmp_path),
        **overrides,
    }


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MLFLOW_HOST": "0.0.0.0"}, "MLFLOW_HOST"),
        ({"MLFLOW_HOST": "8.8.8.8"}, "MLFLOW_HOST"),
        ({"MLFLOW_HOST": "mlflow.example.com"}, "MLFLOW_HOST"),
        ({"MLFLOW_HOST": "10.0.0.5"}, "MLFLOW_TLS_CERT_FILE"),  # a private address, but no TLS
        ({"MLFLOW_TLS_CERT_FILE": "/nonexistent/cert.pem", "MLFLOW_TLS_KEY_FILE": "/nonexistent/key.pem"},
         "MLFLOW_TLS_CERT_FILE"),
        ({"MLFLOW_ARTIFACTS_DESTINATION": ""}, "MLFLOW_ARTIFACTS_DESTINATION"),
        ({"MLFLOW_BACKEND_STORE_URI": ""}, "MLFLOW_BACKEND_STORE_URI"),
        ({"MLFLOW_BACKEND_STORE_URI_FILE": "/nonexistent/uri"}, "MLFLOW_BACKEND_STORE_URI_FILE"),
        ({"MLFLOW_PORT": "http"}, "MLFLOW_PORT"),
        ({"MLFLOW_AUTH_DATABASE_URI_FILE": ""}, "MLFLOW_AUTH_DATABASE_URI_FILE"),
        ({"MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": "/nonexistent/key"}, "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"),
        ({"MLFLOW_AUTH_ADMIN_PASSWORD_FILE": "/dev/null"}, "MLFLOW_AUTH_ADMIN_PASSWORD_FILE"),  # empty
        ({"MLFLOW_AUTH_DEFAULT_PERMISSION": "EDIT"}, "MLFLOW_AUTH_DEFAULT_PERMISSION"),
        ({"MLFLOW_AUTH_CACHE_TTL_SECONDS": "1m"}, "MLFLOW_AUTH_CACHE_TTL_SECONDS"),
    ],
)
def test_mlflow_serve_refuses_unsafe_or_missing_settings(env, named, tmp_path):
    done = subprocess.run([str(SERVE_SH)], env=serve_env(tmp_path, **env), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert list(tmp_path.glob("ldm-mlflow-auth.*")) == [], "nothing written before the settings are valid"


def test_mlflow_serve_allows_all_interfaces_only_when_asked_and_with_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("placeholder")
    key.write_text("placeholder")
    env = serve_env(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_BIND_ALL_INTERFACES="true",
                    MLFLOW_TLS_CERT_FILE=str(cert), MLFLOW_TLS_KEY_FILE=str(key))
    done = subprocess.run([str(SERVE_SH)], env=env, capture_output=True, text=True)
    assert done.returncode == 127 and "--host 0.0.0.0" in done.stderr, done.stderr
    assert "--app-name basic-auth" in done.stderr and f"--ssl-certfile {cert}" in done.stderr
    # The generated auth config is private to the server's user and holds the auth database URI.
    (ini,) = tmp_path.glob("ldm-mlflow-auth.*/basic_auth.ini")
    assert stat.S_IMODE(ini.parent.stat().st_mode) == 0o700 and stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert f"database_uri = sqlite:///{tmp_path / 'auth.db'}" in ini.read_text()
    assert "default_permission = READ" in ini.read_text() and "auth_cache_ttl_seconds = 60" in ini.read_text()


def test_mlflow_server_installs_carry_the_auth_extra_in_the_projects_version_range():
    """The basic-auth app needs mlflow's `auth` extra wherever the server runs (the image, the MLflow host)."""
    spec = re.search(r'"mlflow(?:\[[\w,]+\])?([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for path in (INFRA / "docker" / "Dockerfile", INFRA / "aws" / "mlflow_host_setup.sh"):
        assert f"'mlflow[auth]{spec}'" in path.read_text(), path


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (openssl), as the clients' trusted CA and the server's cert."""
    cert, key = tmp_path / "tls-cert.pem", tmp_path / "tls-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


def http(url: str, *, method: str = "GET", body: dict | None = None, host: str | None = None,
         auth: tuple[str, str] | None = None, cafile: Path | None = None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if host:
        headers["Host"] = host
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
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
    """infra/mlflow/serve.sh on 127.0.0.1 over HTTPS (a throwaway certificate), basic auth on: SQLite metadata
    and users, artifacts proxied to the moto S3 bucket, every secret a 0600 file."""
    port = free_port()
    marker = f"backend-{uuid.uuid4().hex[:8]}"
    cert, key = self_signed_cert(tmp_path)
    uri_file = tmp_path / "db-uri"
    uri_file.write_text(f"sqlite:///{tmp_path / marker}.db\n")
    uri_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(serve_env(tmp_path, PATH=env["PATH"]))
    env.pop("MLFLOW_BACKEND_STORE_URI")
    admin_password = Path(env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"]).read_text().strip()
    env.update(
        MLFLOW_BIN=str(Path(sys.executable).parent / "mlflow"),
        MLFLOW_BACKEND_STORE_URI_FILE=str(uri_file),
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{s3_bucket}/mlartifacts",
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_SERVER_ALLOWED_HOSTS=f"127.0.0.1:{port},mlflow:{port}",
        MLFLOW_S3_ENDPOINT_URL=moto_server,
        MLFLOW_TLS_CERT_FILE=str(cert),
        MLFLOW_TLS_KEY_FILE=str(key),
    )
    log_path = tmp_path / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(SERVE_SH)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.sh exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if http(f"{url}/health", cafile=cert)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "port": port, "pid": proc.pid, "bucket": s3_bucket, "marker": marker, "log": log_path,
               "cert": cert, "admin": ("admin", admin_password),
               "secrets": [admin_password, Path(env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"]).read_text().strip()]}
    finally:
        # SIGKILL: after a SIGTERM this TLS server's uvicorn sat idle in its event loop for over 30 s (2026-12-07;
        # the plain-HTTP server exits in ~2.5 s), so every test's teardown used to wait out a 10 s timeout.
        stop_process_group(proc)


def add_mlflow_user(server: dict, username: str, tmp_path: Path, *, experiments: tuple[str, ...] = (),
                    models: tuple[str, ...] = ()) -> tuple[str, str]:
    """Create a user with infra/mlflow/add_user.py, as the admin, handing it these experiments and registered models
    (created by the admin first). Returns (username, password)."""
    password = f"pw-{uuid.uuid4().hex}"
    password_file = tmp_path / f"{username}-password"
    password_file.write_text(password)
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_SERVER_CERT_PATH": str(server["cert"]),
           "MLFLOW_TRACKING_USERNAME": server["admin"][0], "MLFLOW_TRACKING_PASSWORD": server["admin"][1]}
    owns = [*(f"--experiment={e}" for e in experiments), *(f"--model={m}" for m in models)]
    done = subprocess.run([sys.executable, str(INFRA / "mlflow" / "add_user.py"), username, "--password-file",
                           str(password_file), *owns], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    return username, password


@contextlib.contextmanager
def mlflow_as(server: dict, user: tuple[str, str] | None):
    """Point this process's MLflow client at the server, as `user` (None: no credentials)."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_USERNAME",
             "MLFLOW_TRACKING_PASSWORD")
    old = {k: os.environ.get(k) for k in names}
    os.environ.update(MLFLOW_TRACKING_URI=server["url"], MLFLOW_TRACKING_SERVER_CERT_PATH=str(server["cert"]))
    for k in names[2:]:
        os.environ.pop(k, None)
    if user is not None:
        os.environ.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    mlflow.set_tracking_uri(server["url"])
    try:
        yield mlflow.MlflowClient(server["url"])
    finally:
        mlflow.set_tracking_uri(None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_mlflow_server_requires_authentication_serves_tls_and_stores_artifacts_in_s3(
    mlflow_server, moto_server, tmp_path
):
    import boto3
    from mlflow.exceptions import MlflowException

    url, port, cert = mlflow_server["url"], mlflow_server["port"], mlflow_server["cert"]
    search = f"{url}/api/2.0/mlflow/experiments/search"

    # TLS only: plain HTTP on the port gets no MLflow answer, and the certificate is verified.
    with pytest.raises((urllib.error.URLError, ConnectionError, http_client.HTTPException)):
        http(f"http://127.0.0.1:{port}/health")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{url}/health", timeout=30)

    # No credentials, wrong credentials: nothing but the health check.
    assert http(f"{url}/health", cafile=cert)[0] == 200
    assert http(search, method="POST", body={"max_results": 1}, cafile=cert)[0] == 401
    assert http(f"{url}/", cafile=cert)[0] == 401
    admin = mlflow_server["admin"]
    assert http(search, method="POST", body={"max_results": 1}, cafile=cert, auth=("admin", "wrong-password-1"))[0] == 401
    status, content_type, body = http(f"{url}/", cafile=cert, auth=admin)
    assert status == 200 and content_type.startswith("text/html") and b"<html" in body.lower()
    # Host-header protection as configured by MLFLOW_SERVER_ALLOWED_HOSTS.
    assert http(search, method="POST", body={"max_results": 1}, cafile=cert, auth=admin, host=f"mlflow:{port}")[0] == 200
    assert http(search, method="POST", body={"max_results": 1}, cafile=cert, auth=admin, host="evil.example.com")[0] == 403

    # The admin takes the pipeline's experiment and model names and hands them to its user, before anyone else
    # can create (and so own) them.
    experiment = f"infra-{uuid.uuid4().hex[:8]}"
    pipeline_user = add_mlflow_user(mlflow_server, "pipeline", tmp_path, experiments=(experiment,),
                                    models=("ldm-autoencoder", "ldm-unet"))
    viewer = add_mlflow_user(mlflow_server, "viewer", tmp_path)

    # The pipeline's user logs a run, an artifact and a registered model version through the server.
    artifact = tmp_path / "notes.txt"
    artifact.write_text(f"artifact {uuid.uuid4().hex}")
    with mlflow_as(mlflow_server, pipeline_user) as client:
        import mlflow

        exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
        assert mlflow.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_metric("loss", 0.25, step=3)
            mlflow.log_artifact(str(artifact), artifact_path="reports")
        run_id = run.info.run_id
        assert client.get_run(run_id).data.metrics["loss"] == 0.25
        version = client.create_model_version("ldm-autoencoder", f"runs:/{run_id}/reports", run_id=run_id)
        client.set_registered_model_alias("ldm-autoencoder", "champion", version.version)
        client.set_registered_model_tag("ldm-unet", "owner", "pipeline")

    # An unauthenticated client can neither read, log nor register.
    with mlflow_as(mlflow_server, None) as client:
        for attempt in (lambda: client.create_experiment("anonymous"),
                        lambda: client.log_metric(run_id, "loss", 9.0),
                        lambda: client.create_run(exp_id),
                        lambda: client.create_registered_model("anonymous-model"),
                        lambda: client.create_model_version("ldm-autoencoder", f"runs:/{run_id}/reports", run_id=run_id),
                        lambda: client.get_run(run_id)):
            with pytest.raises(MlflowException, match="401|[Uu]nauthenticated|not authenticated"):
                attempt()

    # A read-only user reads everything of the pipeline's and changes nothing: no new version, no alias move,
    # no metric in its runs.
    with mlflow_as(mlflow_server, viewer) as client:
        assert client.get_run(run_id).data.metrics["loss"] == 0.25
        assert client.get_model_version_by_alias("ldm-autoencoder", "champion").version == version.version
        for attempt in (lambda: client.create_model_version("ldm-autoencoder", f"runs:/{run_id}/reports", run_id=run_id),
                        lambda: client.set_registered_model_alias("ldm-autoencoder", "champion", "1"),
                        lambda: client.delete_registered_model_alias("ldm-autoencoder", "champion"),
                        lambda: client.log_metric(run_id, "loss", 9.0),
                        lambda: client.create_run(exp_id),
                        lambda: client.create_model_version("ldm-unet", f"runs:/{run_id}/reports", run_id=run_id),
                        lambda: client.set_registered_model_tag("ldm-unet", "owner", "viewer")):
            with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
                attempt()
        # The pipeline's names are taken: the viewer cannot create them first and own them.
        for name in ("ldm-unet", "ldm-autoencoder"):
            with pytest.raises(MlflowException, match="RESOURCE_ALREADY_EXISTS|already exists"):
                client.create_registered_model(name)
        with pytest.raises(MlflowException, match="RESOURCE_ALREADY_EXISTS|already exists"):
            client.create_experiment(experiment)
    with mlflow_as(mlflow_server, admin) as client:
        versions = client.search_model_versions("name = 'ldm-autoencoder'")
        assert [v.version for v in versions] == [version.version]
        assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.25]

    # The artifact landed in the bucket, under the server's artifacts destination.
    s3 = boto3.client("s3", endpoint_url=moto_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server["bucket"]).get("Contents", [])]
    (key,) = [k for k in keys if k.endswith(f"{run_id}/artifacts/reports/notes.txt")]
    assert key.startswith("mlartifacts/")
    assert s3.get_object(Bucket=mlflow_server["bucket"], Key=key)["Body"].read().decode() == artifact.read_text()

    # The database URI and the auth secrets reached the server through files and its environment only: not on
    # any command line, not logged.
    server_log = mlflow_server["log"].read_text()
    for pid in descendants(mlflow_server["pid"]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for secret in [mlflow_server["marker"], *mlflow_server["secrets"], pipeline_user[1], viewer[1]]:
            assert secret not in cmdline, cmdline
    for secret in [mlflow_server["marker"], *mlflow_server["secrets"], pipeline_user[1], viewer[1]]:
        assert secret not in server_log


def test_only_the_promoter_promotes_and_a_file_changed_in_storage_is_refused(mlflow_server, moto_server, tmp_path):
    """The pipeline's user registers candidates; the promoter (its own MLflow user, made by add_user.py) copies a
    reviewed one into the promoted model, where @champion lives. As the pipeline's user, each of these is refused:
    promoting, creating a version of the promoted model, moving or deleting its alias, retagging its digests, and
    PUTting a file under the promoted version through the artifact proxy. A candidate whose code the pipeline's user
    rewrote (with its digests) is not promoted. A file of the promoted version changed in storage (the S3 object
    itself) fails the digest check of the next load, in one line naming the file."""
    import boto3
    import mlflow
    from mlflow.exceptions import MlflowException

    from mlflow.models.model import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
    from pipelines.models.registry import load_autoencoder, publish_autoencoder, run_id_of, version_of_alias
    from pipelines.models.provenance import (DIGESTS_TAG, PROMOTION_EXPERIMENT, ArtifactDigestError, pinned_requirement,
                                      promote, promoted_model_name, record_artifact_digests)

    experiment = f"infra-{uuid.uuid4().hex[:8]}"
    candidates, promoted = "ldm-autoencoder", promoted_model_name("ldm-autoencoder")
    pipeline_user = add_mlflow_user(mlflow_server, "pipeline", tmp_path, experiments=(experiment,), models=(candidates,))
    promoter = add_mlflow_user(mlflow_server, "promoter", tmp_path, experiments=(PROMOTION_EXPERIMENT,), models=(promoted,))
    url, cert = mlflow_server["url"], mlflow_server["cert"]

    model = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4))
    with mlflow_as(mlflow_server, pipeline_user) as client:
        mlflow.set_experiment(experiment)
        with mlflow.start_run() as run:
            uri, version = publish_autoencoder(model, tmp_path / "stage-a", candidates)
        digests = json.loads(client.get_model_version(candidates, str(version)).tags[DIGESTS_TAG])
        assert {"MLmodel", "requirements.txt", "artifacts/autoencoder/config.json"} <= set(digests), sorted(digests)
        assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests.values())
        requirements = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt", dst_path=str(tmp_path / "r")))
        assert re.fullmatch(r"ldm-pipeline==\d+\.\d+\.\d+\S*", pinned_requirement())
        assert pinned_requirement() in requirements.read_text().split(), requirements.read_text()
        load_autoencoder(uri)  # the candidate as registered loads
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            promote(candidates, version)
        # A job can still rewrite its own candidate, code and digests together (it owns both): its loaders accept
        # that, promotion does not, because it compares the code with the promoter's checkout.
        with mlflow.start_run():
            poisoned, poisoned_version = publish_autoencoder(model, tmp_path / "stage-a-2", candidates)
        (code,) = [p for p in digests if p.endswith(".py")]
        poisoned_dir = Path(mlflow.artifacts.download_artifacts(poisoned, dst_path=str(tmp_path / "poisoned")))
        (poisoned_dir / code).write_text((poisoned_dir / code).read_text() + "\nimport os  # anything, run at load\n")
        location = mlflow.get_logged_model(Model.load(str(poisoned_dir / "MLmodel")).model_id).artifact_location
        parent = Path(code).parent.as_posix()
        get_artifact_repository(location).log_artifact(str(poisoned_dir / code), None if parent == "." else parent)
        record_artifact_digests(candidates, poisoned_version)
        load_autoencoder(poisoned)

    with mlflow_as(mlflow_server, promoter):
        with pytest.raises(ArtifactDigestError, match=f"{code} is not this checkout's pipelines/models/pyfunc/"):
            promote(candidates, poisoned_version)
        promoted_uri = promote(candidates, version)
    assert promoted_uri == f"models:/{promoted}/1"

    with mlflow_as(mlflow_server, pipeline_user) as client:
        assert version_of_alias(candidates, "champion", "encode.autoencoder_alias") == promoted_uri
        assert run_id_of(promoted_uri) == run.info.run_id, "lineage leads to the run that trained the candidate"
        loaded = load_autoencoder(promoted_uri)
        assert all(torch_equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        denied = {
            "create a version of the promoted model": lambda: client.create_model_version(
                promoted, f"runs:/{run.info.run_id}/autoencoder", run_id=run.info.run_id),
            "move its alias": lambda: client.set_registered_model_alias(promoted, "champion", "1"),
            "delete its alias": lambda: client.delete_registered_model_alias(promoted, "champion"),
            "rewrite its digests": lambda: client.set_model_version_tag(promoted, "1", DIGESTS_TAG, "{}"),
        }
        for what, attempt in denied.items():
            with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
                attempt()  # `what` names the attempt in the traceback
        # PUT through the artifact proxy: refused under the promoted version, accepted under the pipeline's own run
        # (the same route, so the refusal is the permission).
        promotion_run = mlflow.get_run(client.get_model_version(promoted, "1").run_id)
        assert promotion_run.info.experiment_id == mlflow.get_experiment_by_name(PROMOTION_EXPERIMENT).experiment_id
        stored = f"{promotion_run.info.artifact_uri}/model"
        assert stored.startswith("mlflow-artifacts:/"), stored
        own = mlflow.get_run(run.info.run_id).info.artifact_uri
        for location, status in ((stored, 403), (own, 200)):
            path = location.removeprefix("mlflow-artifacts:/").strip("/") + "/artifacts/autoencoder/config.json"
            req = urllib.request.Request(f"{url}/api/2.0/mlflow-artifacts/artifacts/{path}", data=b'{"evil": 1}',
                                         method="PUT", headers={"Authorization": "Basic " + base64.b64encode(
                                             f"{pipeline_user[0]}:{pipeline_user[1]}".encode()).decode()})
            try:
                with urllib.request.urlopen(req, timeout=30, context=ssl.create_default_context(cafile=str(cert))) as r:
                    got = r.status
            except urllib.error.HTTPError as err:
                got = err.code
            assert got == status, (location, got)
        assert client.get_model_version_by_alias(promoted, "champion").version == "1"

    # Someone with the bucket's keys rewrites the promoted weights' config in S3: the next load refuses it.
    s3 = boto3.client("s3", endpoint_url=moto_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server["bucket"], Prefix="mlartifacts/")["Contents"]]
    (key,) = [k for k in keys if k.endswith("/artifacts/model/artifacts/autoencoder/config.json")]
    s3.put_object(Bucket=mlflow_server["bucket"], Key=key, Body=b'{"base_channels": 8}')
    with mlflow_as(mlflow_server, pipeline_user):
        with pytest.raises(ArtifactDigestError) as e:
            load_autoencoder(promoted_uri)
    (line,) = str(e.value).splitlines()
    assert line.startswith(f"model {promoted_uri}: artifacts/autoencoder/config.json has sha256 "), line


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def find_secrets(blobs: dict[str, bytes], secrets: list[str]) -> list[str]:
    """'where: which secret' for every blob that contains one of the secrets (as text or bytes)."""
    return [f"{where}: secret #{i}" for where, data in blobs.items() for i, s in enumerate(secrets) if s.encode() in data]


def every_page(search, **kwargs) -> list:
    """Every result of a paginated MlflowClient search."""
    out, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def everything_logged(client, experiment_id: str, dst: Path) -> dict[str, bytes]:
    """Every piece of text MLflow keeps for an experiment, as blobs keyed by where it came from: the experiment's
    tags; every run's params, tags, metric keys, dataset inputs and artifact files; every logged model's (MLflow 3
    keeps those of `log_model(name=...)` outside the run's artifacts) params, tags and artifact files; every
    registered model's and model version's description, tags and other fields."""
    import mlflow

    blobs: dict[str, bytes] = {}
    for key, value in client.get_experiment(experiment_id).tags.items():
        blobs[f"experiment tag {key}"] = f"{key}={value}".encode()

    def files(where: str, local: Path) -> None:
        for f in local.rglob("*"):
            if f.is_file():
                blobs[f"{where} artifact {f.relative_to(local)}"] = f.read_bytes()

    for run in every_page(client.search_runs, experiment_ids=[experiment_id], max_results=1000):
        rid = run.info.run_id
        for kind, mapping in (("param", run.data.params), ("tag", run.data.tags), ("metric", run.data.metrics)):
            for key, value in mapping.items():
                blobs[f"{rid} {kind} {key}"] = f"{key}={value}".encode()
        for inp in run.inputs.dataset_inputs:
            blobs[f"{rid} input {inp.dataset.name}"] = repr(inp).encode()
        files(rid, Path(client.download_artifacts(rid, "", str(dst / rid))))
    for model in every_page(client.search_logged_models, experiment_ids=[experiment_id], max_results=100):
        where = f"logged model {model.model_id}"
        for kind, mapping in (("param", model.params), ("tag", model.tags)):
            for key, value in mapping.items():
                blobs[f"{where} {kind} {key}"] = f"{key}={value}".encode()
        blobs[f"{where} fields"] = repr({k: v for k, v in dict(model).items() if k not in {"params", "tags"}}).encode()
        files(where, Path(mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location, dst_path=str(dst / model.model_id), tracking_uri=client.tracking_uri)))
    for kind, entities in (("registered model", every_page(client.search_registered_models, max_results=100)),
                           ("model version", every_page(client.search_model_versions, max_results=1000))):
        for entity in entities:
            where = f"{kind} {entity.name}" + (f"/{entity.version}" if kind == "model version" else "")
            blobs[f"{where} description"] = (entity.description or "").encode()
            for key, value in entity.tags.items():
                blobs[f"{where} tag {key}"] = f"{key}={value}".encode()
            blobs[f"{where} fields"] = repr({k: v for k, v in dict(entity).items()  # versions are scanned on their own
                                             if k not in {"description", "tags", "latest_versions"}}).encode()
    return blobs


def plant_secret(client, experiment_id: str, secret: str, tmp_path: Path) -> set[str]:
    """Write `secret`, inside other text, into one place of each kind `everything_logged` reads, through the server.
    Returns the blob keys the scan must then report."""
    note = f"token = {secret} # planted"
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "notes.txt").write_text(note)
    client.set_experiment_tag(experiment_id, "planted", note)
    run = client.create_run(experiment_id)
    rid = run.info.run_id
    client.log_param(rid, "planted", note)
    client.log_artifacts(rid, str(tmp_path / "planted"), "planted")
    client.set_terminated(rid)
    model = client.create_logged_model(experiment_id, name="planted", params={"planted": note},
                                       tags={"planted": note})
    client.log_model_artifacts(model.model_id, str(tmp_path / "planted"))
    client.finalize_logged_model(model.model_id, "READY")
    client.create_registered_model("planted-model", tags={"planted": note}, description=note)
    version = client.create_model_version("planted-model", model.artifact_location, run_id=rid,
                                          tags={"planted": note}, description=note, model_id=model.model_id)
    mv = f"model version planted-model/{version.version}"
    return {"experiment tag planted", f"{rid} param planted", f"{rid} artifact planted/notes.txt",
            f"logged model {model.model_id} param planted", f"logged model {model.model_id} tag planted",
            f"logged model {model.model_id} artifact notes.txt", "registered model planted-model tag planted",
            "registered model planted-model description", f"{mv} tag planted", f"{mv} description"}


def test_secret_scan_reads_every_place_mlflow_keeps_text(mlflow_server, tmp_path):
    """The scan of the end-to-end test below finds a secret in each place MLflow 3 keeps text, the logged models
    outside a run's artifacts included, and reports nothing before one is planted."""
    pipeline_user = add_mlflow_user(mlflow_server, "pipeline", tmp_path)
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    with mlflow_as(mlflow_server, pipeline_user) as client:
        exp_id = client.create_experiment(f"scan-{uuid.uuid4().hex[:8]}")
        clean = client.create_run(exp_id).info.run_id
        client.log_param(clean, "lr", "0.001")
        assert find_secrets(everything_logged(client, exp_id, tmp_path / "before"), [secret]) == []
        planted = plant_secret(client, exp_id, secret, tmp_path)
        found = find_secrets(everything_logged(client, exp_id, tmp_path / "after"), [secret])
    assert {f.rsplit(": ", 1)[0] for f in found} == planted


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_pipeline_with_credentials_runs_end_to_end_through_the_authenticated_server_and_logs_no_secret(
    mlflow_server, moto_server, s3_bucket, tmp_path
):
    """A short `pipelines/run.py` (the tiny quickstart of tests/test_pipeline.py, the dataset on S3) as a job
    runs it: MLflow credentials and S3 keys only in its environment, its experiment and model names taken for it by
    the admin (infra/mlflow/add_user.py). Its lineage is complete, and no secret reaches a param, tag, metric,
    dataset input, artifact, logged model, registered model or version, experiment tag, output file or its console."""
    import boto3

    from tests.helpers import tiny_later_stages, tiny_overrides

    pipeline_user = add_mlflow_user(mlflow_server, "pipeline", tmp_path, experiments=("secure-e2e",),
                                    models=("ldm-autoencoder", "ldm-unet"))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    fake_key_id = "AKIA" + "".join(alphabet[b % 32] for b in os.urandom(16))
    fake_secret_key = base64.b64encode(os.urandom(30)).decode()
    fake_session_token = base64.b64encode(os.urandom(48)).decode()
    secrets = [pipeline_user[1], fake_key_id, fake_secret_key, fake_session_token]

    data_uri = f"s3://{s3_bucket}/datasets/mnist"
    overrides = [*tiny_overrides(tmp_path, data_uri), *tiny_later_stages(), "data.source=mnist", "data.limit=96",
                 "data.shard_size=32", "run.name=secure", "mlflow.experiment=secure-e2e", "ray.num_cpus=2",
                 "stage_a.scaling.num_workers=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server["url"], MLFLOW_TRACKING_SERVER_CERT_PATH=str(mlflow_server["cert"]),
        MLFLOW_TRACKING_USERNAME=pipeline_user[0], MLFLOW_TRACKING_PASSWORD=pipeline_user[1],
        AWS_ACCESS_KEY_ID=fake_key_id, AWS_SECRET_ACCESS_KEY=fake_secret_key, AWS_SESSION_TOKEN=fake_session_token,
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=moto_server,
    )
    cmd = [sys.executable, str(REPO / "pipelines" / "run.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
           *[f"--set={o}" for o in overrides]]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=2700)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console.decode(errors="replace")[-5000:]

    with mlflow_as(mlflow_server, pipeline_user) as client:
        # Lineage: one parent run, every stage finished under it, each naming the run it consumed, back to the
        # dataset digest of the manifest on S3.
        exp_id = client.get_experiment_by_name("secure-e2e").experiment_id
        runs = {r.data.tags["stage"]: r for r in client.search_runs([exp_id])}
        assert set(runs) == {"pipeline", "prepare", "stage_a", "encode", "stage_b", "sample"}
        assert all(r.info.status == "FINISHED" for r in runs.values())
        assert {r.data.tags.get("mlflow.parentRunId") for s, r in runs.items() if s != "pipeline"} == {
            runs["pipeline"].info.run_id}
        ids = {s: r.info.run_id for s, r in runs.items()}
        assert runs["stage_a"].data.tags["upstream_run_ids"] == ids["prepare"]
        assert runs["encode"].data.tags["upstream_run_ids"] == ids["stage_a"]
        assert runs["stage_b"].data.tags["upstream_run_ids"] == f"{ids['encode']},{ids['stage_a']}"
        assert runs["sample"].data.tags["upstream_run_ids"] == ids["stage_b"]
        manifest = json.loads(boto3.client("s3", endpoint_url=moto_server).get_object(
            Bucket=s3_bucket, Key="datasets/mnist/manifest.json")["Body"].read())
        assert runs["prepare"].data.tags["dataset_digest"] == manifest["digest"]
        # The models the job registered, pinned by version, with the runs that made them.
        ae = client.get_model_version("ldm-autoencoder", "1")
        unet = client.get_model_version("ldm-unet", "1")
        assert ae.run_id == ids["stage_a"] and unet.run_id == ids["stage_b"]
        assert runs["encode"].data.tags["autoencoder_uri"] == "models:/ldm-autoencoder/1"
        assert runs["sample"].data.tags["unet_uri"] == "models:/ldm-unet/1"

        blobs = everything_logged(client, exp_id, tmp_path / "downloaded")
    blobs["console"] = console
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            blobs[f"output {f.relative_to(tmp_path)}"] = f.read_bytes()
    assert sum(" param " in k for k in blobs) > 50 and sum(" artifact " in k for k in blobs) > 10, sorted(blobs)[:20]
    # Stage A's and Stage B's models, logged with pyfunc.log_model(name=...), were read too.
    assert len({k.split()[2] for k in blobs if k.startswith("logged model ") and " artifact " in k}) >= 2, sorted(blobs)
    assert find_secrets(blobs, secrets) == []
    # The scan finds what it looks for: a secret planted in each kind of place it reads, through the same server.
    with mlflow_as(mlflow_server, pipeline_user) as client:
        planted = plant_secret(client, exp_id, fake_secret_key, tmp_path)
        found = find_secrets(everything_logged(client, exp_id, tmp_path / "again"), secrets)
    assert {f.rsplit(": ", 1)[0] for f in found} == planted and {f.rsplit(": ", 1)[1] for f in found} == {"secret #2"}


# --------------------------------------------------------------------------------------------------------
# GPU node types: what the configs ask for exists in infra/, and GPU nodes check their driver first
# --------------------------------------------------------------------------------------------------------


def _config_gpu_stages() -> list[tuple[str, str, object]]:
    from pipelines.config import load_config

    found = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        for stage in ("stage_a", "stage_b"):
            scaling = getattr(cfg, stage).scaling
            if scaling.use_gpu:
                found.append((path.name, stage, scaling))
    return found


def test_every_gpu_stage_of_the_configs_has_a_node_type_with_its_gpus_in_both_infras():
    """A config's `scaling.gpu_type` becomes Ray's `accelerator_type:<label>` resource on each worker: the AWS
    cluster and the KubeRay cluster must each declare a worker type carrying that label with at least one GPU
    per rank on a node (else the autoscaler never starts one and the stage waits until autoscaler_timeout_s)."""
    stages = _config_gpu_stages()
    assert stages
    aws = {}
    for name, t in load_cluster()["available_node_types"].items():
        for key in t["resources"]:
            if key.startswith("accelerator_type:"):
                aws[key.split(":", 1)[1]] = (name, t["resources"]["GPU"])
    ((_, cluster),) = objects_of_kind("RayCluster")
    k8s = {}
    for g in cluster["spec"]["workerGroupSpecs"]:
        declared = json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        for key in declared:
            if key.startswith("accelerator_type:"):
                k8s[key.split(":", 1)[1]] = (g["groupName"], gpus)
    for config, stage, scaling in stages:
        label = scaling.accelerator_type()
        for infra, types in (("infra/aws/cluster.yaml", aws), ("infra/k8s/raycluster.yaml", k8s)):
            assert label in types, f"{config} {stage}: gpu_type {scaling.gpu_type} has no node type in {infra}"
            node_type, gpus = types[label]
            if scaling.placement_strategy == "STRICT_PACK":  # all ranks on one node
                assert gpus >= scaling.num_workers * scaling.gpus_per_worker, (config, stage, infra, node_type)
            else:
                assert gpus >= scaling.gpus_per_worker, (config, stage, infra, node_type)


def test_gpu_pods_check_the_cuda_driver_before_ray_starts():
    """Every GPU worker group runs the image's torch first; without a usable GPU (here: none) it exits non-zero
    with one line naming the driver it needs."""
    ((_, cluster),) = objects_of_kind("RayCluster")
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) >= 2
    for g in gpu_groups:
        (init,) = g["template"]["spec"]["initContainers"]
        assert init["image"] == g["template"]["spec"]["containers"][0]["image"]
        assert init["resources"]["limits"]["nvidia.com/gpu"] == g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert init["command"][:2] == ["python", "-c"]
        done = subprocess.run([sys.executable, "-c", init["command"][2]], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "R580 or newer" in done.stderr

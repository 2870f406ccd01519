"""The cluster path as users run it, on real multi-node Ray clusters on this machine (Ray 2.60's default token
authentication on):

* an autoscaling cluster from zero: Ray's fake multi-node provider with worker types derived from
  infra/aws/cluster.yaml and a moto S3 server for everything, started by the very commands of infra/README.md's
  walkthrough: the whole DAG through `ray job submit`, one DDP rank per node (STRICT_SPREAD, gloo across raylets),
  then Stage A alone (preparing its dataset itself) with a worker node killed in its middle;
* what the drivers check before any work: local paths on a multi-node cluster, the CPU budget of a fixed-size
  cluster, the autoscaler's deadline.

Each `ray start` runs in a process group of its own, which the fixtures kill: `ray stop` would also take down
every other Ray on the machine (the session's local Ray among them).
"""

from __future__ import annotations

import os
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load

from pipelines.platform.cluster import ClusterError, StageNeeds, autoscaler_running, check_local_paths, ensure_resources
from pipelines.platform.runtime import PREEMPTION_WATCHER_ENV, TRAIN_POLL_ENV
from pipelines.config import load_config
from tests.conftest import free_port
from tests.helpers import REPO, tiny_later_stages, tiny_overrides

VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------
# What the drivers check before any work
# ---------------------------------------------------------------------------------------------------


def test_local_paths_are_refused_on_a_multi_node_or_autoscaling_cluster(tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"data.uri={tmp_path / 'data'}", "run.output_uri=s3://b/runs"])
    check_local_paths(cfg, num_nodes=1, autoscaling=False)  # one node: its disk is the only one
    with pytest.raises(ClusterError) as e:
        check_local_paths(cfg, num_nodes=3, autoscaling=False)
    assert str(e.value) == (f"data.uri={tmp_path / 'data'} is a local path but the cluster has 3 nodes: use s3:// or a "
                            f"shared filesystem (then set storage.shared_filesystem=true)")
    with pytest.raises(ClusterError, match=r"^data.uri=\S+ is a local path but the cluster has 1 node and an autoscaler"):
        check_local_paths(cfg, num_nodes=1, autoscaling=True)
    # run.storage_path is checked too (the default, under an s3:// output_uri, is remote).
    cfg = load_config(REPO / "configs/quickstart.yaml", ["data.uri=s3://b/data", "run.output_uri=s3://b/runs",
                                                         "run.storage_path=relative/ckpts"])
    with pytest.raises(ClusterError, match=r"^run.storage_path=/\S+/relative/ckpts is a local path"):
        check_local_paths(cfg, num_nodes=2, autoscaling=False)
    cfg.run.storage_path = "s3://b/ckpts"
    check_local_paths(cfg, num_nodes=3, autoscaling=True)
    shared = load_config(REPO / "configs/quickstart.yaml", ["storage.shared_filesystem=true"])
    check_local_paths(shared, num_nodes=3, autoscaling=True)


def test_a_fixed_size_cluster_still_fails_fast_on_the_cpu_budget(ray_local):
    """The test session's local Ray has 2 CPUs and no autoscaler: 4 x 0.5 CPU leaves Ray Data nothing."""
    cfg = load_config(REPO / "configs/quickstart.yaml", ["stage_a.scaling.num_workers=4"])
    assert not autoscaler_running()
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"CPU budget: stage_a.scaling.num_workers x stage_a.scaling.cpus_per_worker"):
        ensure_resources(cfg.stage_a.scaling, cfg.data, cfg.ray, section="stage_a")
    assert time.monotonic() - started < 5  # judged at once, no waiting
    # The quickstart's 2 x 0.5-CPU workers leave 1 of the 2 CPUs: the reader's unset CPU fields come back as halves
    fitted = ensure_resources(load_config(REPO / "configs/quickstart.yaml").stage_a.scaling, cfg.data, cfg.ray, section="stage_a")
    assert (cfg.data.cpus_per_task, fitted.cpus_per_task, fitted.reserved_cpus) == (None, 0.5, 0.5)
    assert StageNeeds.of(cfg.stage_a.scaling, cfg.data).describe() == "4 x {CPU: 0.5} for Train + 0.5 CPU for Ray Data"


# ---------------------------------------------------------------------------------------------------
# An autoscaling cluster from zero, started by infra/README.md's own walkthrough
# ---------------------------------------------------------------------------------------------------


def readme_block(name: str) -> str:
    """The bash block that follows `<!-- walkthrough:NAME -->` in infra/README.md."""
    text = (REPO / "infra" / "README.md").read_text()
    match = re.search(rf"<!-- walkthrough:{name} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"infra/README.md has no walkthrough:{name} block"
    return match.group(1)


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


@pytest.fixture
def autoscaling_cluster():
    """infra/README.md's setup block, run as written in a process group of its own: a moto S3 server, bucket
    `ldm`, and a fake multi-node head (0 CPUs) whose autoscaler may add the AWS config's worker types. Yields
    the ports, the directory, the environment the block exported, and helpers to query the cluster."""
    root = Path(tempfile.mkdtemp(prefix="ldmf", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ports = {"RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()), "S3_PORT": str(free_port())}
    # Ray Train's controller polls at Ray's default here, as on a real cluster (tests/conftest.py sets 0.5 s for the
    # local Rays), and its preemption watcher is on: a worker's report waits for the controller to take the one
    # before it, so the poll also paces Stage A's logged steps, and the node-loss test must kill a rank before the
    # last of them.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_", TRAIN_POLL_ENV, PREEMPTION_WATCHER_ENV))}
    # Ray's memory monitor judges the whole machine's memory, which other work on a shared CI box also uses: it
    # would kill this cluster's workers for the others' usage. The kernel's OOM killer still guards the machine.
    env.update(ports, LDM_FAKE=str(root), RAY_memory_monitor_refresh_ms="0")
    setup = subprocess.Popen(["bash", "-euc", readme_block("setup")], cwd=REPO, env=env, stdout=(root / "setup.log").open("wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert setup.wait(timeout=300) == 0, (root / "setup.log").read_text()[-4000:]
        exported = {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}", "RAY_AUTH_MODE": "token",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['S3_PORT']}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        cluster = FakeCluster(root, ports, exported)
        cluster.wait_for_autoscaler()
        cluster.wait_for_job_agent()
        yield cluster
    finally:
        _kill_group(setup.pid)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{ports['RAY_PORT']}"):
            current.unlink()
        shutil.rmtree(root, ignore_errors=True)


def _json_line(out: str):
    """The last line of a driver's stdout that is JSON (the autoscaler's events reach a driver's stdout too)."""
    return json.loads([line for line in out.splitlines() if line.startswith(("[", "{"))][-1])


class FakeCluster:
    def __init__(self, root: Path, ports: dict, env: dict):
        self.root, self.ports, self.env = root, ports, env
        self.gcs = f"127.0.0.1:{ports['RAY_PORT']}"
        self.dashboard = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"

    def python(self, code: str, timeout: float = 120) -> str:
        """Run `code` in a fresh Python attached to the cluster; returns its stdout."""
        done = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={self.gcs!r}, logging_level='ERROR')\n{code}"],
                              env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return done.stdout

    def nodes(self) -> list[dict]:
        """Every node the cluster has had: {"id", "alive", "head", "resources"}."""
        return _json_line(self.python(
            "import json; print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources'], "
            "'head': 'node:__internal_head__' in n['Resources']} for n in ray.nodes()]))"))

    def wait_for_autoscaler(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "True" in self.python("from pipelines.platform.cluster import autoscaler_running; print(autoscaler_running())"):
                return
            time.sleep(2)
        raise TimeoutError("the fake head's autoscaler never reported")

    def wait_for_job_agent(self, timeout: float = 120) -> None:
        """A head just started may answer "No available agent to submit job" for a few seconds."""
        deadline, out = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            done = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address",
                                   self.dashboard, "--", "true"],
                                  env=self.env, cwd=self.root, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                return
            out = done.stdout[-1000:] + done.stderr[-1000:]
            time.sleep(2)
        raise TimeoutError(f"the fake head never accepted a job: {out}")

    def submit(self, *overrides: str, script: str = "run.py", timeout: float = 1200, background: bool = False):
        """infra/README.md's submit block, run in the environment its setup block exported, with `script` in place
        of pipelines/run.py and extra `--set`s appended (they win over the block's own)."""
        submit = readme_block("submit").rstrip().replace("python pipelines/run.py", f"python pipelines/{script}")
        command = submit + "".join(f" --set {shlex.quote(o)}" for o in overrides)
        exports = "\n".join(line for line in readme_block("setup").splitlines() if line.startswith(("export ", ". ")))
        args = ["bash", "-euc", f"{exports}\n{command}"]
        env = {**self.env, "LDM_FAKE": str(self.root), **self.ports}
        if background:
            log = self.root / f"submit-{time.monotonic_ns()}.log"
            return subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                    start_new_session=True), log
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket="ldm", Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def mlflow(self) -> MlflowClient:
        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])


def _workers(nodes: list[dict]) -> set[str]:
    return {n["id"] for n in nodes if not n["head"]}


def _tiny_on_s3(prefix: str) -> list[str]:
    """The tiny quickstart of the other pipeline tests (all stages), with data, outputs and checkpoints under
    s3://ldm/PREFIX. The quickstart's max_failures (2) stays: on a cluster whose nodes come and go, a worker group
    restarted from its checkpoint is the product's behaviour, not a failure."""
    tiny = [o for o in tiny_overrides(Path("/unused"), "") + tiny_later_stages()
            if not o.startswith(("run.output_uri=", "data.uri=", "stage_a.train.max_failures=", "stage_b.train.max_failures="))]
    return tiny + [f"data.uri=s3://ldm/{prefix}/datasets/mnist", f"run.output_uri=s3://ldm/{prefix}/runs",
                   "data.source=mnist", "data.limit=96", "data.shard_size=32", f"run.name={prefix}",
                   "stage_a.scaling.placement_strategy=STRICT_SPREAD"]


@pytest.mark.slow
def test_readme_walkthrough_autoscales_from_zero_and_runs_the_whole_dag_on_s3(autoscaling_cluster):
    cluster = autoscaling_cluster
    assert [n["head"] for n in cluster.nodes()] == [True]  # min 0 workers: the head alone, with 0 CPUs

    # Without the token mode the Jobs API refuses us: the cluster really enforces authentication.
    no_auth = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", cluster.dashboard],
                             env=no_auth, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    # Before any work, on this cluster: a local path is one line and a failed job, and no node is launched for it.
    refused = cluster.submit("data.uri=outputs/datasets/mnist", timeout=300)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert re.search(r"error: data.uri=/\S+/outputs/datasets/mnist is a local path but the cluster has 1 node and an "
                     r"autoscaler that adds more: use s3:// or a shared filesystem", out), out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    # An infeasible request (no node type has 64 CPUs) gives up at the deadline, naming what never arrived; it is
    # withdrawn, and nothing was launched for it.
    timed_out = cluster.python(
        "from pipelines.platform.cluster import ClusterError, ensure_resources\n"
        "from pipelines.config.pipeline import load_config\n"
        "cfg = load_config('configs/quickstart.yaml', ['stage_a.scaling.cpus_per_worker=64', 'data.reserved_cpus=0',\n"
        "                                              'ray.autoscaler_timeout_s=4'])\n"
        "try:\n    ensure_resources(cfg.stage_a.scaling, cfg.data, cfg.ray, section='stage_a')\n"
        "except ClusterError as e:\n    print('ERROR', e)\n")
    assert "[stage_a] waiting for the autoscaler: need 2 x {CPU: 64} for Train (the cluster has 0 CPU)" in timed_out
    assert ("ERROR stage_a: the autoscaler did not provide 2 x {CPU: 64} for Train within ray.autoscaler_timeout_s=4 s: "
            "still missing {CPU: 128} (the cluster has 0 CPU)") in timed_out, timed_out
    assert _workers(cluster.nodes()) == set()

    started = time.monotonic()
    done = cluster.submit(*_tiny_on_s3("dag"))
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-12000:]
    assert "[stage_a] waiting for the autoscaler: need 2 x {CPU: 0.5} for Train + 0.5 CPU for Ray Data" in out, out[-6000:]
    assert "[stage_a] the autoscaler provided it" in out, out[-6000:]
    launched = _workers(cluster.nodes())
    print(f"DAG on the autoscaling cluster: {seconds:.0f} s, {len(launched)} worker node(s) launched")
    assert len(launched) >= 2

    # Lineage, read back from the tags alone: sample -> stage_b -> encode -> stage_a -> prepare, all finished.
    client = cluster.mlflow()
    match = re.search(r"\[sample\] ran +[\d.]+s +run (\w+)", out)
    assert match, out[-6000:]
    runs, run = {}, client.get_run(match.group(1))
    while run is not None:
        assert run.info.status == "FINISHED", run.data.tags["stage"]
        runs[run.data.tags["stage"]] = run
        upstream = run.data.tags.get("upstream_run_ids", "")
        run = client.get_run(upstream.split(",")[0]) if upstream else None
    assert list(runs) == ["sample", "stage_b", "encode", "stage_a", "prepare"]
    assert client.get_run(runs["stage_a"].data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
    # Stage A's two DDP ranks ran on two of the nodes the autoscaler launched.
    train_nodes = set(runs["stage_a"].data.tags["train_nodes"].split(","))
    assert len(train_nodes) == 2 and train_nodes <= launched

    # Everything landed on S3: the dataset, both stages' checkpoints, the latents, the samples, MLflow's artifacts.
    for prefix in ("dag/datasets/mnist/manifest.json", "dag/runs/checkpoints/", "dag/runs/latents/", "dag/runs/samples/",
                   "dag/runs/mlartifacts/"):
        assert cluster.keys(prefix), f"nothing under s3://ldm/{prefix}"
    assert any("-stage_a/checkpoint_" in k for k in cluster.keys("dag/runs/checkpoints/"))
    assert any("-stage_b/checkpoint_" in k for k in cluster.keys("dag/runs/checkpoints/"))


def _raylet_pid(node_id: str, root: Path) -> int:
    """The raylet of one node of the fake cluster rooted at `root` (its command line names both)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if args and args[0].endswith("/raylet") and f"--node_id={node_id}" in args and any(str(root) in a for a in args):
            return int(proc.name)
    raise LookupError(f"no raylet for node {node_id}")


@pytest.mark.slow
def test_a_worker_node_lost_in_the_middle_of_stage_a_restarts_the_group_on_the_survivors(autoscaling_cluster):
    """Stage A alone (it prepares its data) on the autoscaling cluster, scaled to three worker nodes first; once a
    checkpoint is on S3, the raylet of a node holding a DDP rank is SIGKILLed. Ray Train restarts the group on the
    nodes left, from the last checkpoint; the final step is exact and Adam's own step counter says no update ran
    twice. (The cluster is scaled up beforehand because Ray's fake provider never replaces a node whose raylet died
    behind its back: it keeps it as a pending node of its type. A cloud provider reports the reclaimed instance,
    and the autoscaler replaces it.)"""
    cluster = autoscaling_cluster
    cluster.python("from ray.autoscaler.sdk import request_resources\n"
                   "request_resources(bundles=[{'CPU': 1, 'GPU': 1}] * 2 + [{'CPU': 2}])")
    deadline = time.monotonic() + 300
    while len([n for n in cluster.nodes() if n["alive"] and not n["head"]]) < 3:
        assert time.monotonic() < deadline, cluster.nodes()
        time.sleep(2)
    max_steps = 16
    # The reader's tasks take half a CPU, as they would on a cluster of 1-CPU nodes: left unset, Stage A picks whole
    # CPUs for the 3 CPUs its ranks leave free, and when the lost node is the 2-CPU one, no survivor has a whole CPU
    # free, and the fake provider (see above) never brings a node back: the restarted ranks waited for data forever.
    job, log = cluster.submit(*_tiny_on_s3("nodeloss"), f"stage_a.train.max_steps={max_steps}",
                              "stage_a.train.checkpoint_every=2", "stage_a.train.max_failures=3", "data.cpus_per_task=0.5",
                              script="stage_a.py", background=True)
    try:
        deadline = time.monotonic() + 900
        while not any("/checkpoint_" in k for k in cluster.keys("nodeloss/runs/checkpoints/nodeloss-stage_a/")):
            assert job.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.5)
        ranks = _json_line(cluster.python(
            "import json\nfrom ray.util.state import list_actors\n"
            f"print(json.dumps(sorted({{a.node_id for a in list_actors(address='{cluster.dashboard}', filters=["
            "('class_name', '=', 'RayTrainWorker'), ('state', '=', 'ALIVE')])})))"))
        assert len(ranks) == 2, ranks
        # The rank on the node with the most CPUs: the most the survivors lose (the 2-CPU node when a rank is on it).
        cpus = {n["id"]: n["resources"].get("CPU", 0) for n in cluster.nodes()}
        lost = max(ranks, key=lambda node: (cpus[node], node))
        os.kill(_raylet_pid(lost, cluster.root), signal.SIGKILL)
        assert job.wait(timeout=900) == 0, log.read_text()[-12000:]
    finally:
        if job.poll() is None:
            _kill_group(job.pid)
    out = log.read_text()
    nodes = cluster.nodes()
    assert not next(n for n in nodes if n["id"] == lost)["alive"]

    assert "has no manifest.json: preparing it from data.source=mnist" in out, out[-4000:]  # stage_a.py alone
    run_id = re.search(r"stage_a finished: run (\w+)", out).group(1)
    client = cluster.mlflow()
    run = client.get_run(run_id)
    prepare = client.get_run(run.data.tags["upstream_run_ids"])
    assert prepare.data.tags["stage"] == "prepare" and prepare.info.status == "FINISHED"
    assert prepare.data.tags["dataset_digest"] == run.data.tags["dataset_digest"]
    resumed = [m.value for m in client.get_metric_history(run_id, "train/resumed_from_step")]
    assert resumed and all(0 < step < max_steps and step % 2 == 0 for step in resumed), resumed
    train_nodes = set(run.data.tags["train_nodes"].split(","))
    assert len(train_nodes) == 2 and lost not in train_nodes, (train_nodes, ranks)
    # The final checkpoint, read from S3: the exact step, and Adam's counter = max_steps (no step applied twice).
    ckpt = run.data.tags["checkpoint"]  # bucket/key of the checkpoint directory
    bucket, key = ckpt.split("/", 1)
    s3 = cluster.s3()
    assert json.loads(s3.get_object(Bucket=bucket, Key=f"{key}/meta.json")["Body"].read())["step"] == max_steps
    adam = load(s3.get_object(Bucket=bucket, Key=f"{key}/opt_g.safetensors")["Body"].read())
    assert {float(v) for k, v in adam.items() if k.endswith(".step")} == {float(max_steps)}

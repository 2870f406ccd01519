"""A real multi-node Ray cluster on this machine: `ray start --head` plus a second `ray start` node, both on
127.0.0.1, with Ray 2.60's default token authentication. Stage A goes in through `ray job submit`, with one
DDP worker per node (STRICT_SPREAD), so the multi-node path (gloo across raylets) runs for real.

Each `ray start --block` runs in its own process group, which the fixture kills: `ray stop` would also
take down every other Ray on the machine (the session's local Ray among them).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, wait_for_port
from tests.helpers import REPO, tiny_overrides

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--block", *args], env=env, cwd=REPO,
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, moto_server):
    tmp = tmp_path_factory.mktemp("cluster")
    gcs_port, dash_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is the venv's
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    head = _start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true"],
                  env, tmp / "head.log")
    nodes, worker_tmp = [head], None
    try:
        wait_for_port(dash_port, timeout=120, proc=head)
        # Its own temp dir: two nodes sharing one machine's /tmp/ray would also share (and garbage-collect)
        # each other's unpacked job working directories.
        worker_tmp = tempfile.mkdtemp(prefix="rayw", dir="/tmp")
        worker = _start([f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                         f"--temp-dir={worker_tmp}"], env, tmp / "worker.log")
        nodes.append(worker)
        _wait_for_nodes(env, gcs_port, 2)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash_port}", "tmp": tmp}
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        if worker_tmp:
            shutil.rmtree(worker_tmp, ignore_errors=True)
        # `ray start` records the head for `ray.init(address="auto")`; killed by PID, nobody else clears it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()


def _wait_for_nodes(env: dict, gcs_port: int, count: int, timeout: float = 120) -> None:
    code = f"import ray; ray.init(address='127.0.0.1:{gcs_port}'); print('alive', sum(n['Alive'] for n in ray.nodes()))"
    deadline, out = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        if f"alive {count}" in out.stdout:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster did not reach {count} live nodes: {out.stdout[-500:]} {out.stderr[-2000:]}")


def test_ray_job_submit_runs_the_dag_with_one_stage_a_worker_per_node(two_node_cluster, tmp_path):
    """`ray job submit -- python pipelines/run.py ...`: the DAG driver runs as a Ray job, prepares the shards
    and trains Stage A with its two DDP ranks on two different nodes."""
    env = two_node_cluster["env"]
    overrides = tiny_overrides(tmp_path, str(tmp_path / "data" / "mnist")) + [
        "data.source=mnist", "data.limit=96", "data.shard_size=32", "stage_a.scaling.placement_strategy=STRICT_SPREAD"]
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", two_node_cluster["dashboard"],
           "--runtime-env", "infra/runtime_env.yaml", "--",
           "python", "pipelines/run.py", "--config", "configs/quickstart.yaml", "--until", "stage_a"]
    for item in overrides:
        cmd += ["--set", item]

    # Without the token mode the Jobs API refuses us: the cluster really enforces authentication.
    # (`ray job list` rather than a refused submit, which would upload the same working-dir package.)
    no_auth = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", two_node_cluster["dashboard"]],
                             env=no_auth, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()

    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-12000:]
    assert re.search(r"\[prepare\] ran ", out), out[-4000:]
    match = re.search(r"\[stage_a\] ran +[\d.]+s +run (\w+)", out)
    assert match, out[-4000:]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(match.group(1))
    assert run.info.status == "FINISHED"
    assert len(run.data.tags["train_nodes"].split(",")) == 2  # one DDP rank on each node
    assert "eval/psnr" in run.data.metrics

"""Shared fixtures: a real S3 API server (moto) on 127.0.0.1, a local MLflow SQLite store, a local Ray.

Nothing here is a mock: moto_server speaks the S3 REST protocol over HTTP, MLflow writes a real SQLite
store, and Ray starts a real (single-node, 2-CPU) cluster in a fresh session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the network: make Hugging Face and friends fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# The local Rays the tests start (ray_local, the drivers' own) poll their Train workers as a driver's local Ray does
# (pipelines.platform.runtime.init_ray): a stage's end is seen in 0.5 s, not 2 s, and a worker's next report no
# longer waits up to 2 s for the controller to take the last one; and without Ray Train's preemption watcher (no
# node of a local Ray is drained). The autoscaling clusters of test_cluster.py keep Ray's defaults, as real clusters do.
from pipelines.platform.runtime import set_local_train_defaults  # noqa: E402

set_local_train_defaults()
# The tests' `mlflow server`s run no jobs: without this each starts a pool of 7 job-runner processes (as
# infra/mlflow/serve.sh's default does too).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def _raise_open_files_limit() -> None:
    """Ray's servers and this process's GCS clients need more than the common default of 1024 open files; Ray
    raises the soft limit in `ray.init` too, but only the processes started after that inherit it."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= 65536:
        return
    try:  # above the hard limit too where allowed (root)
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


_raise_open_files_limit()

# A whole-suite deadline (seconds, from the first test), for CI: once passed, the session stops before the next
# test and pytest prints its summary of what failed so far, instead of being killed without one.
SUITE_DEADLINE_S = float(os.environ.get("LDM_SUITE_DEADLINE_S", "0") or 0)
_SUITE_STARTED = time.monotonic()


def pytest_runtest_setup(item):
    if SUITE_DEADLINE_S and time.monotonic() - _SUITE_STARTED > SUITE_DEADLINE_S:
        pytest.exit(f"LDM_SUITE_DEADLINE_S={SUITE_DEADLINE_S:g} passed before {item.nodeid}", returncode=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A real S3 API server (moto) on 127.0.0.1:<free port>. Yields its endpoint URL.

    Sets the standard AWS variables for the whole session (keys 'testing'), so s3fs, pyarrow and boto3 in
    this process and in Ray workers started afterwards all talk to it. Its access log (every request it served)
    is MOTO_LOGS[endpoint], read through the `s3_requests` fixture.
    """
    from tests.helpers import start_moto_server

    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, endpoint = start_moto_server(log_path)
    MOTO_LOGS[endpoint] = log_path
    try:
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)


MOTO_LOGS: dict[str, Path] = {}


@pytest.fixture
def s3_requests(moto_server):
    """The requests the moto server serves from now on (`tests.helpers.S3RequestLog`, already marked)."""
    from tests.helpers import S3RequestLog

    log = S3RequestLog(MOTO_LOGS[moto_server])
    log.mark()
    return log


@pytest.fixture
def s3_bucket(moto_server):
    """A fresh, empty bucket on the moto server. Yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def _new_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made and nothing in it: MLflow's migrations take 3-6 s per new
    store here, a copy of this file a few milliseconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-new") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, _new_mlflow_db):
    """A fresh local MLflow tracking store (SQLite + local artifacts), exported as MLFLOW_TRACKING_URI."""
    shutil.copyfile(_new_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def ray_local(moto_server):
    """A real local Ray cluster (2 CPUs), shared by the tests that run Ray jobs in-process. With its dashboard, as
    a driver's local Ray: Ray Train's placement-group cleaner asks the state API, which the dashboard serves.

    It depends on moto_server so that the AWS variables are set before Ray starts: its workers inherit them.
    """
    import ray

    from pipelines.platform.runtime import local_system_config

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        log_to_driver=True,
        _system_config=local_system_config(2),
    )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two cores shared by the test process and Ray workers: torch's own thread pool only thrashes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

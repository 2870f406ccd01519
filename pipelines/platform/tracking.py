"""MLflow plumbing shared by every stage: which store, which experiment, run tags, params and images.

Only the driver and rank 0 of a Train worker group ever call into MLflow. Workers get the run id and
tracking URI through `train_loop_config` and log with an explicit `MlflowClient`, never with the
process-global "active run" (which would not exist in a worker process).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines.config.sections import HTTP_USERINFO, MlflowSection, mask_http_userinfo

log = logging.getLogger(__name__)

# Tag names of the lineage contract (see README "Lineage").
TAG_STAGE = "stage"
TAG_UPSTREAM = "upstream_run_ids"
TAG_PIPELINE = "pipeline_run"
TAG_CACHE_KEY = "cache_key"

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def tracking_uri(cfg: MlflowSection) -> str:
    """MLFLOW_TRACKING_URI when set, else the config's store. Credentials inside the variable's URI are refused
    as they are in the config (the URI travels to every Train worker and into logs)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if HTTP_USERINFO.match(uri):
        raise ConfigError(f"MLFLOW_TRACKING_URI={mask_http_userinfo(uri)} must not carry credentials (user:password@): "
                          "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
    return uri


def setup(cfg: MlflowSection, output_uri: str) -> str:
    """Point MLflow at the store and make sure the experiment exists. Returns the experiment id."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        # Two drivers starting on a new store at once would both run its schema migrations and one would fail:
        # the client (whose store creates the tables) is made under a lock file next to the database.
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            client = MlflowClient(uri)
    else:
        client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        mlflow.set_experiment(cfg.experiment)
        return exp.experiment_id
    location = cfg.artifact_location
    if location is None and not uri.startswith(("http://", "https://", "databricks")):
        location = f"{output_uri.rstrip('/')}/mlartifacts"
        if "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
    try:
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        exp_id = client.get_experiment_by_name(cfg.experiment).experiment_id  # created concurrently
    mlflow.set_experiment(cfg.experiment)
    return exp_id


def redact(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", value)
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; values under secret-looking keys and URL credentials are redacted."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        elif _SECRET_KEY.search(str(key)):
            out[path] = "***"
        else:
            out[path] = redact(value)
    return out


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                timestamp_ms: int | None = None) -> None:
    """Log finite metrics at `step`, stamped `timestamp_ms` (when they were measured; default now)."""
    now = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(float(v))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_image(client: MlflowClient, run_id: str, image: np.ndarray, artifact_file: str) -> None:
    """Log an HWC uint8 image as a PNG artifact."""
    client.log_image(run_id, image, artifact_file=artifact_file)


def tensor_grid_to_uint8(grid) -> np.ndarray:
    """A CHW tensor in [-1, 1] -> HWC uint8."""
    arr = ((grid.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return np.transpose(arr, (1, 2, 0))


def find_runs(experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
    return MlflowClient().search_runs(
        [experiment_id], filter_string=filter_string, order_by=order_by or ["attributes.start_time DESC"]
    )


def latest_output(experiment_id: str, stage: str, tag: str) -> str | None:
    """The value of `tag` (an output such as `model_uri` or `latents_uri`) on the latest finished `stage` run
    that has it; None when there is none."""
    runs = find_runs(experiment_id, f"tags.{TAG_STAGE} = '{stage}' and attributes.status = 'FINISHED'",
                     order_by=["attributes.end_time DESC"])
    return next((run.data.tags[tag] for run in runs if run.data.tags.get(tag)), None)


def unfinished_training_run(experiment_id: str, trainer_name: str) -> str | None:
    """The MLflow run of an interrupted training (failed, killed, or left running by a dead driver) with this
    Ray Train name (tag `ray_train_name`), to resume logging into it."""
    runs = find_runs(experiment_id, f"tags.ray_train_name = '{trainer_name}' and attributes.status != 'FINISHED'")
    return runs[0].info.run_id if runs else None


@contextmanager
def stage_run(
    *,
    experiment_id: str,
    stage: str,
    run_name: str,
    upstream_run_ids: list[str] | tuple[str, ...] = (),
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) one stage's MLflow run with the lineage tags every stage carries."""
    all_tags = {TAG_STAGE: stage, TAG_UPSTREAM: ",".join(upstream_run_ids)}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags[TAG_PIPELINE] = parent_run_id
    all_tags.update(tags or {})
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags(all_tags)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags)
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_dataset_input(uri: str, name: str, digest: str, context: str) -> None:
    """Record a dataset (shards or latents) as an input of the active run: its URI and content digest."""
    from pathlib import Path

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(uri if "://" in uri else Path(uri).as_uri())
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest[:36]), context=context)

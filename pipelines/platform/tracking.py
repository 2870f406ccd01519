"""MLflow plumbing shared by every stage: which store, which experiment, run tags, params and images.

Only the driver and rank 0 of a Train worker group ever call into MLflow. Workers get the run id and
tracking URI through `train_loop_config` and log with an explicit `MlflowClient`, never with the
process-global "active run" (which would not exist in a worker process).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines.config.sections import HTTP_USERINFO, MlflowSection, absolute_sqlite_uri, mask_http_userinfo

log = logging.getLogger(__name__)

# Tag names of the lineage contract (see README "Lineage").
TAG_STAGE = "stage"
TAG_UPSTREAM = "upstream_run_ids"
TAG_PIPELINE = "pipeline_run"
TAG_CACHE_KEY = "cache_key"
TAG_DESCRIPTION = "mlflow.note.content"
"""A run's description in the MLflow UI."""
TAG_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's UI opens an experiment without this tag on its GenAI traces page; model training opens on its runs."""

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def tracking_uri(cfg: MlflowSection) -> str:
    """MLFLOW_TRACKING_URI when set, else the config's store. Credentials inside the variable's URI are refused
    as they are in the config (the URI travels to every Train worker and into logs). A relative sqlite path in the
    variable is made absolute against the working directory, as the config's is at load time: Train workers and
    encode actors run in other directories, and would otherwise open (and create) another store."""
    uri = absolute_sqlite_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri)
    if HTTP_USERINFO.match(uri):
        raise ConfigError(f"MLFLOW_TRACKING_URI={mask_http_userinfo(uri)} must not carry credentials (user:password@): "
                          "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
    return uri


class TrackingUnreachable(ConfigError):
    """The MLflow tracking server named by the config or MLFLOW_TRACKING_URI does not accept connections."""


def check_reachable(cfg: MlflowSection) -> None:
    """An http(s) tracking server must accept a connection (5 s), checked before anything starts: a refused or
    unroutable address fails in seconds with one line, not after MLflow's retries."""
    check_reachable_uri(tracking_uri(cfg))


def check_reachable_uri(uri: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as e:
        raise TrackingUnreachable(f"MLflow tracking server {mask_http_userinfo(uri)} is unreachable "
                                  f"({e.strerror or type(e).__name__}): start it, or point MLFLOW_TRACKING_URI "
                                  f"(or mlflow.tracking_uri) at one that runs") from None


def store_absent(uri: str) -> bool:
    """A local SQLite store whose file does not exist yet. Opening it would create it, so a lookup that must write
    nothing (`--plan`, the `--from` check) treats it as an empty store instead."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


STORES_FILE = "stores.json"
"""Under a local `run.output_uri`: the MLflow stores that have written into it (what `run.py --clean` consults)."""


def known_stores(output_uri: str) -> list[str]:
    path = Path(output_uri) / STORES_FILE
    return json.loads(path.read_text()) if "://" not in output_uri and path.is_file() else []


def _record_store(uri: str, output_uri: str) -> None:
    if "://" in output_uri or uri in (stores := known_stores(output_uri)):
        return
    Path(output_uri).mkdir(parents=True, exist_ok=True)
    (Path(output_uri) / STORES_FILE).write_text(json.dumps(stores + [uri], indent=1) + "\n")


def setup(cfg: MlflowSection, output_uri: str) -> str:
    """Point MLflow at the store and make sure the experiment exists (recording the store under a local
    `output_uri`, `known_stores`). Returns the experiment id."""
    uri = tracking_uri(cfg)
    check_reachable(cfg)
    # A driver's calls to a server that stops answering: MLflow's defaults (7 retries, backoff factor 2) retry for
    # about 4.5 minutes; 4 with factor 1 ride out about 15 s of a restarting server. A user's own settings win (and
    # a Train worker's logger sets its own, pipelines/train/run_logger.py).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    _record_store(uri, output_uri)
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
        if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        mlflow.set_experiment(cfg.experiment)
        return exp.experiment_id
    location = cfg.artifact_location
    if location is None and not uri.startswith(("http://", "https://", "databricks")):
        location = f"{output_uri.rstrip('/')}/mlartifacts"
        if "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).resolve().as_uri()
    try:
        exp_id = client.create_experiment(cfg.experiment, artifact_location=location,
                                          tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
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


def make_grid(images, nrow: int = 8, padding: int = 2, pad_value: float = 0.0):
    """(N, C, H, W) images tiled `nrow` to a row into one (3 or C, H', W') tensor, `padding` pixels of `pad_value`
    around each: torchvision.utils.make_grid's layout (one-channel images come out as three equal channels, a
    single image as itself), without importing torchvision (~3 s per process, in every Train worker)."""
    if images.dim() == 4 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for i in range(n):
        top, left = (i // cols) * cell_h + padding, (i % cols) * cell_w + padding
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


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
    all_tags = {TAG_STAGE: stage, TAG_UPSTREAM: ",".join(upstream_run_ids),
                TAG_DESCRIPTION: f"The `{stage}` stage of the latent-diffusion pipeline (`pipelines/{stage}`). "
                                 f"Upstream runs: {', '.join(upstream_run_ids) or 'none'}; "
                                 f"`python pipelines/lineage.py RUN_ID` prints the chain back to the dataset."}
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

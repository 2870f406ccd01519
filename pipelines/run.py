"""The whole pipeline as a small declarative DAG: prepare -> stage_a -> encode -> stage_b -> sample.

    python pipelines/run.py --config configs/quickstart.yaml [--set ...] [--from S] [--until S] [--force S]
    ray job submit --working-dir . -- python pipelines/run.py --config configs/quickstart.yaml

Each node is one of the standalone entry points (`pipelines/prepare_data.py`, `stage_a.py`,
`encode_latents.py`, `stage_b.py`, `sample.py`), so an external orchestrator (Airflow, Argo, a KubeRay
RayJob) can call them one by one instead. The state lives in MLflow:

* every node has a cache key: its resolved config section(s) + the keys of its inputs + the dataset digest
  + the project version. A finished run with the same key (tag `cache_key`) is reused and nothing runs;
* an unfinished run with the same key is resumed (training resumes from its last Ray Train checkpoint,
  because the Ray Train run name carries the key);
* one parent run per invocation; every stage run carries `stage` and `upstream_run_ids` tags.

`--from S`: stages before S are taken from the cache only (never executed; missing ones are an error).
`--until S`: stop after S. `--force S`: ignore the cache for S and everything downstream of it.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines import tracking
from pipelines.config import PipelineConfig, parse_cli
from pipelines.runtime import init_ray, setup_logging

log = logging.getLogger("pipeline")

STAGES = ("prepare", "stage_a", "encode", "stage_b", "sample")


@dataclass
class NodeOutcome:
    """What one node produced: its MLflow run, its outputs (URIs) and metrics, and what happened."""

    stage: str
    status: str  # "ran", "resumed", "reused", "skipped"
    run_id: str | None
    cache_key: str
    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Node:
    stage: str
    inputs: tuple[str, ...]  # the stages whose outputs it consumes: its cache key's inputs and its upstream_run_ids
    sections: Callable[[PipelineConfig], dict]  # the config this node's result depends on
    run: Callable[..., NodeOutcome]  # (cfg, ctx) -> outcome


# ---------------------------------------------------------------------------------------------------
# Cache keys and MLflow lookups
# ---------------------------------------------------------------------------------------------------


def project_version() -> str:
    try:
        return package_version("ldm-pipeline")
    except Exception:  # not installed (e.g. a bare working dir on a cluster)
        return "unknown"


def cache_key(stage: str, sections: dict, input_keys: list[str], dataset_digest: str) -> str:
    payload = json.dumps(
        {"stage": stage, "config": sections, "inputs": input_keys, "dataset": dataset_digest, "version": project_version()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def find_finished_run(experiment_id: str, stage: str, key: str, upstream: tuple[str, ...] | None = None):
    """The newest finished run of `stage` with this cache key. With `upstream`, only a run that consumed exactly
    those upstream runs counts: after `--force` re-trained a stage under the same key, the stages below it are
    not reused from runs that consumed the older output."""
    query = f"tags.stage = '{stage}' and tags.cache_key = '{key}' and attributes.status = 'FINISHED'"
    if upstream is not None:
        query += f" and tags.{tracking.TAG_UPSTREAM} = '{','.join(upstream)}'"
    runs = tracking.find_runs(experiment_id, query)
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------------
# The nodes: thin adapters from the DAG to each stage's Python API
# ---------------------------------------------------------------------------------------------------


# Stages reused only from a run that consumed the very upstream runs chosen now. (Stage A's input, the
# dataset, is already in every key as its digest; its prepare run may be absent or recreated.)
LINEAGE_CHECKED = ("encode", "stage_b", "sample")


@dataclass
class Context:
    cfg: PipelineConfig
    experiment_id: str
    parent_run_id: str
    outcomes: dict[str, NodeOutcome]
    node: Node
    key: str
    forced: bool = False

    def upstream(self) -> tuple[str, ...]:
        """The run ids this node consumes (its `upstream_run_ids` tag), from this invocation's outcomes."""
        return tuple(o.run_id for s in self.node.inputs if (o := self.outcomes.get(s)) and o.run_id)

    def tags(self) -> dict:
        return {tracking.TAG_CACHE_KEY: self.key}

    def keyed_cfg(self) -> PipelineConfig:
        """The config with a run name that carries the cache key: Ray Train resumes only matching runs.
        A forced node gets a fresh name, so it trains from scratch instead of resuming."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.run.name = f"{self.cfg.run.name}-{self.key[:8]}" + (f"-forced{int(time.time())}" if self.forced else "")
        return cfg


def run_prepare(ctx: Context) -> NodeOutcome:
    from pipelines.data import prepare_dataset, read_manifest
    from pipelines.storage import exists, resolve

    cfg = ctx.cfg
    manifest_loc = resolve(cfg.data.uri, cfg.storage).join("manifest.json")
    if exists(manifest_loc):
        manifest = read_manifest(cfg.data.uri, cfg.storage)
        # Shards already there: nothing to do. Link to the prepare run that built them, if MLflow knows it.
        prior = tracking.find_runs(
            ctx.experiment_id, f"tags.stage = 'prepare' and tags.dataset_digest = '{manifest['digest']}'"
        )
        return NodeOutcome("prepare", "skipped", prior[0].info.run_id if prior else None, ctx.key,
                           outputs={"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})
    if not cfg.data.source:
        raise ConfigError(f"data.uri={cfg.data.uri} has no manifest.json and data.source is not set, so there is nothing to prepare")
    with tracking.stage_run(experiment_id=ctx.experiment_id, stage="prepare", run_name=f"{cfg.run.name}-prepare",
                            parent_run_id=ctx.parent_run_id, tags=ctx.tags()) as run:
        manifest = prepare_dataset(
            cfg.data.source, cfg.data.uri, fmt=cfg.data.format, shard_size=cfg.data.shard_size,
            resolution=cfg.data.prepare_resolution, limit=cfg.data.limit, seed=cfg.run.seed, storage=cfg.storage,
        )
        mlflow.set_tags({"dataset_uri": cfg.data.uri, "dataset_digest": manifest["digest"]})
        mlflow.log_metrics({"samples": manifest["num_samples"], "shards": len(manifest["shards"])})
        return NodeOutcome("prepare", "ran", run.info.run_id, ctx.key,
                           outputs={"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})


def run_stage_a_node(ctx: Context) -> NodeOutcome:
    from pipelines.stage_a import run_stage_a

    result = run_stage_a(ctx.keyed_cfg(), parent_run_id=ctx.parent_run_id,
                         upstream_run_ids=ctx.upstream(), extra_tags=ctx.tags())
    return NodeOutcome("stage_a", "resumed" if result.resumed else "ran", result.run_id, ctx.key,
                       outputs={"model_uri": result.model_uri}, metrics=result.metrics)


def run_encode_node(ctx: Context) -> NodeOutcome:
    from pipelines.encode_latents import run_encode

    cfg = ctx.keyed_cfg()
    cfg.encode.autoencoder_uri = ctx.outcomes["stage_a"].outputs["model_uri"]
    result = run_encode(cfg, parent_run_id=ctx.parent_run_id, upstream_run_ids=ctx.upstream(), extra_tags=ctx.tags())
    return NodeOutcome("encode", "reused" if result.reused else "ran", result.run_id, ctx.key,
                       outputs={"latents_uri": result.latents_uri}, metrics=result.metrics)


def run_stage_b_node(ctx: Context) -> NodeOutcome:
    from pipelines.stage_b import run_stage_b

    cfg = ctx.keyed_cfg()
    cfg.stage_b.latents_uri = ctx.outcomes["encode"].outputs["latents_uri"]
    result = run_stage_b(cfg, parent_run_id=ctx.parent_run_id, upstream_run_ids=ctx.upstream(), extra_tags=ctx.tags())
    return NodeOutcome("stage_b", "resumed" if result.resumed else "ran", result.run_id, ctx.key,
                       outputs={"model_uri": result.model_uri}, metrics=result.metrics)


def run_sample_node(ctx: Context) -> NodeOutcome:
    from pipelines.sample import run_sample

    cfg = ctx.keyed_cfg()
    cfg.sample.unet_uri = ctx.outcomes["stage_b"].outputs["model_uri"]
    result = run_sample(cfg, parent_run_id=ctx.parent_run_id, upstream_run_ids=ctx.upstream(), extra_tags=ctx.tags())
    return NodeOutcome("sample", "ran", result.run_id, ctx.key, outputs={"out_dir": str(result.out_dir)},
                       metrics=result.metrics)


def _sections(*paths: str) -> Callable[[PipelineConfig], dict]:
    def pick(cfg: PipelineConfig) -> dict:
        dumped = cfg.model_dump(mode="json")
        out = {}
        for path in paths:
            node = dumped
            for part in path.split("."):
                node = node[part]
            out[path] = node
        return out

    return pick


# The data section matters to Stage A (resolution, crops, batch size), not to the later stages, which only
# see the data through the nodes they consume. run.seed matters to every node that draws random numbers.
DAG: tuple[Node, ...] = (
    Node("prepare", (), _sections("data.source", "data.format", "data.shard_size", "data.prepare_resolution", "data.limit", "run.seed"), run_prepare),
    Node("stage_a", ("prepare",), _sections("stage_a", "data", "run.seed"), run_stage_a_node),
    Node("encode", ("stage_a",), _sections("encode.text_encoder", "encode.output_uri", "data.resolution", "data.holdout_fraction"), run_encode_node),
    Node("stage_b", ("encode", "stage_a"), _sections("stage_b", "sample.prompts", "run.seed"), run_stage_b_node),
    Node("sample", ("stage_b",), _sections("sample"), run_sample_node),
)


# ---------------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------------


def _restore(node: Node, run, key: str) -> NodeOutcome:
    tags, metrics = run.data.tags, run.data.metrics
    outputs = {k: tags[k] for k in ("model_uri", "latents_uri", "out_dir", "dataset_uri") if k in tags}
    return NodeOutcome(node.stage, "reused", run.info.run_id, key, outputs=outputs, metrics=dict(metrics))


TAG_DRIVER_HOST = "driver_host"
TAG_DRIVER_PID = "driver_pid"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def close_dead_pipelines(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the pipeline runs still RUNNING whose driver process on this host is gone (SIGKILL, OOM,
    a closed terminal), with their unfinished stage runs; so the UI does not show them running forever.
    An interrupted stage is still resumed by the next run (it looks for any unfinished run). Drivers on
    other hosts cannot be checked from here and are left alone. Returns the ids of the parent runs closed."""
    host = socket.gethostname()
    closed = []
    for run in tracking.find_runs(experiment_id, f"tags.{tracking.TAG_STAGE} = 'pipeline' and attributes.status = 'RUNNING' "
                                                 f"and tags.{TAG_DRIVER_HOST} = '{host}'"):
        pid = run.data.tags.get(TAG_DRIVER_PID, "")
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        children = tracking.find_runs(experiment_id, f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                     "and attributes.status = 'RUNNING'")
        for child in children:
            client.set_terminated(child.info.run_id, status="KILLED")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("pipeline run %s: its driver (pid %s) is gone; marked it and %d unfinished stage run(s) KILLED",
                    run.info.run_id, pid, len(children))
        closed.append(run.info.run_id)
    return closed


def run_pipeline(cfg: PipelineConfig, *, from_stage: str | None = None, until: str | None = None,
                 force: str | None = None) -> dict[str, NodeOutcome]:
    for flag, value in (("--from", from_stage), ("--until", until), ("--force", force)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{flag} {value!r}: not a stage (choose from {', '.join(STAGES)})")
    order = [n.stage for n in DAG]
    first = order.index(from_stage) if from_stage else 0
    last = order.index(until) if until else len(order) - 1
    forced_from = order.index(force) if force else len(order)

    init_ray(cfg.ray)
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    client = MlflowClient()
    close_dead_pipelines(client, experiment_id)
    driver_tags = {TAG_DRIVER_HOST: socket.gethostname(), TAG_DRIVER_PID: str(os.getpid())}
    parent = client.create_run(experiment_id, run_name=f"{cfg.run.name}-pipeline",
                               tags={tracking.TAG_STAGE: "pipeline", **driver_tags})
    parent_id = parent.info.run_id
    tracking.log_params(client, parent_id, tracking.flatten(cfg.model_dump(mode="json")))
    outcomes: dict[str, NodeOutcome] = {}
    keys: dict[str, str] = {}
    dataset_digest = ""
    started = time.monotonic()
    try:
        for i, node in enumerate(DAG):
            if i > last:
                break
            key = cache_key(node.stage, node.sections(cfg), [keys[s] for s in node.inputs], dataset_digest)
            keys[node.stage] = key
            t0 = time.monotonic()
            ctx = Context(cfg, experiment_id, parent_id, outcomes, node, key, forced=i >= forced_from)
            upstream = ctx.upstream() if node.stage in LINEAGE_CHECKED else None
            cached = None if i >= forced_from else find_finished_run(experiment_id, node.stage, key, upstream)
            if node.stage == "prepare":
                outcome = node.run(ctx) if i >= first else _prepared_only(cfg, key)
            elif cached is not None:
                outcome = _restore(node, cached, key)
            elif i < first:
                raise RuntimeError(
                    f"--from {from_stage}: stage {node.stage} has no finished run for this config (cache key {key[:12]}); "
                    f"run without --from first"
                )
            else:
                print(f"[{node.stage}] running ...", flush=True)
                outcome = node.run(ctx)
            outcome.seconds = time.monotonic() - t0
            outcomes[node.stage] = outcome
            if node.stage == "prepare":
                dataset_digest = outcome.outputs.get("digest", "")
                keys["prepare"] = cache_key("prepare", node.sections(cfg), [], dataset_digest)
            _print_outcome(outcome)
        _summarise(client, parent_id, outcomes, time.monotonic() - started)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return outcomes


def _prepared_only(cfg: PipelineConfig, key: str) -> NodeOutcome:
    from pipelines.data import read_manifest

    manifest = read_manifest(cfg.data.uri, cfg.storage)
    return NodeOutcome("prepare", "skipped", None, key, outputs={"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})


def _print_outcome(o: NodeOutcome) -> None:
    run = f"run {o.run_id}" if o.run_id else "no run"
    print(f"[{o.stage}] {o.status:8s} {o.seconds:7.1f}s  {run}", flush=True)


SUMMARY_METRICS = {
    "stage_a": ("eval/psnr", "eval/ssim", "eval/lpips", "eval/bicubic_psnr", "eval/bicubic_ssim", "perf/images_per_s"),
    "encode": ("perf/images_per_s",),
    "stage_b": ("perf/images_per_s", "train/loss", "eval/holdout_loss", "eval/holdout_loss_ema"),
    "sample": ("eval/prompt_accuracy", "eval/classifier_holdout_accuracy"),
}
SUMMARY_GRIDS = {"stage_a": "reconstructions/holdout_final.png", "sample": "samples/grid.png"}


def _summarise(client: MlflowClient, parent_id: str, outcomes: dict[str, NodeOutcome], seconds: float) -> None:
    """The parent run's summary: one metrics table, the reconstruction grid and the sample grid."""
    rows = []
    for stage, o in outcomes.items():
        row = {"stage": stage, "status": o.status, "run_id": o.run_id or "", "seconds": round(o.seconds, 1)}
        for m in SUMMARY_METRICS.get(stage, ()):
            if m in o.metrics:
                row[m] = o.metrics[m]
                tracking.log_metrics(client, parent_id, {f"{stage}/{m}": o.metrics[m]}, 0)
        rows.append(row)
    tracking.log_metrics(client, parent_id, {"pipeline/seconds": seconds}, 0)
    client.log_dict(parent_id, {"stages": rows}, "summary.json")
    lines = ["| stage | status | seconds | run | metrics |", "|---|---|---|---|---|"]
    for r in rows:
        extra = ", ".join(f"{k}={v:.4g}" for k, v in r.items() if k not in {"stage", "status", "run_id", "seconds"})
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['run_id']} | {extra} |")
    client.log_text(parent_id, "\n".join(lines) + "\n", "summary.md")
    for stage, artifact in SUMMARY_GRIDS.items():
        o = outcomes.get(stage)
        if o is None or o.run_id is None:
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(run_id=o.run_id, artifact_path=artifact, dst_path=tmp)
                client.log_artifact(parent_id, local, artifact_path="summary")
        except Exception as e:  # a missing grid must not fail a finished pipeline, but is said out loud
            log.warning("summary: no %s in %s run %s (%s)", artifact, stage, o.run_id, e)


def main(argv: list[str] | None = None) -> dict[str, NodeOutcome]:
    setup_logging()
    parser = argparse.ArgumentParser(description="Run the whole latent-diffusion pipeline.")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, help="take earlier stages from the cache only")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage")
    parser.add_argument("--force", choices=STAGES, help="ignore the cache for this stage and everything after it")
    cfg, args = parse_cli(argv, parser)
    outcomes = run_pipeline(cfg, from_stage=args.from_stage, until=args.until, force=args.force)
    _print_where(cfg, outcomes)
    return outcomes


def _print_where(cfg: PipelineConfig, outcomes: dict[str, NodeOutcome]) -> None:
    print("\nDone.")
    if "sample" in outcomes:
        out_dir = outcomes["sample"].outputs.get("out_dir")
        print(f"  samples:  {out_dir} (grid: {out_dir}/grid.png)")
    for stage in ("stage_a", "encode", "stage_b", "sample"):
        if stage in outcomes:
            shown = {k: round(v, 4) for k, v in outcomes[stage].metrics.items() if k in SUMMARY_METRICS[stage]}
            print(f"  {stage} metrics: {shown}")
    mlflow_cli = Path(sys.executable).with_name("mlflow")  # the one next to this interpreter (.venv/bin/mlflow)
    print(f"  MLflow:   {mlflow_cli if mlflow_cli.exists() else 'mlflow'} ui --backend-store-uri {tracking.tracking_uri(cfg.mlflow)}")


if __name__ == "__main__":
    main()

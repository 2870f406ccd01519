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
import re
import shlex
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines import lease, storage, tracking
from pipelines.cluster import ClusterError, autoscaler_running, check_cluster_paths, cluster_resources
from pipelines.config import PipelineConfig, parse_cli
from pipelines.data import DatasetError, check_cpu_budget
from pipelines.interop import adopt_init_architectures, init_from_run_ids
from pipelines.memory_budget import check_memory_budget
from pipelines.latents import LatentsError, read_latents_manifest
from pipelines import lineage
from pipelines.lineage import KEY_METRICS
from pipelines.runtime import ANSI, exit_on, init_ray, setup_logging

log = logging.getLogger("pipeline")

STAGES = ("prepare", "stage_a", "encode", "stage_b", "sample")


class CacheMiss(RuntimeError):
    """`--from S`: a stage before S has no usable finished run for this config."""


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
        """The run ids this node consumes (its `upstream_run_ids` tag), from this invocation's outcomes, then the run
        of its `init_from` when that is an MLflow URI (Stage A / B started from a published model)."""
        consumed = tuple(o.run_id for s in self.node.inputs if (o := self.outcomes.get(s)) and o.run_id)
        return consumed + init_from_run_ids(self.cfg, self.node.stage)

    def tags(self) -> dict:
        return {tracking.TAG_CACHE_KEY: self.key}

    def keyed_cfg(self) -> PipelineConfig:
        """The config with a run name that carries the cache key: Ray Train resumes only matching runs.
        A forced node gets a fresh name, so it trains from scratch instead of resuming."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.run.name = f"{self.cfg.run.name}-{self.key[:8]}" + (f"-forced{int(time.time())}" if self.forced else "")
        return cfg


def run_prepare(ctx: Context) -> NodeOutcome:
    from pipelines.data import read_manifest
    from pipelines.prepare_data import prepare_tracked
    from pipelines.storage import exists, resolve

    cfg = ctx.cfg
    manifest_loc = resolve(cfg.data.uri, cfg.storage).join("manifest.json")
    if exists(manifest_loc):
        manifest = read_manifest(cfg.data.uri, cfg.storage)
        gone = missing_dataset_shards(cfg.data.uri, manifest, cfg.storage)
        if not gone:
            # Shards already there: nothing to do. Link to the prepare run that built them, if MLflow knows it.
            prior = tracking.find_runs(
                ctx.experiment_id, f"tags.stage = 'prepare' and tags.dataset_digest = '{manifest['digest']}'"
            )
            return NodeOutcome("prepare", "skipped", prior[0].info.run_id if prior else None, ctx.key,
                               outputs={"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})
        if not cfg.data.source:
            raise DatasetError(f"dataset {cfg.data.uri}: {len(gone)} of the {len(manifest['shards'])} shards its manifest "
                               f"lists are gone (e.g. {gone[0]}) and data.source is not set to rebuild them")
        print(f"[prepare] {len(gone)} shard(s) of {cfg.data.uri} are gone: rebuilding the dataset from {cfg.data.source}",
              flush=True)
        manifest_loc.filesystem.delete_file(manifest_loc.path)  # it lists what is not there; the shards are rewritten
    if not cfg.data.source:
        raise ConfigError(f"data.uri={cfg.data.uri} has no manifest.json and data.source is not set, so there is nothing to prepare")
    run_id, manifest = prepare_tracked(cfg, ctx.experiment_id, parent_run_id=ctx.parent_run_id, tags=ctx.tags())
    return NodeOutcome("prepare", "ran", run_id, ctx.key, outputs={"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})


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
    Node("prepare", (), _sections("data.source", "data.format", "data.shard_size", "data.prepare_resolution", "data.crops_per_photo",
                                   "data.limit", "run.seed"), run_prepare),
    Node("stage_a", ("prepare",), _sections("stage_a", "data", "run.seed"), run_stage_a_node),
    Node("encode", ("stage_a",), _sections("encode.text_encoder", "encode.output_uri", "data.resolution", "data.holdout_fraction", "data.holdout_by"), run_encode_node),
    Node("stage_b", ("encode", "stage_a"), _sections("stage_b", "sample.prompts", "sample.digit_classifier", "run.seed"), run_stage_b_node),
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

    if first == 0 and not cfg.data.source and not storage.exists(storage.resolve(cfg.data.uri, cfg.storage).join("manifest.json")):
        raise ConfigError(f"data.uri={cfg.data.uri} has no manifest.json and data.source is not set, so there is nothing to prepare")
    adopted = adopt_init_architectures(cfg)  # init_from: the imported architecture is what trains (each stage adopts it)
    for section in (s for s in ("stage_a", "stage_b") if first <= order.index(s) <= last):
        check_memory_budget(adopted, section)  # a GPU stage that cannot fit its GPU fails here, before any stage runs
    init_ray(cfg.ray)
    check_cluster_paths(cfg)
    if not autoscaler_running():  # an autoscaling cluster is asked for the CPUs by each stage (pipelines/cluster.py)
        cluster_cpus = cluster_resources().get("CPU", 0)
        for section in (s for s in ("stage_a", "stage_b") if order.index(s) <= last):  # fail before any stage, not in one
            check_cpu_budget(cluster_cpus, getattr(cfg, section).scaling, cfg.data, section=section)
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
    running = None  # the stage executing now, named by the failure line if it fails
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
            if cached is not None and (gone := missing_outputs(node.stage, cached, cfg)):
                print(f"[{node.stage}] cached run {cached.info.run_id} lost its output ({gone}): running the stage again",
                      flush=True)
                cached = None
            running = node.stage
            if node.stage == "prepare":
                outcome = _run_owned(node, ctx, upstream) if i >= first else _prepared_only(cfg, key)
            elif cached is not None:
                outcome = _restore(node, cached, key)
            elif i < first:
                raise CacheMiss(
                    f"--from {from_stage}: stage {node.stage} has no finished run for this config (cache key {key[:12]}); "
                    f"run without --from first"
                )
            else:
                print(f"[{node.stage}] running ...", flush=True)
                outcome = _run_owned(node, ctx, upstream)
            running = None
            outcome.seconds = time.monotonic() - t0
            outcomes[node.stage] = outcome
            if node.stage == "prepare":
                dataset_digest = outcome.outputs.get("digest", "")
                keys["prepare"] = cache_key("prepare", node.sections(cfg), [], dataset_digest)
            _print_outcome(outcome)
        _summarise(client, parent_id, outcomes, time.monotonic() - started)
    except BaseException as e:
        client.set_terminated(parent_id, status="FAILED")
        if running is not None:
            e.stage_failure = StageFailure(running, _stage_run_id(experiment_id, running, keys[running]), parent_id,
                                           failure_cause(e))
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return outcomes


def node_lease_uri(ctx: Context) -> str:
    """Each node execution's lease, under `<run.output_uri>/leases/`: keyed by the node's cache key (by the dataset
    URI for prepare, whose key does not know it), so two drivers with the same config contend for the same one."""
    name = (f"prepare-{hashlib.sha256(ctx.cfg.data.uri.encode()).hexdigest()[:16]}" if ctx.node.stage == "prepare"
            else f"{ctx.node.stage}-{ctx.key[:16]}")
    return f"{ctx.cfg.run.output_uri.rstrip('/')}/leases/{name}.json"


def _run_owned(node: Node, ctx: Context, upstream: tuple[str, ...] | None) -> NodeOutcome:
    """Run a node as the only live owner of its execution. A second driver with the same config waits here for
    the first (run.lease.wait_s), then reuses what it produced; a dead driver's execution is taken over and
    resumed (training continues from its last checkpoint, in its MLflow run)."""
    with lease.hold(node_lease_uri(ctx), what=f"{node.stage} of pipeline run {ctx.parent_run_id}",
                    settings=ctx.cfg.run.lease, storage_cfg=ctx.cfg.storage) as held:
        if held.waited and not ctx.forced and node.stage != "prepare":
            cached = find_finished_run(ctx.experiment_id, node.stage, ctx.key, upstream)
            if cached is not None and not missing_outputs(node.stage, cached, ctx.cfg):
                return _restore(node, cached, ctx.key)
        return node.run(ctx)


def missing_dataset_shards(uri: str, manifest: dict, storage_cfg) -> list[str]:
    """The shards a dataset manifest lists that are not there (one listing, not one request per shard)."""
    return storage.missing_files(storage.resolve(uri, storage_cfg), [s["path"] for s in manifest["shards"]])


def missing_outputs(stage: str, run, cfg: PipelineConfig) -> str:
    """What a finished run's outputs lack ("" when all there): its registered model version, its latents manifest
    and parts, or its samples. A cache hit whose output is gone re-runs its stage instead of failing later."""
    tags = run.data.tags
    try:
        if stage in ("stage_a", "stage_b"):
            uri = tags.get("model_uri", "")
            if not uri:
                return "no model_uri tag"
            if uri.startswith("models:/") and uri.count("/") == 2 and uri.rsplit("/", 1)[1].isdigit():
                name, version = uri[len("models:/"):].split("/")
                MlflowClient().get_model_version(name, version)
            return ""
        if stage == "encode":
            uri = tags.get("latents_uri", "")
            manifest = read_latents_manifest(uri, cfg.storage)
            gone = storage.missing_files(storage.resolve(uri, cfg.storage),
                                  [f["path"] for f in manifest["files"]] + [manifest["null_condition"]["path"]])
            return f"{len(gone)} of the files of {uri}" if gone else ""
        if stage == "sample":
            out = tags.get("out_dir", "")
            return "" if out and storage.exists(storage.resolve(out, cfg.storage).join("samples.json")) else f"{out}/samples.json"
    except (mlflow.exceptions.MlflowException, LatentsError, OSError, ValueError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return ""


def _prepared_only(cfg: PipelineConfig, key: str) -> NodeOutcome:
    from pipelines.data import read_manifest

    manifest = read_manifest(cfg.data.uri, cfg.storage)
    return NodeOutcome("prepare", "skipped", None, key, outputs={"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})


def _print_outcome(o: NodeOutcome) -> None:
    run = f"run {o.run_id}" if o.run_id else "no run"
    print(f"[{o.stage}] {o.status:8s} {o.seconds:7.1f}s  {run}", flush=True)


SUMMARY_METRICS = KEY_METRICS
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
        if "eval/lpips" in row and o.run_id:  # an LPIPS number is only readable next to its backbone
            row["lpips_backbone"] = client.get_run(o.run_id).data.tags.get("lpips_backbone", "unknown")
        rows.append(row)
    tracking.log_metrics(client, parent_id, {"pipeline/seconds": seconds}, 0)
    client.log_dict(parent_id, {"stages": rows}, "summary.json")
    lines = ["| stage | status | seconds | run | metrics |", "|---|---|---|---|---|"]
    for r in rows:
        extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k not in {"stage", "status", "run_id", "seconds"})
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['run_id']} | {extra} |")
    last = next((o for o in reversed(list(outcomes.values())) if o.run_id), None)
    if last is not None:  # the chain from the last stage's run back to the dataset, as lineage.py prints it
        lines += ["", f"## Lineage of `{last.run_id}` ({last.stage})", "",
                  f"`python pipelines/lineage.py {last.run_id}` prints the same chain.", "",
                  lineage.to_markdown(lineage.lineage_chain(client, last.run_id))]
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
    parser.add_argument("--plan", action="store_true", help="print what each stage would do and why; run nothing")
    cfg, args = parse_cli(argv, parser)
    if args.plan:
        from pipelines.plan import plan_pipeline, print_plan

        with exit_on(ConfigError, DatasetError):
            print_plan(plan_pipeline(cfg, from_stage=args.from_stage, until=args.until, force=args.force))
        return {}
    try:
        with exit_on(ConfigError, DatasetError, LatentsError, CacheMiss, ClusterError, lease.LeaseHeld, lease.LeaseLost):
            outcomes = run_pipeline(cfg, from_stage=args.from_stage, until=args.until, force=args.force)
    except BaseException as e:
        failure = getattr(e, "stage_failure", None) or getattr(e.__context__, "stage_failure", None)
        if failure is None:
            raise
        _exit_on_failure(e, failure, resume_command(sys.argv[1:] if argv is None else argv, failure.stage, args.force))
    _print_where(cfg, outcomes)
    return outcomes


@dataclass
class StageFailure:
    """A stage that failed: the last line of a failed pipeline names it, its MLflow run and the cause."""

    stage: str
    run_id: str | None  # the stage's MLflow run; None when it failed before making one
    pipeline_run_id: str
    cause: str

    def line(self, resume: str) -> str:
        run = f"MLflow run {self.run_id}" if self.run_id else f"MLflow pipeline run {self.pipeline_run_id}"
        return f"[{self.stage}] FAILED  {run}  cause: {self.cause}  resume: {resume}"


def failure_cause(e: BaseException) -> str:
    """One line saying why: the innermost cause, or the error behind a failed Ray Train run, as `Type: message`."""
    for attr in ("worker_failures", "controller_failure"):  # Ray Train: a failed rank's or the controller's error
        inner = getattr(e, attr, None)
        if isinstance(inner, dict) and inner:
            inner = next(iter(inner.values()))
        if isinstance(inner, BaseException):
            e = inner
            break
    while e.__cause__ is not None and str(e.__cause__).strip():  # (Ray Data chains a bare marker exception)
        e = e.__cause__
    lines = [line.strip() for line in ANSI.sub("", str(e)).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    # A remote error's text is a traceback: its last "SomeError: ..." line is the one that says what happened.
    named = [i for i, line in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    i = named[-1] if named else 0
    text = lines[i] if named else f"{type(e).__name__}: {lines[0]}"
    if lines[i].endswith(":") and i + 1 < len(lines):  # "...failed:" says little; the next line says what
        text += " " + lines[i + 1]
    return text if len(text) <= 300 else text[:297] + "..."


def _stage_run_id(experiment_id: str, stage: str, key: str) -> str | None:
    """The MLflow run of the stage that just failed: the newest run of that stage with this cache key."""
    try:
        runs = tracking.find_runs(experiment_id, f"tags.{tracking.TAG_STAGE} = '{stage}' and tags.{tracking.TAG_CACHE_KEY} = '{key}'")
    except mlflow.exceptions.MlflowException:
        return None
    return runs[0].info.run_id if runs else None


def resume_command(argv: list[str], stage: str, force: str | None) -> str:
    """The command that picks up where a failed invocation stopped: the same arguments, `--from` the failed stage
    (finished stages come from the cache, a training stage resumes from its last checkpoint). `--force` is dropped
    unless the forced stage is the one that failed (its earlier forced stages are finished now)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--from", "--plan") or (name == "--force" and force != stage):
            skip = "=" not in arg and name != "--plan"
            continue
        kept.append(arg)
    if stage != STAGES[0] and force != stage:
        kept += ["--from", stage]
    python = os.path.relpath(sys.executable)
    return shlex.join([python if not python.startswith("..") else sys.executable, "pipelines/run.py", *kept])


def _exit_on_failure(e: BaseException, failure: StageFailure, resume: str) -> None:
    """The failure line, last. A user-facing error (bad input, an outage: already one line) is said once, as the
    line's cause; anything else is a bug and prints its traceback first."""
    sys.stdout.flush()
    if not isinstance(e, (SystemExit, KeyboardInterrupt)):
        traceback.print_exception(e)
    print(failure.line(resume), file=sys.stderr, flush=True)
    raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else 1) from None


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

"""Runs the DAG: a list of `Stage`s (`dag/stage.py`), each taken from the cache, resumed, or run.

The state lives in MLflow:

* every node has a cache key: the config paths it depends on (`Stage.sections`) + the keys of its inputs + the
  dataset digest + the project version. A finished run with the same key (tag `cache_key`) is reused and nothing
  runs;
* an unfinished run with the same key is resumed (training resumes from its last Ray Train checkpoint, because
  the Ray Train run name carries the key);
* one parent run per invocation; every stage run carries `stage` and `upstream_run_ids` tags.

`from_stage`: stages before it are taken from the cache only (never executed; missing ones are an error).
`until`: stop after it. `force`: ignore the cache for it and everything downstream of it.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from importlib.metadata import version as package_version

import mlflow
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines.config import PipelineConfig
from pipelines.dag import lineage
from pipelines.dag.stage import Outcome, Stage, section_values, set_field
from pipelines.models.interop import init_from_run_ids
from pipelines.platform import lease, storage, tracking
from pipelines.platform.cluster import autoscaler_running, check_cluster_paths, check_cpu_budget, cluster_resources
from pipelines.platform.runtime import ANSI, init_ray, local_ray_cpus

log = logging.getLogger("pipeline")


class CacheMiss(RuntimeError):
    """`--from S`: a stage before S (`stage`) has no usable finished run for this config."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


# ---------------------------------------------------------------------------------------------------
# Cache keys and MLflow lookups
# ---------------------------------------------------------------------------------------------------


def project_version() -> str:
    try:
        return package_version("ldm-pipeline")
    except Exception:  # not installed (e.g. a bare working dir on a cluster)
        return "unknown"


LOCATION_FIELDS = ("data.uri",)
"""Config fields that say where an input lives, not what it holds: left out of cache keys, which have the dataset's
content digest instead, so a moved or copied project (same dataset, another path) keeps its cache."""


KEYED_AS_BEFORE = {"data.cpus_per_task": 0.5, "data.reserved_cpus": 0.5}
"""Fields that may now be left unset (chosen when the stage runs, for the cluster it runs on) and had these
defaults before: unset, they are keyed as those values, so the stages cached before stay cached, and the same config
keys alike on any cluster (the key sees the config, not what was chosen)."""


def _keyed_config(sections: dict) -> dict:
    """`sections` as cache keys see them: unset `KEYED_AS_BEFORE` fields as their old values, no `LOCATION_FIELDS`."""
    config = json.loads(json.dumps(sections, default=str))
    for dotted, before in KEYED_AS_BEFORE.items():
        parent, _, leaf = dotted.rpartition(".")
        if isinstance(config.get(parent), dict) and leaf in config[parent] and config[parent][leaf] is None:
            config[parent][leaf] = before
    for dotted in LOCATION_FIELDS:
        config.pop(dotted, None)
        parent, _, leaf = dotted.rpartition(".")
        if isinstance(config.get(parent), dict):
            config[parent].pop(leaf, None)
    return config


def cache_key(stage: str, sections: dict, input_keys: list[str], dataset_digest: str) -> str:
    payload = json.dumps(
        {"stage": stage, "config": _keyed_config(sections), "inputs": input_keys, "dataset": dataset_digest,
         "version": project_version()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def run_name(cfg: PipelineConfig, key: str, upstream: dict[str, str]) -> str:
    """The name a node executes under: `run.name` + a digest of its cache key and of the upstream runs it consumes
    (`upstream`: stage -> run id, from `upstream_runs`). A training stage's Ray Train name, and so its checkpoint
    folder, is this name: a checkpoint folder belongs to one config and one set of upstream runs, the lineage its
    MLflow run records. So a second MLflow store over the same `outputs/` (a deleted store, a team server) never
    resumes a checkpoint trained on another store's upstream outputs: its own upstream runs make a new folder
    (Stage B trains fresh), while a stage whose only input is the dataset (Stage A) finds its folder again and
    adopts it (`training_run` says so)."""
    payload = json.dumps({"key": key, "upstream": upstream}, sort_keys=True)
    return f"{cfg.run.name}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def upstream_runs(stage: Stage, stages: tuple[Stage, ...], run_ids: dict[str, str | None]) -> dict[str, str]:
    """The run ids of `stage`'s inputs (`run_ids`: stage -> run id) for its `run_name`. The dataset stage is left
    out: it runs every time (a new run each invocation), and the dataset is in the key by its content digest."""
    by_name = {s.name: s for s in stages}
    return {s: run_ids[s] for s in stage.inputs if run_ids.get(s) and not by_name[s].provides_dataset}


def find_finished_run(experiment_id: str, stage: str, key: str, upstream: tuple[str, ...] | None = None):
    """The newest finished run of `stage` with this cache key. With `upstream`, only a run that consumed exactly
    those upstream runs counts: after `--force` re-trained a stage under the same key, the stages below it are
    not reused from runs that consumed the older output."""
    query = f"tags.stage = '{stage}' and tags.cache_key = '{key}' and attributes.status = 'FINISHED'"
    if upstream is not None:
        query += f" and tags.{tracking.TAG_UPSTREAM} = '{','.join(upstream)}'"
    runs = tracking.find_runs(experiment_id, query)
    return runs[0] if runs else None


def lost_outputs(stage: Stage, run, cfg: PipelineConfig) -> str:
    """What a finished run's outputs lack ("" when all there), as its stage checks them; a store or storage error
    while checking counts as lost (the stage runs again rather than failing later)."""
    if stage.lost_outputs is None:
        return ""
    try:
        return stage.lost_outputs(run, cfg)
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


# ---------------------------------------------------------------------------------------------------
# One node
# ---------------------------------------------------------------------------------------------------


@dataclass
class Context:
    cfg: PipelineConfig
    """The config as given: what cache keys hash."""
    checked: PipelineConfig
    """The config after every stage's `check` (an init_from's architecture adopted): what the stages run with."""
    experiment_id: str
    parent_run_id: str
    outcomes: dict[str, Outcome]
    stage: Stage
    key: str
    name: str
    """The run name it executes under (`run_name`): its Ray Train name and checkpoint folder for a training stage."""
    forced: bool = False

    def upstream(self) -> tuple[str, ...]:
        """The run ids this node consumes (its `upstream_run_ids` tag), from this invocation's outcomes, then the run
        of its `init_from` when that is an MLflow URI (Stage A / B started from a published model)."""
        consumed = tuple(o.run_id for s in self.stage.inputs if (o := self.outcomes.get(s)) and o.run_id)
        return consumed + init_from_run_ids(self.cfg, self.stage.name)

    def run_cfg(self) -> PipelineConfig:
        """The config the stage runs with: the checked one, its inputs' outputs wired in, and its run name (`run_name`:
        Ray Train resumes only a checkpoint folder of the same inputs). A forced node gets a fresh name, so it trains
        from scratch instead of resuming."""
        cfg = self.checked.model_copy(deep=True)
        cfg.run.name = self.name + (f"-forced{int(time.time())}" if self.forced else "")
        for dotted, (source, output) in self.stage.wiring.items():
            set_field(cfg, dotted, self.outcomes[source].outputs[output])
        return cfg

    def lease_uri(self) -> str:
        """This node execution's lease, under `<run.output_uri>/leases/`: keyed by the cache key (or the stage's own
        name for it), so two drivers with the same config contend for the same one."""
        name = self.stage.lease_name(self.cfg, self.key) if self.stage.lease_name else f"{self.stage.name}-{self.key[:16]}"
        return f"{self.cfg.run.output_uri.rstrip('/')}/leases/{name}.json"


def run_node(ctx: Context) -> Outcome:
    result = ctx.stage.run(ctx.run_cfg(), parent_run_id=ctx.parent_run_id, upstream_run_ids=ctx.upstream(),
                           extra_tags={tracking.TAG_CACHE_KEY: ctx.key}, checked=True)
    return Outcome(ctx.stage.name, result.status, result.run_id, ctx.key, outputs=dict(result.outputs),
                   metrics=dict(result.metrics))


def restore(stage: Stage, run, key: str) -> Outcome:
    tags = run.data.tags
    outputs = {k: tags[k] for k in stage.produces if k in tags}
    return Outcome(stage.name, "reused", run.info.run_id, key, outputs=outputs, metrics=dict(run.data.metrics))


def run_owned(ctx: Context, upstream: tuple[str, ...] | None) -> Outcome:
    """Run a node as the only live owner of its execution. A second driver with the same config waits here for
    the first (run.lease.wait_s), then reuses what it produced; a dead driver's execution is taken over and
    resumed (training continues from its last checkpoint, in its MLflow run)."""
    stage = ctx.stage
    with lease.hold(ctx.lease_uri(), what=f"{stage.name} of pipeline run {ctx.parent_run_id}",
                    settings=ctx.cfg.run.lease, storage_cfg=ctx.cfg.storage) as held:
        if held.waited and not ctx.forced and stage.cached:
            cached = find_finished_run(ctx.experiment_id, stage.name, ctx.key, upstream)
            if cached is not None and not lost_outputs(stage, cached, ctx.cfg):
                return restore(stage, cached, ctx.key)
        return run_node(ctx)


# ---------------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------------


TAG_DRIVER_HOST = "driver_host"
TAG_DRIVER_PID = "driver_pid"


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
        if not pid.isdigit() or lease.process_alive(int(pid)):
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


def stage_range(stages: tuple[Stage, ...], from_stage: str | None, until: str | None,
                force: str | None) -> tuple[int, int, int]:
    """Indices of the first stage to execute, the last stage, and the first forced one (len(stages): none)."""
    names = [s.name for s in stages]
    for flag, value in (("--from", from_stage), ("--until", until), ("--force", force)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value!r}: not a stage (choose from {', '.join(names)})")
    first = names.index(from_stage) if from_stage else 0
    last = names.index(until) if until else len(names) - 1
    return first, last, names.index(force) if force else len(names)


def check_stages(stages: tuple[Stage, ...], cfg: PipelineConfig, first: int, last: int) -> PipelineConfig:
    """Every stage's own checks that need no cluster (`Stage.check`), before any stage runs; then the cluster's:
    Ray started or joined, local paths usable from every node, and enough CPUs for each training stage (an
    autoscaling cluster is asked for them by each stage). Once per process: the stages are then run `checked`."""
    tracking.check_reachable(cfg.mlflow)
    if first == 0 and not cfg.data.source and not storage.exists(storage.resolve(cfg.data.uri, cfg.storage).join("manifest.json")):
        raise ConfigError(f"data.uri={cfg.data.uri} has no manifest.json and data.source is not set, so there is nothing to prepare")
    checked = cfg
    for stage in stages[: last + 1]:
        if stage.check is not None:
            checked = stage.check(checked)  # a GPU stage that cannot fit its GPU fails here, before any stage runs
    training = [s for s in stages[: last + 1] if s.trains]

    def check_cpus(cpus: float) -> None:  # fail before any stage, not in one
        for stage in training:
            check_cpu_budget(cpus, getattr(cfg, stage.name).scaling, cfg.data, section=stage.name)

    if (local_cpus := local_ray_cpus(cfg.ray)) is not None:  # a local Ray's CPUs are known before it starts
        check_cpus(local_cpus)
    init_ray(cfg.ray)
    check_cluster_paths(cfg)
    if not autoscaler_running():
        check_cpus(cluster_resources().get("CPU", 0))
    return checked


def run_pipeline(stages: tuple[Stage, ...], cfg: PipelineConfig, *, from_stage: str | None = None,
                 until: str | None = None, force: str | None = None) -> dict[str, Outcome]:
    first, last, forced_from = stage_range(stages, from_stage, until, force)
    checked = check_stages(stages, cfg, first, last)
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    client = MlflowClient()
    close_dead_pipelines(client, experiment_id)
    driver_tags = {TAG_DRIVER_HOST: socket.gethostname(), TAG_DRIVER_PID: str(os.getpid())}
    parent = client.create_run(experiment_id, run_name=f"{cfg.run.name}-pipeline",
                               tags={tracking.TAG_STAGE: "pipeline", **driver_tags, tracking.TAG_DESCRIPTION: (
                                   "One `pipelines/run.py` invocation: its stage runs are nested below it; the artifact "
                                   "summary.md holds their metrics table and the lineage, summary/ their image grids.")})
    parent_id = parent.info.run_id
    tracking.log_params(client, parent_id, tracking.flatten(cfg.model_dump(mode="json")))
    outcomes: dict[str, Outcome] = {}
    keys: dict[str, str] = {}
    dataset_digest = ""
    started = time.monotonic()
    running = None  # the stage executing now, named by the failure line if it fails
    try:
        for i, stage in enumerate(stages[: last + 1]):
            key = keys[stage.name] = cache_key(stage.name, section_values(cfg, stage.sections),
                                               [keys[s] for s in stage.inputs], dataset_digest)
            t0 = time.monotonic()
            ctx = Context(cfg, checked, experiment_id, parent_id, outcomes, stage, key,
                          run_name(cfg, key, upstream_runs(stage, stages, {n: o.run_id for n, o in outcomes.items()})), forced=i >= forced_from)
            upstream = ctx.upstream() if stage.lineage_checked else None
            cached = None
            if stage.cached and i < forced_from:
                cached = find_finished_run(experiment_id, stage.name, key, upstream)
            if cached is not None and (gone := lost_outputs(stage, cached, cfg)):
                print(f"[{stage.name}] cached run {cached.info.run_id} lost its output ({gone}): running the stage again",
                      flush=True)
                cached = None
            running = stage.name
            if not stage.cached:
                outcome = (run_owned(ctx, upstream) if i >= first
                           else Outcome(stage.name, "skipped", None, key, outputs=stage.existing(cfg)))
            elif cached is not None:
                outcome = restore(stage, cached, key)
            elif i < first:
                raise CacheMiss(f"--from {from_stage}: stage {stage.name} has no finished run for this config "
                                f"(cache key {key[:12]})", stage.name)
            else:
                print(f"[{stage.name}] running ...", flush=True)
                outcome = run_owned(ctx, upstream)
            running = None
            outcome.seconds = time.monotonic() - t0
            outcomes[stage.name] = outcome
            if stage.provides_dataset:
                dataset_digest = outcome.outputs.get("digest", "")
                keys[stage.name] = cache_key(stage.name, section_values(cfg, stage.sections), [], dataset_digest)
            print_outcome(outcome)
        summarise(client, stages, parent_id, outcomes, time.monotonic() - started)
    except BaseException as e:
        client.set_terminated(parent_id, status="FAILED")
        if running is not None:
            e.stage_failure = StageFailure(running, _stage_run_id(experiment_id, running, keys[running]), parent_id,
                                           failure_cause(e))
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return outcomes


def print_outcome(o: Outcome) -> None:
    run = f"run {o.run_id}" if o.run_id else "no run"
    print(f"[{o.stage}] {o.status:8s} {o.seconds:7.1f}s  {run}", flush=True)


def summarise(client: MlflowClient, stages: tuple[Stage, ...], parent_id: str, outcomes: dict[str, Outcome],
              seconds: float) -> None:
    """The parent run's summary: one metrics table, the stages' summary images and the lineage of the last run."""
    by_name = {s.name: s for s in stages}
    rows = []
    for name, o in outcomes.items():
        row = {"stage": name, "status": o.status, "run_id": o.run_id or "", "seconds": round(o.seconds, 1)}
        for m in by_name[name].key_metrics:
            if m in o.metrics:
                row[m] = o.metrics[m]
                tracking.log_metrics(client, parent_id, {f"{name}/{m}": o.metrics[m]}, 0)
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
                  lineage.to_markdown(lineage.lineage_chain(client, last.run_id, stages))]
    client.log_text(parent_id, "\n".join(lines) + "\n", "summary.md")
    for name, o in outcomes.items():
        artifact = by_name[name].summary_artifact
        if artifact is None or o.run_id is None:
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(run_id=o.run_id, artifact_path=artifact, dst_path=tmp)
                client.log_artifact(parent_id, local, artifact_path="summary")
        except Exception as e:  # a missing grid must not fail a finished pipeline, but is said out loud
            log.warning("summary: no %s in %s run %s (%s)", artifact, name, o.run_id, e)


# ---------------------------------------------------------------------------------------------------
# Failure: the last line of a failed pipeline
# ---------------------------------------------------------------------------------------------------


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


def resume_command(argv: list[str], stage: str, force: str | None, first_stage: str, cause: str = "") -> str:
    """The command that picks up where a failed invocation stopped: the same arguments, `--from` the failed stage
    (finished stages come from the cache, a training stage resumes from its last checkpoint). `--force` is dropped
    unless the forced stage is the one that failed (its earlier forced stages are finished now). A config error
    (`cause` "ConfigError: a.b=value: ...") would fail again with the same settings: the last `--set` of each field
    it names (the value in effect) is dropped, so the command runs with the value given before it, or the file's."""
    bad = set(re.findall(r"\b([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)=", cause)) if cause.startswith("ConfigError") else set()
    sets = {}  # field -> index in argv of the last --set naming it: the value in effect, the one that failed
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--set=") else (argv[i + 1] if arg == "--set" and i + 1 < len(argv) else None)
        if value is not None and value.split("=", 1)[0] in bad:
            sets[value.split("=", 1)[0]] = i
    dropped = {j for i in sets.values() for j in ((i,) if argv[i].startswith("--set=") else (i, i + 1))}
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--from", "--plan") or (name == "--force" and force != stage):
            skip = "=" not in arg and name != "--plan"
            continue
        if i not in dropped:
            kept.append(arg)
    if stage != first_stage and force != stage:
        kept += ["--from", stage]
    python = os.path.relpath(sys.executable)
    return shlex.join([python if not python.startswith("..") else sys.executable, "pipelines/run.py", *kept])

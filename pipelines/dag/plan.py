"""`run.py --plan`: what the DAG would do with this config, and why, without running anything.

For each stage: reuse a finished run (a cache hit), resume an unfinished run (its last checkpoint), or run; and
for a stage that will run, the reasons: the config fields that differ from the newest finished run of that stage
(a dotted-path diff, `stage_b.optim.lr: 0.0005 -> 0.001`), an input that changed (an upstream stage that will
run, another dataset), `--force`, or no earlier run at all. It reads the MLflow store, the dataset manifest and
the checkpoint folders; it starts no Ray, creates no run or experiment and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.platform import storage, tracking
from pipelines.config import PipelineConfig
from pipelines.dag.executor import cache_key, find_finished_run, lost_outputs, run_name, stage_range, upstream_runs
from pipelines.dag.stage import Stage, section_values
from pipelines.train.loop import latest_checkpoint_meta

@dataclass
class PlanStep:
    stage: str
    action: str  # "reuse", "resume", "run", "skip" (prepare: the dataset is there), "stop" (--until), "error" (--from)
    run_id: str | None = None  # the run reused or resumed
    step: int | None = None  # resume: the step of the last checkpoint
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.action == "reuse":
            head = f"reuse run {self.run_id}"
        elif self.action == "resume":
            head = f"resume run {self.run_id}" + (f" from step {self.step}" if self.step is not None else "")
        else:
            head = self.action
        return f"[{self.stage}] {head}"


def _dataset_digest(cfg: PipelineConfig) -> str | None:
    from pipelines.data import read_manifest

    if not storage.exists(storage.resolve(cfg.data.uri, cfg.storage).join("manifest.json")):
        return None
    return read_manifest(cfg.data.uri, cfg.storage)["digest"]


def _flat_strings(tree: dict) -> dict[str, str]:
    """Config values as the pipeline run logged them (tracking.log_params: str of the JSON-mode value)."""
    return {k: str(v) for k, v in tracking.flatten(tree).items()}


def _logged_config(client: MlflowClient, run) -> dict[str, str]:
    """The config a stage run was made with, as the user gave it: its pipeline run's params (the whole config,
    before the DAG filled in the upstream URIs), or the run's own params for an entry point started alone."""
    parent = run.data.tags.get("mlflow.parentRunId")
    return dict(client.get_run(parent).data.params) if parent else dict(run.data.params)


def config_diff(old: dict[str, str], new: dict[str, str], sections: tuple[str, ...] = ()) -> list[str]:
    """`path: old -> new` for every dotted path of `new` whose logged value differs, and `path: old -> (default)` for
    every path under `sections` that `old` has and `new` lacks (a field whose dump omits it at its default, such as
    `encode.text_encoder.split_digits` turned off again)."""
    changed = {path: f"{old.get(path, '(not set)')} -> {value}" for path, value in new.items() if old.get(path) != value}
    dropped = {path: f"{value} -> (default)" for path, value in old.items()
               if path not in new and any(path.startswith(f"{s}.") or path == s for s in sections)}
    return [f"{path}: {what}" for path, what in sorted((changed | dropped).items())]


def _last_checkpoint_step(cfg: PipelineConfig, trainer_name: str) -> int | None:
    """The step of the checkpoint a resume would start from: the highest step kept, as the training loop picks it
    (checkpoint folder names do not sort by step)."""
    found = latest_checkpoint_meta(cfg.run.checkpoint_root, trainer_name, cfg.storage)
    if found is None or "step" not in found[1]:
        return None
    return int(found[1]["step"])


def plan_pipeline(stages: tuple[Stage, ...], cfg: PipelineConfig, *, from_stage: str | None = None,
                  until: str | None = None, force: str | None = None) -> list[PlanStep]:
    """The decision run_pipeline would take for each stage (same cache keys, same lineage check)."""
    first, last, forced_from = stage_range(stages, from_stage, until, force)

    tracking.check_reachable(cfg.mlflow)
    uri = tracking.tracking_uri(cfg.mlflow)
    mlflow.set_tracking_uri(uri)  # the store the lookups below read (nothing is written to it)
    client = None if tracking.store_absent(uri) else MlflowClient(uri)  # (opening a SQLite store creates it)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment) if client is not None else None
    digest = _dataset_digest(cfg)
    keys: dict[str, str] = {}
    chosen: dict[str, PlanStep] = {}
    steps: list[PlanStep] = []
    for i, stage in enumerate(stages):
        name = stage.name
        if i > last:
            steps.append(PlanStep(name, "stop", reasons=[f"--until {until}"]))
            continue
        key = keys[name] = cache_key(name, section_values(cfg, stage.sections), [keys[s] for s in stage.inputs],
                                     "" if stage.provides_dataset else digest or "")
        if not stage.cached:  # it runs every time and finds for itself whether there is work
            if digest is not None:
                step = PlanStep(name, "skip", reasons=[f"dataset {cfg.data.uri} is complete (digest {digest[:12]})"])
            else:
                step = PlanStep(name, "run", reasons=[f"no dataset at {cfg.data.uri} yet: build it from {cfg.data.source}"])
            if stage.provides_dataset:
                keys[name] = cache_key(name, section_values(cfg, stage.sections), [], digest or "")
            chosen[name] = step
            steps.append(step)
            continue
        upstream_steps = [chosen[s] for s in stage.inputs]
        upstream_changes = [f"input changed: {u.stage} will {u.action}" for u in upstream_steps if u.action in ("run", "resume")]
        upstream = tuple(u.run_id for u in upstream_steps if u.run_id) if stage.lineage_checked else None

        step = PlanStep(name, "run")
        if i >= forced_from:
            step.reasons.append(f"--force {force}")
        elif experiment is not None and not upstream_changes and digest is not None:
            cached = find_finished_run(experiment.experiment_id, name, key, upstream)
            lost = lost_outputs(stage, cached, cfg) if cached is not None else ""
            if cached is not None and not lost:
                step = PlanStep(name, "reuse", cached.info.run_id)
            elif cached is not None:
                step.reasons.append(f"cached run {cached.info.run_id} lost its output ({lost})")
        if step.action == "run" and i < first:
            step = PlanStep(name, "error", reasons=[f"--from {from_stage} takes {name} from the cache, but it has no "
                                                    "finished run for this config: the pipeline would stop here"])
        elif step.action == "run" and i < forced_from:
            if stage.trains and experiment is not None and digest is not None:
                upstream_ids = upstream_runs(stage, stages, {s: u.run_id for s, u in chosen.items()})
                trainer_name = f"{run_name(cfg, key, upstream_ids)}-{name}"
                resumed = tracking.unfinished_training_run(experiment.experiment_id, trainer_name)
                if resumed is not None:
                    step = PlanStep(name, "resume", resumed, _last_checkpoint_step(cfg, trainer_name),
                                    reasons=[f"run {resumed} did not finish"])
            if step.action == "run" and not step.reasons:
                step.reasons = upstream_changes or _why_not_cached(client, experiment, cfg, stage, digest)
        chosen[name] = step
        steps.append(step)
    return steps


def _why_not_cached(client: MlflowClient | None, experiment, cfg: PipelineConfig, stage: Stage, digest: str | None) -> list[str]:
    if digest is None:
        return ["input changed: the dataset is to be prepared"]
    if experiment is None:
        return [f"no run yet in experiment {cfg.mlflow.experiment!r}"]
    runs = tracking.find_runs(experiment.experiment_id,
                              f"tags.{tracking.TAG_STAGE} = '{stage.name}' and attributes.status = 'FINISHED'")
    if not runs:
        return [f"no finished {stage.name} run yet"]
    newest = runs[0]
    diff = config_diff(_logged_config(client, newest), _flat_strings(section_values(cfg, stage.sections)), stage.sections)
    if diff:
        return [f"config differs from run {newest.info.run_id} (the newest finished {stage.name}):", *diff]
    if newest.data.tags.get("dataset_digest") not in (None, digest):  # a stage that records the dataset it read
        return [f"input changed: dataset digest {newest.data.tags['dataset_digest'][:12]} -> {digest[:12]}"]
    return [f"input changed: run {newest.info.run_id} (the newest finished {stage.name}, same config) consumed other "
            f"upstream runs ({newest.data.tags.get(tracking.TAG_UPSTREAM) or 'none'}) or another project version"]


def print_plan(steps: list[PlanStep]) -> None:
    for step in steps:
        print(step.line(), flush=True)
        for reason in step.reasons:
            print(f"    {reason}", flush=True)

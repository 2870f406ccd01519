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

from pipelines import storage, tracking
from pipelines.config import PipelineConfig
from pipelines.run import DAG, LINEAGE_CHECKED, STAGES, cache_key, find_finished_run, missing_outputs
from pipelines.train_loop import latest_checkpoint_meta

TRAINED = ("stage_a", "stage_b")


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


def config_diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """`path: old -> new` for every dotted path of `new` whose logged value differs."""
    return [f"{path}: {old.get(path, '(not set)')} -> {value}" for path, value in sorted(new.items())
            if old.get(path) != value]


def _last_checkpoint_step(cfg: PipelineConfig, trainer_name: str) -> int | None:
    """The step of the checkpoint a resume would start from: the highest step kept, as the training loop picks it
    (checkpoint folder names do not sort by step)."""
    found = latest_checkpoint_meta(cfg.run.checkpoint_root, trainer_name, cfg.storage)
    if found is None or "step" not in found[1]:
        return None
    return int(found[1]["step"])


def plan_pipeline(cfg: PipelineConfig, *, from_stage: str | None = None, until: str | None = None,
                  force: str | None = None) -> list[PlanStep]:
    """The decision run_pipeline would take for each stage (same cache keys, same lineage check)."""
    order = list(STAGES)
    first = order.index(from_stage) if from_stage else 0
    last = order.index(until) if until else len(order) - 1
    forced_from = order.index(force) if force else len(order)

    uri = tracking.tracking_uri(cfg.mlflow)
    mlflow.set_tracking_uri(uri)  # the store the lookups below read (nothing is written to it)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    digest = _dataset_digest(cfg)
    keys: dict[str, str] = {}
    chosen: dict[str, PlanStep] = {}
    steps: list[PlanStep] = []
    for i, node in enumerate(DAG):
        stage = node.stage
        if i > last:
            steps.append(PlanStep(stage, "stop", reasons=[f"--until {until}"]))
            continue
        if stage == "prepare":
            if digest is not None:
                step = PlanStep(stage, "skip", reasons=[f"dataset {cfg.data.uri} is complete (digest {digest[:12]})"])
            else:
                step = PlanStep(stage, "run", reasons=[f"no dataset at {cfg.data.uri} yet: build it from {cfg.data.source}"])
            keys[stage] = cache_key(stage, node.sections(cfg), [], digest or "")
            chosen[stage] = step
            steps.append(step)
            continue
        key = keys[stage] = cache_key(stage, node.sections(cfg), [keys[s] for s in node.inputs], digest or "")
        upstream_steps = [chosen[s] for s in node.inputs]
        upstream_changes = [f"input changed: {u.stage} will {u.action}" for u in upstream_steps if u.action in ("run", "resume")]
        upstream = tuple(u.run_id for u in upstream_steps if u.run_id) if stage in LINEAGE_CHECKED else None

        step = PlanStep(stage, "run")
        if i >= forced_from:
            step.reasons.append(f"--force {force}")
        elif experiment is not None and not upstream_changes and digest is not None:
            cached = find_finished_run(experiment.experiment_id, stage, key, upstream)
            lost = missing_outputs(stage, cached, cfg) if cached is not None else ""
            if cached is not None and not lost:
                step = PlanStep(stage, "reuse", cached.info.run_id)
            elif cached is not None:
                step.reasons.append(f"cached run {cached.info.run_id} lost its output ({lost})")
        if step.action == "run" and i < first:
            step = PlanStep(stage, "error", reasons=[f"--from {from_stage} takes {stage} from the cache, but it has no "
                                                     "finished run for this config: the pipeline would stop here"])
        elif step.action == "run" and i < forced_from:
            if stage in TRAINED and experiment is not None and digest is not None:
                trainer_name = f"{cfg.run.name}-{key[:8]}-{stage}"
                resumed = tracking.unfinished_training_run(experiment.experiment_id, trainer_name)
                if resumed is not None:
                    step = PlanStep(stage, "resume", resumed, _last_checkpoint_step(cfg, trainer_name),
                                    reasons=[f"run {resumed} did not finish"])
            if step.action == "run" and not step.reasons:
                step.reasons = upstream_changes or _why_not_cached(client, experiment, cfg, node, digest)
        chosen[stage] = step
        steps.append(step)
    return steps


def _why_not_cached(client: MlflowClient, experiment, cfg: PipelineConfig, node, digest: str | None) -> list[str]:
    if digest is None:
        return ["input changed: the dataset is to be prepared"]
    if experiment is None:
        return [f"no run yet in experiment {cfg.mlflow.experiment!r}"]
    runs = tracking.find_runs(experiment.experiment_id,
                              f"tags.{tracking.TAG_STAGE} = '{node.stage}' and attributes.status = 'FINISHED'")
    if not runs:
        return [f"no finished {node.stage} run yet"]
    newest = runs[0]
    diff = config_diff(_logged_config(client, newest), _flat_strings(node.sections(cfg)))
    if diff:
        return [f"config differs from run {newest.info.run_id} (the newest finished {node.stage}):", *diff]
    if node.stage == "stage_a" and newest.data.tags.get("dataset_digest") not in (None, digest):
        return [f"input changed: dataset digest {newest.data.tags['dataset_digest'][:12]} -> {digest[:12]}"]
    return [f"input changed: run {newest.info.run_id} (the newest finished {node.stage}, same config) consumed other "
            f"upstream runs ({newest.data.tags.get(tracking.TAG_UPSTREAM) or 'none'}) or another project version"]


def print_plan(steps: list[PlanStep]) -> None:
    for step in steps:
        print(step.line(), flush=True)
        for reason in step.reasons:
            print(f"    {reason}", flush=True)

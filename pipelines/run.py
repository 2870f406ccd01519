"""The whole pipeline as a small declarative DAG: prepare -> stage_a -> encode -> stage_b -> sample.

    python pipelines/run.py --config configs/quickstart.yaml [--set ...] [--from S] [--until S] [--force S]
    python pipelines/run.py --config configs/quickstart.yaml --plan      # what each stage would do, and why
    python pipelines/run.py --config configs/sd_f8.yaml --memory         # training stages' GPU memory estimates
    python pipelines/run.py --config configs/quickstart.yaml --clean [S] # remove output folders (dag/clean.py)
    ray job submit --working-dir . -- python pipelines/run.py --config configs/quickstart.yaml

Each node is one of the standalone entry points (`pipelines/prepare_data.py`, `stage_a.py`,
`encode_latents.py`, `stage_b.py`, `sample.py`), described by its `STAGE`, so an external orchestrator (Airflow,
Argo, a KubeRay RayJob) can call them one by one instead. `pipelines/dag/executor.py` runs them: cache keys and
state in MLflow, resume, leases, the failure line.

`--from S`: stages before S are taken from the cache only (never executed; missing ones are an error).
`--until S`: stop after S. `--force S`: ignore the cache for S and everything downstream of it.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_core.config import ConfigError
from pipelines.platform.cli import parse_cli

if TYPE_CHECKING:
    from pipelines.dag.executor import Outcome, StageFailure
    from pipelines.dag.stage import Stage

# Only light imports above (argparse, pydantic): the command line and the config are checked before torch, Ray and
# MLflow import (seconds on a busy machine), so a mistyped argument or field is refused at once (issue 30).
# The stages and the executor are imported once they are needed.

STAGE_NAMES = ("prepare", "stage_a", "encode", "stage_b", "sample")
"""The DAG's stages, in order (`stages()` checks that they are the names of `STAGES`)."""


def stages() -> tuple[Stage, ...]:
    """The DAG, in order: each stage is described on its entry point (`STAGE`); a new stage is one more entry here
    (and in STAGE_NAMES). Importing them imports torch, Ray and MLflow."""
    from pipelines import encode_latents, prepare_data, sample, stage_a, stage_b

    dag = (prepare_data.STAGE, stage_a.STAGE, encode_latents.STAGE, stage_b.STAGE, sample.STAGE)
    assert tuple(s.name for s in dag) == STAGE_NAMES, "STAGE_NAMES must list the stages of stages(), in order"
    return dag


def __getattr__(name: str):
    if name == "STAGES":  # `from pipelines.run import STAGES`: the stages, imported on first use
        return stages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_pipeline(cfg, *, from_stage: str | None = None, until: str | None = None,
                 force: str | None = None) -> dict[str, Outcome]:
    """The DAG on `cfg` (see `dag/executor.py`): each stage taken from the cache, resumed, or run."""
    from pipelines.dag import executor

    return executor.run_pipeline(stages(), cfg, from_stage=from_stage, until=until, force=force)


def main(argv: list[str] | None = None) -> dict[str, Outcome]:
    parser = argparse.ArgumentParser(description="Run the whole latent-diffusion pipeline.")
    parser.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, help="take earlier stages from the cache only")
    parser.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage")
    parser.add_argument("--force", choices=STAGE_NAMES, help="ignore the cache for this stage and everything after it")
    parser.add_argument("--plan", action="store_true", help="print what each stage would do and why; run nothing")
    parser.add_argument("--clean", nargs="?", const=STAGE_NAMES[0], choices=STAGE_NAMES, metavar="STAGE",
                        help="remove the output folders of STAGE and every stage after it (all without STAGE), "
                             "keeping those another MLflow store's runs point at; run nothing")
    parser.add_argument("--memory", action="store_true",
                        help="print each training stage's estimated peak GPU memory per worker; run nothing")
    cfg, args = parse_cli(argv, parser)  # a bad argument or config exits here, before the heavy imports below
    from pipelines.platform.runtime import exit_on, setup_logging

    setup_logging()
    from pipelines.dag.executor import CacheMiss, resume_command
    from pipelines.data import DatasetError
    from pipelines.data.latents import LatentsError
    from pipelines.platform import lease
    from pipelines.platform.cluster import ClusterError

    STAGES = stages()
    if args.plan:
        from pipelines.dag.plan import plan_pipeline, print_plan

        with exit_on(ConfigError, DatasetError):
            print_plan(plan_pipeline(STAGES, cfg, from_stage=args.from_stage, until=args.until, force=args.force))
        return {}
    if args.clean:
        from pipelines.dag.clean import clean

        with exit_on(ConfigError):
            removed = clean(STAGES, cfg, args.clean)
        print(f"removed {len(removed)} folder(s)")
        return {}
    if args.memory:
        from pipelines.train.memory import print_budgets

        print_budgets(STAGES, cfg)
        return {}
    argv = sys.argv[1:] if argv is None else argv
    try:
        with exit_on(ConfigError, DatasetError, LatentsError, ClusterError, lease.LeaseHeld, lease.LeaseLost):
            try:
                check_from(cfg, args.from_stage, args.until, args.force)
                outcomes = run_pipeline(cfg, from_stage=args.from_stage, until=args.until, force=args.force)
            except CacheMiss as e:  # the command that gets past it: start from the stage that is missing
                # (no --from at all when nothing before the missing stage can come from the cache)
                first_cached = next(s.name for s in STAGES if s.cached)
                raise SystemExit(f"error: {e}; run from it: {resume_command(argv, e.stage, args.force, first_cached)}") from None
    except BaseException as e:
        failure = getattr(e, "stage_failure", None) or getattr(e.__context__, "stage_failure", None)
        # Ctrl-C: no traceback; finished stages and checkpoints are kept. While a stage trains, Ray Train's own SIGINT
        # handler aborts the run and ends in sys.exit: a SystemExit raised inside a stage is that interrupt.
        if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and getattr(e, "stage_failure", None)):
            resume = resume_command(argv, failure.stage, args.force, STAGE_NAMES[0]) if failure else ""
            print(f"\n[{failure.stage}] interrupted; re-run to resume: {resume}" if failure else
                  "\ninterrupted; re-run to resume", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        if failure is None:
            raise
        _exit_on_failure(e, failure, resume_command(argv, failure.stage, args.force, STAGE_NAMES[0], failure.cause))
    _print_where(cfg, outcomes)
    return outcomes


def check_from(cfg, from_stage: str | None, until: str | None, force: str | None) -> None:
    """`--from S` needs a finished run of every cached stage before S: checked in the MLflow store as `--plan` reads it
    (no Ray, nothing written), so a refusal comes before anything starts."""
    if from_stage is None:
        return
    from pipelines.dag.executor import CacheMiss
    from pipelines.dag.plan import plan_pipeline
    from pipelines.platform import tracking

    missing = next((s for s in plan_pipeline(stages(), cfg, from_stage=from_stage, until=until, force=force)
                    if s.action == "error"), None)
    if missing is not None:
        raise CacheMiss(f"--from {from_stage}: stage {missing.stage} has no finished run for this config in "
                        f"{tracking.tracking_uri(cfg.mlflow)}", missing.stage)


def _exit_on_failure(e: BaseException, failure: StageFailure, resume: str) -> None:
    """The failure line, last. A user-facing error (bad input, an outage: already one line) is said once, as the
    line's cause; anything else is a bug and prints its traceback first."""
    import traceback

    sys.stdout.flush()
    if not isinstance(e, SystemExit):
        traceback.print_exception(e)
    print(failure.line(resume), file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def _print_where(cfg, outcomes: dict[str, Outcome]) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.platform import tracking

    print("\nDone.")
    samples = outcomes.get("sample")
    if samples is not None:
        out_dir = samples.outputs.get("out_dir")
        print(f"  samples:  {out_dir} (grid: {out_dir}/grid.png)")
    for stage in stages():
        o = outcomes.get(stage.name)
        shown = {k: round(v, 4) for k, v in o.metrics.items() if k in stage.key_metrics} if o else {}
        if "eval/lpips" in shown and o.run_id:  # an LPIPS number is only readable next to its backbone
            backbone = MlflowClient().get_run(o.run_id).data.tags.get("lpips_backbone", "unknown")
            if backbone != "pretrained":
                shown[f"eval/lpips ({backbone} backbone: not comparable to published LPIPS)"] = shown.pop("eval/lpips")
        if shown:
            print(f"  {stage.name} metrics: {shown}")
    mlflow_cli = Path(sys.executable).with_name("mlflow")  # the one next to this interpreter (.venv/bin/mlflow)
    print(f"  MLflow:   {mlflow_cli if mlflow_cli.exists() else 'mlflow'} ui --workers 1 --backend-store-uri {tracking.tracking_uri(cfg.mlflow)}")
    experiment = MlflowClient().get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:  # MLflow 3's UI opens on GenAI pages unless told the workflow (once; it remembers)
        print(f"            then open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the DAG started (while parsing or importing)
        print("\ninterrupted; re-run to resume", file=sys.stderr)
        raise SystemExit(130) from None

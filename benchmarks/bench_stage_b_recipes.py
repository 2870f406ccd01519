"""Stage B training recipes on the quickstart: held-out denoising loss and MNIST prompt accuracy, over seeds.

    .venv/bin/python benchmarks/bench_stage_b_recipes.py --latents-uri DIR [--seeds 0 1 2]
        [--recipes default,min-snr-5,zero-snr-v] [--config configs/quickstart.yaml]
        [--output-uri /tmp/bench/out] [--tracking-uri sqlite:////tmp/bench/mlflow.db] [--results results.jsonl]
        [--set stage_b.train.max_steps=500 ...]

Every run is `pipelines/stage_b.py` on the same pre-encoded latents (make them once with
`pipelines/run.py --config configs/quickstart.yaml --until encode`), in its own process and its own local Ray,
with `run.seed` = the seed (U-Net init, data order, posterior samples, t, noise) and everything else from the
config plus the recipe's overrides. The numbers are read back from each Stage B MLflow run:

  eval/holdout_loss_ema  the plain (unweighted) denoising MSE of the EMA weights on the held-out rows, at fixed
                         t and noise; comparable between runs with the same prediction target and schedule only
                         (zero-SNR + v predicts v on another schedule, so its loss is in other units);
  eval/prompt_accuracy   the MNIST judge's accuracy on `sample.prompts` rendered at `stage_b.prompt_eval`'s
                         fixed budget (DDIM 25 steps, guidance 4, 10 per digit, the same initial noise).

Each finished run appends one JSON line to --results, and a re-invocation skips the (recipe, seed) pairs already
there, so an interrupted benchmark continues. At the end a table of mean and standard deviation per recipe,
over the seeds actually completed, is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPES: dict[str, list[str]] = {
    "default": [],
    "min-snr-5": ["stage_b.diffusion.snr_gamma=5"],
    "zero-snr-v": ["stage_b.diffusion.zero_terminal_snr=true", "stage_b.diffusion.prediction=v"],
}
"""Recipe name -> `--set` overrides of `stage_b.diffusion` (Hang et al. 2023; Lin et al. 2024)."""

METRICS = ("eval/holdout_loss", "eval/holdout_loss_ema", "eval/prompt_accuracy")


def stage_b_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def run_one(args: argparse.Namespace, recipe: str, seed: int) -> dict:
    name = f"bench-{recipe}-s{seed}"
    overrides = [f"run.name={name}", f"run.seed={seed}", f"run.output_uri={args.output_uri}",
                 f"mlflow.tracking_uri={args.tracking_uri}", f"stage_b.latents_uri={args.latents_uri}",
                 *RECIPES[recipe], *args.overrides]
    cmd = [sys.executable, str(REPO / "pipelines" / "stage_b.py"), "--config", args.config]
    for o in overrides:
        cmd += ["--set", o]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    run_id = next(line.split("run ", 1)[1].split(",")[0] for line in proc.stdout.splitlines()
                  if line.startswith("stage_b finished: run "))
    metrics = stage_b_metrics(args.tracking_uri, run_id)
    return {"recipe": recipe, "seed": seed, "run_id": run_id, "seconds": round(seconds, 1),
            "load_1min": round(os.getloadavg()[0], 2), "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{m: metrics.get(m) for m in METRICS}}


def summarise(rows: list[dict], recipes: list[str]) -> str:
    lines = ["| recipe | seeds | held-out loss (raw) | held-out loss (EMA) | prompt accuracy | seconds per run |",
             "|---|---|---|---|---|---|"]

    def cell(values: list[float], digits: int) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"

    for recipe in recipes:
        done = [r for r in rows if r["recipe"] == recipe]
        if not done:
            continue
        lines.append(f"| {recipe} | {', '.join(str(r['seed']) for r in done)} | "
                     f"{cell([r['eval/holdout_loss'] for r in done], 4)} | {cell([r['eval/holdout_loss_ema'] for r in done], 4)} | "
                     f"{cell([r['eval/prompt_accuracy'] for r in done], 3)} | {cell([r['seconds'] for r in done], 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents-uri", required=True, help="Parquet latents of a finished encode run")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--output-uri", default="/tmp/ldm-bench-recipes/out")
    parser.add_argument("--tracking-uri", default="sqlite:////tmp/ldm-bench-recipes/mlflow.db")
    parser.add_argument("--results", default="/tmp/ldm-bench-recipes/results.jsonl")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"error: unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    # Seed-major order: after any interruption every recipe has about as many seeds as the others.
    for seed in args.seeds:
        for recipe in recipes:
            if any(r["recipe"] == recipe and r["seed"] == seed for r in rows):
                continue
            print(f"[{recipe} seed {seed}] running ...", flush=True)
            row = run_one(args, recipe, seed)
            print(f"[{recipe} seed {seed}] {json.dumps(row)}", flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    print(summarise(rows, recipes))


if __name__ == "__main__":
    main()

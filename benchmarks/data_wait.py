"""Data wait of finished training runs, as the stages logged it (issue 17, item 2).

    .venv/bin/python benchmarks/data_wait.py --tracking-uri sqlite:///outputs/mlflow.db --experiment ldm-quickstart

Every `log_every` steps a stage logs `perf/data_wait_fraction` (the share of the interval's step time spent
waiting for the next batch) and `perf/step_time_s` (that step time). Per run this prints the number of
intervals, the first one (start-up: Ray Data's first execution, the workers' first batches), the range of the
others, and the fraction weighted by step time over all intervals and without the first. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys


def summarize(client, run) -> dict:
    waits = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "perf/data_wait_fraction")}
    times = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "perf/step_time_s")}
    steps = sorted(set(waits) & set(times))
    if not steps:
        return {}

    def weighted(sel: list[int]) -> float:
        total = sum(times[s] for s in sel)
        return sum(waits[s] * times[s] for s in sel) / total if total else 0.0

    rest = steps[1:]
    return {
        "run_id": run.info.run_id, "stage": run.data.tags.get("stage", run.info.run_name), "intervals": len(steps),
        "first": waits[steps[0]], "others_min": min((waits[s] for s in rest), default=float("nan")),
        "others_max": max((waits[s] for s in rest), default=float("nan")),
        "weighted_all": weighted(steps), "weighted_without_first": weighted(rest) if rest else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"no experiment {args.experiment!r} at {args.tracking_uri}", file=sys.stderr)
        return 1
    rows = [r for r in (summarize(client, run) for run in client.search_runs([experiment.experiment_id])) if r]
    if not rows:
        print(f"no run of {args.experiment!r} logged perf/data_wait_fraction", file=sys.stderr)
        return 1
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['stage']:10s} {r['run_id'][:8]}  {r['intervals']:3d} intervals  first {r['first']:6.1%}  "
                  f"others {r['others_min']:.1%}-{r['others_max']:.1%}  weighted: all {r['weighted_all']:.1%}, "
                  f"without the first {r['weighted_without_first']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

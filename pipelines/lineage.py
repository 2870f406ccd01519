"""Lineage on demand: the chain of MLflow runs from a sample run (or a registered model version) back to the dataset.

    python pipelines/lineage.py RUN_ID_OR_MODEL_URI [--config configs/quickstart.yaml] [--format text|json]

RUN_ID_OR_MODEL_URI: a run id, `runs:/<run id>/...`, `models:/<name>/<version>` or `models:/<name>@<alias>`.
For each run of the chain (newest first: sample -> stage_b -> encode -> stage_a -> prepare) it prints its stage,
id, status, key metrics, and the URIs it consumed and produced. The chain follows the `upstream_run_ids` tags
(README "Lineage in MLflow"); the store is MLFLOW_TRACKING_URI, else the config's `mlflow.tracking_uri`.
The DAG's parent run links the same chain in its `summary.md`.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines import tracking
from pipelines.config import add_config_args, config_from_args
from pipelines.runtime import exit_on, setup_logging

KEY_METRICS = {
    "prepare": ("samples", "shards"),
    "stage_a": ("eval/psnr", "eval/ssim", "eval/lpips", "eval/bicubic_psnr", "eval/bicubic_ssim", "perf/images_per_s"),
    "encode": ("encode/rows", "perf/images_per_s"),
    "stage_b": ("perf/images_per_s", "train/loss", "eval/holdout_loss", "eval/holdout_loss_ema"),
    "sample": ("eval/prompt_accuracy", "eval/classifier_holdout_accuracy"),
}
"""The metrics that say how a stage went: shown by lineage.py and in the DAG's summary."""

CONSUMES = {
    "stage_a": ("dataset_uri",),
    "encode": ("autoencoder_uri", "dataset_uri"),
    "stage_b": ("latents_uri", "autoencoder_uri"),
    "sample": ("unet_uri", "autoencoder_uri"),
}
PRODUCES = {
    "prepare": ("dataset_uri",),
    "stage_a": ("model_uri",),
    "encode": ("latents_uri",),
    "stage_b": ("model_uri",),
    "sample": ("out_dir",),
}
"""Which tags of a stage run hold the URIs it consumed and produced (the tags each stage sets)."""


class LineageError(ValueError):
    """The start of the chain cannot be found."""


@dataclass
class LineageEntry:
    stage: str
    run_id: str
    run_name: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    produced: list[str] = field(default_factory=list)
    upstream_run_ids: list[str] = field(default_factory=list)


def resolve_run_id(client: MlflowClient, ref: str) -> str:
    """The run behind a run id, `runs:/<id>/...`, `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    try:
        if ref.startswith("runs:/"):
            return ref[len("runs:/"):].split("/", 1)[0]
        if ref.startswith("models:/"):
            target = ref[len("models:/"):].strip("/")
            if "@" in target:
                name, alias = target.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in target:
                name, number = target.split("/", 1)
                version = client.get_model_version(name, number)
            else:
                raise LineageError(f"{ref}: give a version or an alias (models:/<name>/<version>, models:/<name>@<alias>)")
            if not version.run_id:
                raise LineageError(f"{ref}: this model version records no source run")
            return version.run_id
        return client.get_run(ref).info.run_id
    except MlflowException as e:
        raise LineageError(f"{ref}: {str(e).splitlines()[0]}") from None


def _dataset_inputs(run) -> list[str]:
    """URIs of the datasets logged as the run's MLflow inputs (mlflow.log_input)."""
    uris = []
    for item in getattr(run.inputs, "dataset_inputs", None) or []:
        try:
            source = json.loads(item.dataset.source)
        except (TypeError, ValueError):
            continue
        uri = source.get("uri") if isinstance(source, dict) else None
        if uri:
            uris.append(uri)
    return uris


def entry_of(run) -> LineageEntry:
    tags = run.data.tags
    stage = tags.get(tracking.TAG_STAGE, "?")
    consumed = [tags[t] for t in CONSUMES.get(stage, ()) if tags.get(t)]
    consumed += [u for u in _dataset_inputs(run) if u not in consumed and u.removeprefix("file://") not in consumed]
    return LineageEntry(
        stage=stage,
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        status=run.info.status,
        metrics={m: run.data.metrics[m] for m in KEY_METRICS.get(stage, ()) if m in run.data.metrics},
        consumed=consumed,
        produced=[tags[t] for t in PRODUCES.get(stage, ()) if tags.get(t)],
        upstream_run_ids=[r for r in tags.get(tracking.TAG_UPSTREAM, "").split(",") if r],
    )


def lineage_chain(client: MlflowClient, ref: str) -> list[LineageEntry]:
    """Every run the run behind `ref` descends from, breadth first (each run once): sample, stage_b, encode,
    stage_a, prepare for a full pipeline."""
    start = resolve_run_id(client, ref)
    chain: list[LineageEntry] = []
    queue, seen = [start], set()
    while queue:
        run_id = queue.pop(0)
        if run_id in seen:
            continue
        seen.add(run_id)
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise LineageError(f"run {run_id} (upstream of {chain[-1].run_id if chain else ref}) is not in this store: "
                               f"{str(e).splitlines()[0]}") from None
        entry = entry_of(run)
        chain.append(entry)
        queue += entry.upstream_run_ids
    return chain


def _metrics_text(entry: LineageEntry) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in entry.metrics.items())


def to_text(chain: list[LineageEntry]) -> str:
    lines = []
    for e in chain:
        lines.append(f"{e.stage:8s} {e.run_id}  {e.status}" + (f"  {_metrics_text(e)}" if e.metrics else ""))
        for uri in e.consumed:
            lines.append(f"    consumed  {uri}")
        for uri in e.produced:
            lines.append(f"    produced  {uri}")
    return "\n".join(lines)


def to_markdown(chain: list[LineageEntry]) -> str:
    """The chain as a Markdown table (the DAG's summary.md)."""
    rows = ["| stage | run | status | key metrics | consumed | produced |", "|---|---|---|---|---|---|"]
    for e in chain:
        rows.append(f"| {e.stage} | `{e.run_id}` | {e.status} | {_metrics_text(e)} | "
                    f"{'<br>'.join(e.consumed)} | {'<br>'.join(e.produced)} |")
    return "\n".join(rows)


def to_json(chain: list[LineageEntry]) -> str:
    return json.dumps({"chain": [asdict(e) for e in chain]}, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> list[LineageEntry]:
    setup_logging()
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("ref", metavar="RUN_ID_OR_MODEL_URI", help="a run id, runs:/<id>/..., models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="text for people, json for tools")
    args = parser.parse_args(argv)
    with exit_on(ConfigError, LineageError):
        cfg = config_from_args(args)
        uri = tracking.tracking_uri(cfg.mlflow)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise LineageError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI or mlflow.tracking_uri)")
        mlflow.set_tracking_uri(uri)
        chain = lineage_chain(MlflowClient(uri), args.ref)
    print(to_json(chain) if args.format == "json" else to_text(chain))
    return chain


if __name__ == "__main__":
    main()

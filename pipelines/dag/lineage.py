"""Lineage: the chain of MLflow runs from a run (or a registered model version) back to the dataset, following the
`upstream_run_ids` tags; what each run consumed and produced comes from its stage's description (`Stage.consumes`,
`Stage.produces`, `Stage.key_metrics`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.dag.stage import Stage, index
from pipelines.platform import tracking


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


def entry_of(run, stages: tuple[Stage, ...]) -> LineageEntry:
    tags = run.data.tags
    stage = tags.get(tracking.TAG_STAGE, "?")
    described = index(stages).get(stage, Stage(stage, run=None))  # a run of no known stage: no metrics or URIs
    consumed = [tags[t] for t in described.consumes if tags.get(t)]
    consumed += [u for u in _dataset_inputs(run) if u not in consumed and u.removeprefix("file://") not in consumed]
    return LineageEntry(
        stage=stage,
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        status=run.info.status,
        metrics={m: run.data.metrics[m] for m in described.key_metrics if m in run.data.metrics},
        consumed=consumed,
        produced=[tags[t] for t in described.produces if tags.get(t)],
        upstream_run_ids=[r for r in tags.get(tracking.TAG_UPSTREAM, "").split(",") if r],
    )


def lineage_chain(client: MlflowClient, ref: str, stages: tuple[Stage, ...]) -> list[LineageEntry]:
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
        entry = entry_of(run, stages)
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

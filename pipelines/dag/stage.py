"""A node of the pipeline DAG, described once: what it consumes and produces, which config its result depends
on, how it is checked before any work, how it runs, and how its finished outputs are verified.

Each entry point (`pipelines/prepare_data.py`, `stage_a.py`, `encode_latents.py`, `stage_b.py`, `sample.py`)
declares its `STAGE`; `pipelines/run.py` lists them in order. The DAG runner (`dag/executor.py`), `--plan`
(`dag/plan.py`), lineage (`dag/lineage.py`) and the memory check read these objects and nothing else, so a new
stage is one new entry point plus its place in that list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.train.memory import MemoryBudget


class StageResult(Protocol):
    """What a stage's `run` returns (each stage's own result dataclass has these)."""

    run_id: str | None
    metrics: dict

    @property
    def status(self) -> str:
        """"ran", "resumed" (an interrupted run continued), "reused" (its output was already there) or "skipped"."""

    @property
    def outputs(self) -> dict[str, str]:
        """What it produced, by the names of `Stage.produces` (URIs, and `digest` for a dataset)."""


@dataclass(frozen=True)
class Stage:
    name: str
    """The stage's name: its runs' `stage` tag, its config section (when it has one) and `--from/--until/--force`."""
    run: Callable[..., StageResult]
    """Runs the stage: `run(cfg, *, parent_run_id, upstream_run_ids, extra_tags, checked)`. `checked=True`: the
    caller already ran `check` on `cfg` (the DAG checks every stage before the first one starts)."""
    inputs: tuple[str, ...] = ()
    """The stages whose outputs it consumes: its cache key's inputs and its `upstream_run_ids`."""
    sections: tuple[str, ...] = ()
    """Dotted config paths its result depends on (with its inputs' keys and the dataset digest: its cache key)."""
    wiring: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Config fields the DAG fills from an input's outputs: `{"encode.autoencoder_uri": ("stage_a", "model_uri")}`."""
    consumes: tuple[str, ...] = ()
    """Tags of its runs that name the URIs it consumed (lineage)."""
    produces: tuple[str, ...] = ()
    """Tags of its runs that name what it produced: the outputs a cache hit restores (lineage too)."""
    key_metrics: tuple[str, ...] = ()
    """The metrics that say how it went: shown by lineage.py and in the DAG's summary."""
    summary_artifact: str | None = None
    """An image of its run that the pipeline run's summary shows (a reconstruction or sample grid)."""
    check: Callable[["PipelineConfig"], "PipelineConfig"] | None = None
    """Checks that need no cluster, run before any stage starts (a GPU that cannot hold the model, an init_from
    that cannot be read); returns the config the stage runs with (an adopted architecture). Raises ConfigError."""
    lost_outputs: Callable[[Any, "PipelineConfig"], str] | None = None
    """What a finished run's outputs lack ("" when all there): a cache hit whose output is gone runs again."""
    memory: Callable[["PipelineConfig", str], "MemoryBudget"] | None = None
    """Its peak GPU memory per worker (training stages), for the memory check and `run.py --memory`."""
    trains: bool = False
    """A training stage: an unfinished run resumes from its last checkpoint (its Ray Train run name carries the key)."""
    lineage_checked: bool = True
    """Reused only from a finished run that consumed the very upstream runs chosen now."""
    cached: bool = True
    """False: never taken from the cache; it runs every time and finds for itself whether there is work (prepare)."""
    provides_dataset: bool = False
    """Its `digest` output is the dataset digest that every later stage's cache key includes."""
    existing: Callable[["PipelineConfig"], dict[str, str]] | None = None
    """For an uncached stage before `--from`: its outputs as they exist, without running it."""
    output_parent: Callable[["PipelineConfig"], str] | None = None
    """The folder holding one output folder per execution (encode's latents, sample's samples): what
    `run.py --clean` removes. A training stage's are its checkpoint folders, found without it."""
    lease_name: Callable[["PipelineConfig", str], str] | None = None
    """Its execution lease's name from (config, cache key); None: `<stage>-<key prefix>`."""


@dataclass
class Outcome:
    """What one node produced in this invocation: its MLflow run, its outputs and metrics, and what happened."""

    stage: str
    status: str  # "ran", "resumed", "reused", "skipped"
    run_id: str | None
    cache_key: str
    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def section_values(cfg: "PipelineConfig", paths: tuple[str, ...]) -> dict:
    """The JSON values of `paths` (dotted) in `cfg`: what a stage's cache key hashes."""
    dumped = cfg.model_dump(mode="json")
    out = {}
    for path in paths:
        node = dumped
        for part in path.split("."):
            node = node[part]
        out[path] = node
    return out


def set_field(cfg: "PipelineConfig", dotted: str, value: Any) -> None:
    """Set a dotted config field in place (the DAG's wiring of one stage's output into the next one's config)."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


def index(stages: tuple[Stage, ...]) -> dict[str, Stage]:
    return {s.name: s for s in stages}

"""`run.py --clean [STAGE]`: remove the output folders of STAGE and of every stage after it (all stages without
STAGE), naming each, and keep the ones that a run of another MLflow store still points at.

A stage's folders are one per execution: a training stage's checkpoint folders (`<checkpoint root>/<name>-<stage>`,
with their lease files), encode's latents folders, sample's sample folders (`Stage.output_parent`). A run points at
a folder through the tags of `Stage.produces` and, for a training stage, its Ray Train name. The other stores are
the ones that have written into this `run.output_uri` (`tracking.setup` records them in `stores.json` there); one
that cannot be read keeps everything. The dataset (`data.uri`) is an input and is never removed.

In this store the stage's runs stay (their history), but lose their `cache_key` tag: the next run executes the
stage again instead of reusing a run whose outputs are gone.
"""

from __future__ import annotations

import pyarrow.fs as pafs
from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.dag.stage import Stage
from pipelines.platform import storage, tracking


def stage_folders(stage: Stage, cfg: PipelineConfig) -> list[str]:
    """The stage's output folders that exist now, as storage URIs."""
    if stage.trains:
        parent, suffix = cfg.run.checkpoint_root, f"-{stage.name}"
    elif stage.output_parent is not None:
        parent, suffix = stage.output_parent(cfg), ""
    else:
        return []
    loc = storage.resolve(parent, cfg.storage)
    if not storage.exists(loc):
        return []
    return sorted(loc.join(info.base_name).uri for info in loc.filesystem.get_file_info(pafs.FileSelector(loc.path))
                  if info.type == pafs.FileType.Directory and info.base_name.endswith(suffix))


def pointed_at(stage: Stage, run, cfg: PipelineConfig) -> set[str]:
    """The folders a run of `stage` points at, as storage URIs."""
    tags = run.data.tags
    uris = [tags[t] for t in stage.produces if tags.get(t)]
    if stage.trains and tags.get("ray_train_name"):
        uris.append(f"{cfg.run.checkpoint_root.rstrip('/')}/{tags['ray_train_name']}")
    out = set()
    for uri in uris:
        try:
            out.add(storage.resolve(uri, cfg.storage).uri)
        except ValueError:  # a models:/ URI, not a folder
            continue
    return out


def _runs(uri: str, cfg: PipelineConfig, stage: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.{tracking.TAG_STAGE} = '{stage}'", max_results=10000)


def clean(stages: tuple[Stage, ...], cfg: PipelineConfig, from_stage: str) -> list[str]:
    """Remove the folders of `from_stage` and the stages after it that no run of another store points at; print
    each removal and each kept folder with the run that keeps it. Returns the URIs removed."""
    this = tracking.tracking_uri(cfg.mlflow)
    others = [u for u in tracking.known_stores(cfg.run.output_uri) if u != this]
    names = [s.name for s in stages]
    removed = []
    for stage in stages[names.index(from_stage):]:
        folders = stage_folders(stage, cfg)
        keep: dict[str, str] = {}
        for other in others:
            try:
                tracking.check_reachable_uri(other)
                runs = [] if tracking.store_absent(other) else _runs(other, cfg, stage.name)
            except Exception as e:  # a store that cannot be read might point at any of them
                keep.update({f: f"store {other} cannot be read ({type(e).__name__})" for f in folders})
                continue
            for run in runs:
                keep.update({f: f"run {run.info.run_id} of {other} points at it" for f in pointed_at(stage, run, cfg)})
        for folder in folders:
            if folder in keep:
                print(f"[{stage.name}] kept     {folder}: {keep[folder]}", flush=True)
                continue
            loc = storage.resolve(folder, cfg.storage)
            storage.delete_dir(loc)
            lease_file = storage.resolve(f"{folder}.lease.json", cfg.storage)
            if storage.exists(lease_file):
                lease_file.filesystem.delete_file(lease_file.path)
            print(f"[{stage.name}] removed  {folder}", flush=True)
            removed.append(folder)
        if not tracking.store_absent(this):
            client = MlflowClient(this)
            uncached = [r for r in _runs(this, cfg, stage.name) if tracking.TAG_CACHE_KEY in r.data.tags]
            for run in uncached:
                client.delete_tag(run.info.run_id, tracking.TAG_CACHE_KEY)
            if uncached:
                print(f"[{stage.name}] {len(uncached)} run(s) of {this} will not be reused (their cache_key tag is "
                      f"removed)", flush=True)
    return removed

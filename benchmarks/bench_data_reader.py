"""Images per second: the Ray Data reader (pipelines/data/reader.py) against a plain torch DataLoader with
2 worker processes, over the same local shards, parsing and decoding them with the same functions
(`read_shard`, `decode_sample`: decode, RGB, resize, random crop, flip, [-1, 1]).

    .venv/bin/python benchmarks/bench_data_reader.py [--source mnist|skimage] [--format webdataset|parquet]

Both paths deliver float32 batches to this process. Epochs alternate (Ray, DataLoader, Ray, ...) so that
load from other processes hits both alike; the first epoch of each is a warm-up (Ray starts its workers,
the page cache fills) and the reported rate is the median of the others. Results go to
benchmarks/README.md by hand, with the machine and the date. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data import DataConfig, build_dataset, decode_sample, prepare_dataset
from pipelines.data.reader import SkipSample, read_shard
from pipelines.data.shards import PARQUET_COLUMNS


class ShardFiles(IterableDataset):
    """The DataLoader baseline: worker i of n takes every n-th shard, parses and decodes it like the reader."""

    def __init__(self, root: Path, manifest: dict, cfg: DataConfig):
        self.root, self.cfg = root, cfg
        self.paths = [s["path"] for s in manifest["shards"]]
        self.columns = manifest.get("columns", PARQUET_COLUMNS)

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([wid, int(np.random.default_rng().integers(2**31))])
        for rel in self.paths[wid::n]:
            for sample in read_shard((self.root / rel).read_bytes(), rel, self.columns).samples:
                try:
                    image, _ = decode_sample(sample.image, self.cfg, rng)
                except SkipSample:
                    continue
                yield torch.from_numpy(image)


def one_epoch(batches) -> float:
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += batch.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="mnist", choices=["mnist", "skimage"])
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4, help="per reader, the first one a warm-up")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--cpus-per-task", type=float, default=DataConfig.model_fields["cpus_per_task"].default)
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (the DataLoader has 2 workers)")
    args = parser.parse_args()

    import ray

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    uri = str(work / args.source)
    manifest = prepare_dataset(args.source, uri, fmt=args.format, shard_size=args.shard_size)
    cfg = DataConfig(uri=uri, resolution=args.resolution, crop="random", random_flip=True, holdout_fraction=0.0,
                     cpus_per_task=args.cpus_per_task, reserved_cpus=0)

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds, skips = build_dataset(cfg, split="all", shuffle=True, seed=0, columns=["image"])
    loader = DataLoader(ShardFiles(Path(uri), manifest, cfg), batch_size=args.batch_size, num_workers=2,
                        persistent_workers=True)
    ray_rates, torch_rates = [], []
    for _ in range(args.epochs):
        ray_rates.append(one_epoch(b["image"] for b in ds.iter_torch_batches(batch_size=args.batch_size)))
        torch_rates.append(one_epoch(iter(loader)))
    skipped = skips.snapshot()
    ray.shutdown()

    ray_rate, torch_rate = np.median(ray_rates[1:]), np.median(torch_rates[1:])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, ray {ray.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"dataset: {args.source} ({args.format}), {manifest['num_samples']} images in {len(manifest['shards'])} "
          f"shards, {args.resolution} px crops, batch {args.batch_size}, Ray num_cpus {args.ray_cpus}, "
          f"data.cpus_per_task {args.cpus_per_task}; repairs/skips {skipped}")
    print(f"ray data reader:   {ray_rate:8.0f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in ray_rates)})")
    print(f"torch DataLoader:  {torch_rate:8.0f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in torch_rates)})")
    print(f"ratio ray/torch:   {ray_rate / torch_rate:8.2f}")


if __name__ == "__main__":
    main()

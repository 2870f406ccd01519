"""Images per second: the Ray Data reader (pipelines/data/reader.py) against a plain torch DataLoader
with 2 worker processes, over the same local shards, decoding and cropping the same way (decode_image).

    .venv/bin/python benchmarks/bench_data_reader.py [--source skimage|mnist] [--epochs 2]

Both paths read whole shards, decode with the same function and batch to float32 tensors on the driver.
The first epoch is a warm-up (Ray starts workers, the page cache fills); the reported rate is the mean of
the remaining epochs. Results go to benchmarks/README.md by hand, with the machine and date.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data import DataConfig, build_dataset, decode_image, prepare_dataset, read_manifest
from pipelines.data.reader import IMAGE_EXTS


class TarShards(IterableDataset):
    """The DataLoader baseline: each worker takes every n-th shard and decodes it like the Ray reader."""

    def __init__(self, paths: list[str], cfg: DataConfig):
        self.paths, self.cfg = paths, cfg

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(wid)
        for path in self.paths[wid::n]:
            with tarfile.open(path) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name, member in members.items():
                    key, ext = name.rsplit(".", 1)
                    if ext not in IMAGE_EXTS:
                        continue
                    image, _ = decode_image(tar.extractfile(member).read(), resolution=self.cfg.resolution,
                                            crop=self.cfg.crop, random_flip=self.cfg.random_flip,
                                            min_size=self.cfg.min_size, rng=rng)
                    yield torch.from_numpy(image)


def time_epochs(make_iter, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        start, count = time.perf_counter(), 0
        for batch in make_iter():
            count += batch.shape[0]
        rates.append(count / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="skimage", choices=["skimage", "mnist"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cpus-per-task", type=float, default=DataConfig.model_fields["cpus_per_task"].default)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    uri = str(work / args.source)
    prepare_dataset(args.source, uri, shard_size=100)
    manifest = read_manifest(uri)
    cfg = DataConfig(uri=uri, resolution=args.resolution, crop="random", random_flip=True, holdout_fraction=0.0,
                     cpus_per_task=args.cpus_per_task, reserved_cpus=0)
    paths = [str(Path(uri) / s["path"]) for s in manifest["shards"]]

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds, _ = build_dataset(cfg, split="all", shuffle=True)
    ds = ds.select_columns(["image"])
    ray_rates = time_epochs(lambda: (b["image"] for b in ds.iter_torch_batches(batch_size=args.batch_size)), args.epochs)
    ray.shutdown()

    loader = DataLoader(TarShards(paths, cfg), batch_size=args.batch_size, num_workers=2, persistent_workers=True)
    torch_rates = time_epochs(lambda: iter(loader), args.epochs)

    ray_rate, torch_rate = np.mean(ray_rates[1:]), np.mean(torch_rates[1:])
    print(f"dataset: {args.source}, {manifest['num_samples']} images in {len(paths)} shards, crops {args.resolution}px, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, Ray Data cpus_per_task {args.cpus_per_task}")
    print(f"ray data reader:   {ray_rate:8.1f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in ray_rates)})")
    print(f"torch DataLoader:  {torch_rate:8.1f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in torch_rates)})")
    print(f"ratio ray/torch:   {ray_rate / torch_rate:8.2f}")


if __name__ == "__main__":
    main()

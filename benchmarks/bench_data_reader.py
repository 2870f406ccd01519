"""Images per second: the Ray Data reader (pipelines/data/reader.py) against a plain torch DataLoader with
2 worker processes, over the same local shards, parsing and decoding them with the same functions
(`read_shard`, `decode_sample`: decode, RGB, resize, random crop, flip, [-1, 1]).

    .venv/bin/python benchmarks/bench_data_reader.py [--source mnist|skimage|photos256] [--format webdataset|parquet]

`photos256`: JPEG photographs (quality 90) of 256 to 384 px on the shorter side, random crops of
scikit-image's bundled photographs, written once to a folder and sharded from there: what a real corpus
of photos looks like to the reader (decode a JPEG, resize, crop 256 px), unlike the PNG crops of `skimage`.

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


def photo_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs cut from scikit-image's photographs: random boxes, resized to a shorter side of 256-384 px
    with aspect ratios from 3:4 to 4:3 (the photos repeat: there are 15 of them)."""
    import skimage.data
    from PIL import Image

    from pipelines.data.sources import SKIMAGE_PHOTOS

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SKIMAGE_PHOTOS]
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        short, aspect = int(rng.integers(256, 385)), float(rng.uniform(0.75, 4 / 3))
        size = (round(short * max(aspect, 1.0)), round(short / min(aspect, 1.0)))
        photo.crop((x0, y0, x0 + side, y0 + side)).resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def busy_cpu_seconds() -> float:
    """CPU-seconds this machine's cores have spent busy since boot (/proc/stat: everything but idle and
    iowait). Over an epoch it counts the reader's processes whatever they are (Ray's raylet, workers that
    start and stop, the DataLoader's workers) and anything else running then: read it with the load."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def one_epoch(batches) -> tuple[float, float]:
    """(images per second, images per busy CPU-second of the machine) over one pass."""
    start, cpu0, count = time.perf_counter(), busy_cpu_seconds(), 0
    for batch in batches:
        count += batch.shape[0]
    return count / (time.perf_counter() - start), count / max(busy_cpu_seconds() - cpu0, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="mnist", choices=["mnist", "skimage", "photos256"])
    parser.add_argument("--count", type=int, default=2000, help="photos256: how many JPEGs")
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"])
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4, help="per reader, the first one a warm-up")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--cpus-per-task", type=float, default=None,
                        help="data.cpus_per_task (default: unset, chosen as a stage would for --ray-cpus free CPUs)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (the DataLoader has 2 workers)")
    args = parser.parse_args()

    import ray

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    uri = str(work / args.source)
    source = str(photo_folder(work / "jpegs", args.count)) if args.source == "photos256" else args.source
    manifest = prepare_dataset(source, uri, fmt=args.format, shard_size=args.shard_size)
    cfg = DataConfig(uri=uri, resolution=args.resolution, crop="random", random_flip=True, holdout_fraction=0.0,
                     cpus_per_task=args.cpus_per_task, reserved_cpus=0)

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds, skips = build_dataset(cfg, split="all", shuffle=True, seed=0, columns=["image"])
    loader = DataLoader(ShardFiles(Path(uri), manifest, cfg), batch_size=args.batch_size, num_workers=2,
                        persistent_workers=True)
    ray_runs, torch_runs = [], []
    for _ in range(args.epochs):
        ray_runs.append(one_epoch(b["image"] for b in ds.iter_torch_batches(batch_size=args.batch_size)))
        torch_runs.append(one_epoch(iter(loader)))
    skipped = skips.snapshot()
    ray.shutdown()

    ray_rates, torch_rates = [r for r, _ in ray_runs], [r for r, _ in torch_runs]
    ray_rate, torch_rate = np.median(ray_rates[1:]), np.median(torch_rates[1:])
    ray_cpu, torch_cpu = np.median([c for _, c in ray_runs[1:]]), np.median([c for _, c in torch_runs[1:]])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, ray {ray.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"dataset: {args.source} ({args.format}), {manifest['num_samples']} images in {len(manifest['shards'])} "
          f"shards, {args.resolution} px crops, batch {args.batch_size}, Ray num_cpus {args.ray_cpus}, "
          f"data.cpus_per_task {cfg.fit(args.ray_cpus).cpus_per_task:g}"
          f"{' (unset: chosen by DataConfig.fit)' if args.cpus_per_task is None else ''}; repairs/skips {skipped}")
    print(f"ray data reader:   {ray_rate:8.0f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in ray_rates)})")
    print(f"torch DataLoader:  {torch_rate:8.0f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in torch_rates)})")
    print(f"ratio ray/torch:   {ray_rate / torch_rate:8.2f}")
    print(f"per CPU-second:    ray {ray_cpu:.0f}, torch {torch_cpu:.0f} images; ratio {ray_cpu / torch_cpu:.2f} "
          f"(the machine's busy CPU time during the epochs)")


if __name__ == "__main__":
    main()

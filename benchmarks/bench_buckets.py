"""Aspect-ratio buckets against one square crop: reader images/s, the share of pixels cropping throws away, and the
straggler cost of letting each rank train on its own bucket.

    .venv/bin/python benchmarks/bench_buckets.py [--images 600] [--out benchmarks/results/buckets_cpu_DATE.jsonl]

Two datasets, written once to a temporary folder as Parquet shards:
- `photos`: scikit-image's photographs at their own shapes and several scales (`data.photo_crops: any`, the source
  configs/photos.yaml uses), shorter side 128 px;
- `mixed`: JPEGs (quality 90) of random aspect ratio, 1:3 to 3:1 (log-uniform), long side 96-384 px, cut from the same
  photographs: what a scraped corpus looks like in shape.

For each, the same reader (pipelines/data/reader.py on a local Ray, 2 CPUs) streams it twice: square (every image
covered and cropped to 64 x 64, today's path, batched by `iter_torch_batches`) and bucketed (the 64 x 64-pixel grid of
configs/photos.yaml, step 8, aspect <= 2, batched one shape at a time by `iter_shape_batches`). Passes alternate
(square, buckets, square, ...); the first of each is a warm-up and the rate is the median of the rest. The cropped
share is computed from every image's stored size (`cropped_fraction`).

Straggler cost: the photos config's Stage A step (autoencoder + LPIPS-free loss + discriminator, batch 8) timed on
each bucket's shape; with each rank on its own bucket, a DDP step waits for the slowest rank, so the cost over a step
at the mean is at most max/mean of these times. Not a test: nothing is asserted. Results go to benchmarks/README.md by
hand, with the machine and the date.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from pipelines.config import load_config
from pipelines.config.data import BucketGrid, DataConfig
from pipelines.data import build_dataset, prepare_dataset
from pipelines.data.buckets import cropped_fraction, iter_shape_batches, nearest_bucket

REPO = Path(__file__).resolve().parents[1]
SQUARE = 64
GRID = BucketGrid(area=SQUARE * SQUARE, step=8, max_aspect=2.0)


def mixed_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of random aspect ratio (1:3 to 3:1) and size, cut from scikit-image's photographs."""
    import skimage.data

    from pipelines.data.sources import SKIMAGE_PHOTOS

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SKIMAGE_PHOTOS]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        aspect = float(np.exp(rng.uniform(-np.log(3), np.log(3))))
        w, h = photo.size
        cw = min(w, round(h * aspect))
        ch = min(h, round(cw / aspect))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(96, 385))
        scale = long_side / max(cw, ch)
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((max(8, round(cw * scale)), max(8, round(ch * scale))),
                                                           Image.BICUBIC)
        crop.save(folder / f"mixed{i:05d}.jpg", quality=90)
        (folder / f"mixed{i:05d}.txt").write_text("a photo")
    return folder


def stored_sizes(root: Path) -> list[tuple[int, int]]:
    """(height, width) of every stored image of a Parquet shard set."""
    import pyarrow.parquet as pq

    sizes = []
    for path in sorted(root.rglob("*.parquet")):
        for cell in pq.read_table(path, columns=["image"]).column("image").to_pylist():
            data = cell["bytes"] if isinstance(cell, dict) else cell
            with Image.open(io.BytesIO(data)) as img:
                sizes.append((img.size[1], img.size[0]))
    return sizes


def reader_rate(cfg: DataConfig, bucketed: bool) -> float:
    """Images per second of one pass of the reader over the whole dataset, as the Train workers consume it."""
    ds, _ = build_dataset(cfg, split="all", shuffle=True, seed=int(time.time()), columns=("image",))
    start, n = time.perf_counter(), 0
    if bucketed:
        batches = iter_shape_batches(ds, batch_size=cfg.batch_size, device=torch.device("cpu"), drop_last=True,
                                     local_shuffle_buffer_size=cfg.shuffle_buffer)
    else:
        batches = ds.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                        local_shuffle_buffer_size=cfg.shuffle_buffer)
    for batch in batches:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def step_times(shapes: list[tuple[int, int]], repeats: int) -> dict[str, float]:
    """Median seconds of the photos config's Stage A training step (no LPIPS) at each shape."""
    from ldm_core.autoencoder import AutoencoderKL
    from ldm_core.discriminator import NLayerDiscriminator
    from pipelines.train.steps import autoencoder_loss

    cfg = load_config(REPO / "configs/photos.yaml", [])
    sa = cfg.stage_a
    torch.manual_seed(0)
    model, disc = AutoencoderKL(sa.model), NLayerDiscriminator(sa.discriminator)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = {}
    for h, w in shapes:
        x = torch.rand(cfg.data.batch_size, 3, h, w) * 2 - 1
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, _ = autoencoder_loss(model, disc, {"image": x}, sa.loss.disc_start + 1, cfg=sa.loss.model_copy(update={"perceptual_weight": 0.0}), lpips=None,
                                       last_layer=model.last_layer)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[f"{h}x{w}"] = statistics.median(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600, help="images in the mixed-shape set (photos: 15 x 40)")
    parser.add_argument("--passes", type=int, default=4, help="timed passes of each reader (after one warm-up each)")
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--out", default=f"benchmarks/results/buckets_cpu_{time.strftime('%Y-%m-%d')}.jsonl")
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    machine = {"machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "load_before": os.getloadavg()[0], "torch": torch.__version__, "ray": ray.__version__}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {
            "photos": prepare_dataset("skimage", str(tmp / "photos"), fmt="parquet", shard_size=64, resolution=128,
                                      crops_per_photo=40, photo_crops="any"),
            "mixed": prepare_dataset(str(mixed_folder(tmp / "mixed_src", args.images)), str(tmp / "mixed"),
                                     fmt="parquet", shard_size=64),
        }
        for name, manifest in sets.items():
            root = tmp / name
            sizes = stored_sizes(root)
            square = DataConfig(uri=str(root), resolution=SQUARE, crop="random", batch_size=8, shuffle_buffer=64)
            buckets = DataConfig.model_validate({**square.model_dump(), "buckets": GRID.model_dump()})
            shapes = buckets.shapes
            share = {
                "square": float(np.mean([cropped_fraction(h, w, (SQUARE, SQUARE)) for h, w in sizes])),
                "buckets": float(np.mean([cropped_fraction(h, w, nearest_bucket(h, w, shapes)) for h, w in sizes])),
            }
            per_bucket = {}
            for h, w in sizes:
                key = "x".join(map(str, nearest_bucket(h, w, shapes)))
                per_bucket[key] = per_bucket.get(key, 0) + 1
            rates = {"square": [], "buckets": []}
            for _ in range(args.passes + 1):
                rates["square"].append(reader_rate(square, bucketed=False))
                rates["buckets"].append(reader_rate(buckets, bucketed=True))
            row = {"dataset": name, "images": manifest["num_samples"], "shapes": [list(s) for s in shapes],
                   "images_per_bucket": per_bucket, "cropped_share": share,
                   "images_per_s": {k: statistics.median(v[1:]) for k, v in rates.items()},
                   "images_per_s_passes": rates, **machine}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("dataset", "images", "images_per_bucket", "cropped_share", "images_per_s")}))
    steps = step_times(GRID.shapes(), args.step_repeats)
    mean = statistics.mean(steps.values())
    rows.append({"straggler": {"step_s": steps, "max_over_mean": max(steps.values()) / mean,
                               "square_step_s": step_times([(SQUARE, SQUARE)], args.step_repeats)}, **machine,
                 "load_after": os.getloadavg()[0]})
    print(json.dumps(rows[-1]["straggler"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

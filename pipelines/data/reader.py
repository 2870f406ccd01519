"""The one image reader every stage uses: shards -> Ray Data -> batches of `image`, `caption`, `key`.

Ray Data reads whole shard files (in shuffled order when training), a decode task explodes each shard into
samples, decodes them, converts any mode to RGB, resizes the shorter side to the resolution, crops (random
or centre), flips when configured and normalises to [-1, 1] (float32, CHW). Nothing is materialised:
blocks stream to the Train workers, which add a local shuffle buffer and get their own split through
`ray.train.get_dataset_shard`.

Bad data never fails the job and is never silently dropped: every sample that is skipped or repaired is
recorded by reason (once per sample, however many epochs re-read it) in a `SkipCounter` actor, which the
driver and the Train workers read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import uuid
from collections import Counter
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import ray
from PIL import Image, ImageFile

from pipelines import storage
from pipelines.data.config import DataConfig
from pipelines.data.shards import read_manifest
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
COUNTER_NAMESPACE = "ldm-data"

# Reasons a sample is dropped; every other reason in the counts is a repair (the sample is kept).
DROP_REASONS = ("empty_image", "corrupt_image", "too_small", "missing_image", "corrupt_shard", "corrupt_member")


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Decoding one image (shared with the plain-PyTorch benchmark path)
# ---------------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> RGB. Returns the image and the repair applied (None when it was RGB already)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
        return img.convert("RGB"), "converted_16bit"
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img, "converted_palette"
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), "converted_alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "converted_cmyk"
    return img.convert("RGB"), f"converted_{mode.lower().replace(';', '')}"


def decode_image(data: bytes, *, resolution: int, crop: str, random_flip: bool, min_size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Encoded image bytes -> float32 (3, R, R) in [-1, 1], plus the repairs made. Raises SkipSample."""
    if not data:
        raise SkipSample("empty_image")
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # truncated files fail here, not lazily later
            img = opened.copy()
    except Exception:
        raise SkipSample("corrupt_image") from None
    img, repair = to_rgb(img)
    if repair:
        notes.append(repair)
    w, h = img.size
    if min(w, h) < max(min_size, 1):
        raise SkipSample("too_small")
    if min(w, h) < resolution:
        notes.append("upscaled")
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    if crop == "random":
        x0, y0 = int(rng.integers(0, new_w - resolution + 1)), int(rng.integers(0, new_h - resolution + 1))
    else:
        x0, y0 = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((x0, y0, x0 + resolution, y0 + resolution))
    arr = np.asarray(img, dtype=np.float32)
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)) / 127.5 - 1.0, notes


def in_split(key: str, split: str, holdout_fraction: float) -> bool:
    """Stable train/holdout assignment from a hash of the key."""
    if split == "all":
        return True
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    return (bucket < holdout_fraction) == (split == "holdout")


# ---------------------------------------------------------------------------------------------------
# Exploding shards into samples
# ---------------------------------------------------------------------------------------------------


def iter_tar(payload: bytes, shard: str) -> Iterator[tuple[str, bytes | None, str | None, str | None]]:
    """(key, image bytes, caption, problem) per sample of a webdataset tar; tolerant of corrupt members."""
    groups: dict[str, dict[str, bytes]] = {}
    problems: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError:
                    problems.append("corrupt_member")
                    break
                if member is None:
                    break
                if not member.isfile() or "." not in member.name.rsplit("/", 1)[-1]:
                    continue
                key, ext = member.name.rsplit(".", 1)
                try:
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError("short read")
                except (tarfile.TarError, OSError):
                    problems.append("corrupt_member")
                    break  # the stream is broken past this member: nothing after it can be trusted
                groups.setdefault(key, {})[ext.lower()] = data
    except tarfile.TarError:
        problems.append("corrupt_shard")
    for i, reason in enumerate(problems):
        yield f"{shard}#{reason}{i}", None, None, reason
    for key, parts in groups.items():
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        caption = parts["txt"].decode("utf-8", "replace").strip() if "txt" in parts else None
        yield key, image, caption, None if image is not None else "missing_image"


def iter_parquet(payload: bytes, shard: str) -> Iterator[tuple[str, bytes | None, str | None, str | None]]:
    try:
        table = pq.read_table(io.BytesIO(payload), columns=["key", "image", "caption"])
    except Exception:
        yield f"{shard}#corrupt_shard", None, None, "corrupt_shard"
        return
    for key, image, caption in zip(*(table.column(c).to_pylist() for c in ("key", "image", "caption"))):
        yield str(key), image, caption, None if image is not None else "missing_image"


SHARD_READERS = {".tar": iter_tar, ".parquet": iter_parquet}


def decode_shards(batch: dict, *, cfg: dict, split: str, seed: int, counter_name: str) -> dict:
    """Ray Data map_batches fn: a batch of whole shard files -> a batch of decoded samples."""
    images, captions, keys = [], [], []
    events: dict[str, str] = {}  # sample id -> reason, sent to the counter once per call
    for payload, path in zip(batch["bytes"], batch["path"]):
        suffix = "." + str(path).rsplit(".", 1)[-1]
        shard = str(path).rsplit("/", 1)[-1]
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.blake2b(shard.encode(), digest_size=4).digest(), "big"),
                                     int(np.random.default_rng().integers(2**31))])
        for key, image, caption, problem in SHARD_READERS[suffix](payload, shard):
            if problem is not None:
                events[key] = problem
                continue
            if not in_split(key, split, cfg["holdout_fraction"]):
                continue
            try:
                array, notes = decode_image(image, resolution=cfg["resolution"], crop=cfg["crop"],
                                            random_flip=cfg["random_flip"], min_size=cfg["min_size"], rng=rng)
            except SkipSample as skip:
                events[key] = skip.reason
                continue
            for note in notes:
                events[f"{key}|{note}"] = note
            if caption is None:
                events[f"{key}|missing_caption"] = "missing_caption"
            images.append(array)
            captions.append(caption or "")
            keys.append(key)
    if events:
        ray.get_actor(counter_name, namespace=COUNTER_NAMESPACE).add.remote(events)
    r = cfg["resolution"]
    return {
        "image": np.stack(images) if images else np.zeros((0, 3, r, r), np.float32),
        "caption": np.array(captions, dtype=object),
        "key": np.array(keys, dtype=object),
    }


# ---------------------------------------------------------------------------------------------------
# Skip accounting
# ---------------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class SkipCounter:
    """Distinct samples skipped or repaired, by reason (a re-read in a later epoch is not counted twice)."""

    def __init__(self):
        self.seen: dict[str, str] = {}

    def add(self, events: dict[str, str]) -> None:
        self.seen.update(events)

    def snapshot(self) -> dict[str, int]:
        return dict(Counter(self.seen.values()))


class SkipCounterHandle:
    """A picklable handle on a named SkipCounter actor, usable from the driver and from Train workers."""

    def __init__(self, name: str, actor=None):
        self.name = name
        # The creator keeps a reference: an actor without one is torn down, name or not.
        self._actor = actor

    def snapshot(self) -> dict[str, int]:
        actor = self._actor or ray.get_actor(self.name, namespace=COUNTER_NAMESPACE)
        return ray.get(actor.snapshot.remote())

    def dropped(self) -> int:
        return sum(v for k, v in self.snapshot().items() if k in DROP_REASONS)


def open_skip_counter(name: str) -> SkipCounterHandle:
    return SkipCounterHandle(name)


def new_skip_counter() -> SkipCounterHandle:
    name = f"skips-{uuid.uuid4().hex[:12]}"
    actor = SkipCounter.options(name=name, namespace=COUNTER_NAMESPACE).remote()
    handle = SkipCounterHandle(name, actor)
    handle.snapshot()  # wait until the actor is up
    return handle


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------


def shard_uris(cfg: DataConfig, manifest: dict, storage_cfg: StorageConfig | None) -> tuple[list[str], object]:
    root = storage.resolve(cfg.uri, storage_cfg)
    return [root.join(s["path"]).path for s in manifest["shards"]], root.filesystem


def build_dataset(cfg: DataConfig, split: str = "train", *, storage: StorageConfig | None = None, shuffle: bool = True,
                  seed: int = 0, skip_counter: SkipCounterHandle | None = None) -> tuple[ray.data.Dataset, SkipCounterHandle]:
    """A streaming Ray Dataset of decoded samples (`image`, `caption`, `key`) and its skip counter.

    `split`: "train", "holdout" (by `holdout_fraction`) or "all". Raises DatasetError before anything runs
    when the dataset is missing, incomplete or empty.
    """
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split {split!r}: choose train, holdout or all")
    manifest = read_manifest(cfg.uri, storage)
    paths, filesystem = shard_uris(cfg, manifest, storage)
    counter = skip_counter or new_skip_counter()
    ds = ray.data.read_binary_files(
        paths, filesystem=filesystem, include_paths=True, shuffle="files" if shuffle else None,
        ray_remote_args={"num_cpus": cfg.cpus_per_task},
    )
    # No fusion with the read or other stages' decisions needed: one task turns one shard into samples.
    return ds.map_batches(
        decode_shards, batch_size=1, num_cpus=cfg.cpus_per_task,
        fn_kwargs={"cfg": cfg.model_dump(), "split": split, "seed": seed, "counter_name": counter.name},
    ), counter


def check_cpu_budget(total_cpus: float, scaling, data: DataConfig, section: str = "stage_a") -> None:
    """Fail before training when Train workers would leave Ray Data no CPU (training would hang)."""
    used = scaling.num_workers * scaling.cpus_per_worker
    if data.reserved_cpus and total_cpus - used < data.reserved_cpus:
        raise ValueError(
            f"CPU budget: {section}.scaling.num_workers x {section}.scaling.cpus_per_worker = "
            f"{scaling.num_workers} x {scaling.cpus_per_worker} = {used:g} of the cluster's {total_cpus:g} CPUs, "
            f"leaving {total_cpus - used:g} < data.reserved_cpus = {data.reserved_cpus:g} for Ray Data's read and "
            f"decode tasks, which would never be scheduled (training hangs). Lower cpus_per_worker (fractions "
            f"are fine) or num_workers, or set data.reserved_cpus=0 on an autoscaling cluster."
        )

"""The one image reader every stage uses: shards -> Ray Data -> batches of `image`, `caption`, `key`.

Ray Data reads whole shard files (in a seeded, per-epoch reshuffled order when training), and a decode
task explodes each shard into samples, decodes them, converts any mode to RGB, resizes the shorter side
to the resolution, crops (random or centre) and flips when configured, yielding uint8 CHW images in blocks
small enough to stream. Images stay uint8 until they reach the device that trains on them (`to_model_range`
there): a quarter of float32's bytes through the object store, the collation and the host-to-GPU copy. Nothing is materialised: blocks flow to the consumers (Train
workers add a local shuffle buffer and get their own split through `ray.train.get_dataset_shard`).

Bad data never fails the job and is never silently dropped. Every sample that is skipped or repaired is
counted by reason (`DROP_REASONS` are skips, every other reason is a repair that keeps the sample), and
samples that a damaged shard lost are counted against the manifest's per-shard count, so that, for a full
pass over split "all", kept + dropped == manifest["num_samples"]. The counts go to a `SkipCounter` actor
that the driver and the Train workers read; it keeps one record per (shard, split), so re-reading a shard
in a later epoch replaces its record instead of counting its samples again, and its memory grows with the
number of shards, not of samples.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image, ImageOps
from ray.data.datasource import FileBasedDatasource

from pipelines.config.data import DataConfig, nearest_bucket
from pipelines.data.shards import PARQUET_COLUMNS, DatasetError, read_manifest, split_member_name
from pipelines.platform.skip_counter import SkipCounter  # noqa: F401  (re-exported)
from pipelines.platform.storage import StorageConfig, resolve

if TYPE_CHECKING:
    import torch
# torch is imported where a tensor is made, not here: every Ray process that decodes shards, plans a read or
# counts skips imports this module, and torch's import (4 s of CPU on a 2-core box) would be paid in each of them.

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
COUNTER_NAMESPACE = "ldm-data"
SPLITS = ("train", "holdout", "all")
COLUMNS = ("image", "caption", "key")
# Decoded blocks stay well below Ray Data's default 128 MiB target block size, so a shard of 1,000
# 512-px images (750 MiB as uint8) streams as a dozen blocks instead of one object.
TARGET_BLOCK_BYTES = 64 * 2**20

# Reasons a sample is dropped. Every other reason in the counts is a repair (the sample is kept):
# converted_<mode> (to RGB), upscaled (smaller than the crop), missing_caption (kept with caption "").
DROP_REASONS = (
    "empty_image",  # zero-byte image member / value
    "corrupt_image",  # undecodable or truncated image
    "too_small",  # shorter side below data.min_size
    "too_large",  # over PIL's decompression-bomb limit
    "unsupported_mode",  # a pixel mode that cannot be converted to RGB
    "missing_image",  # a key with a caption but no image (intact shard)
    "corrupt_member",  # samples lost to a damaged tar member or Parquet row group (orphans, shortfall vs manifest)
    "corrupt_shard",  # samples of a shard that could not be read at all
)


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Decoding one image (shared with the plain-PyTorch benchmark path)
# ---------------------------------------------------------------------------------------------------


def _rescale_to_l(img: Image.Image, peak: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> 8-bit RGB. Returns the image and the repair applied (None when it was RGB already).

    Alpha (RGBA, LA, PA, P with transparency) is composited over white; 16-bit and 32-bit integer greys are
    rescaled by their bit depth, float greys by [0, 1]. Raises SkipSample("unsupported_mode") otherwise.
    """
    mode = img.mode
    if mode == "RGB":
        return img, None
    try:
        if mode.startswith("I;16") or mode == "I":
            peak = 65535.0 if mode.startswith("I;16") or np.asarray(img).max() > 255 else 255.0
            return _rescale_to_l(img, peak).convert("RGB"), "converted_16bit"
        if mode == "F":
            return _rescale_to_l(img, 1.0).convert("RGB"), "converted_float"
        if mode == "P":
            if "transparency" not in img.info:
                return img.convert("RGB"), "converted_palette"
            img, mode = img.convert("RGBA"), "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB"), "converted_alpha"
        return img.convert("RGB"), f"converted_{mode.lower().replace(';', '')}"
    except (ValueError, OSError):
        raise SkipSample("unsupported_mode") from None


def decode_image(data: bytes | None, *, resolution: int | tuple[int, int], crop: str, random_flip: bool, min_size: int,
                 rng: np.random.Generator, buckets: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, list[str]]:
    """Encoded image bytes -> uint8 (3, H, W), plus the repairs made. Raises SkipSample.

    `resolution`: H = W = resolution, or (H, W); with `buckets`, (H, W) is instead the bucket nearest the image's
    aspect ratio (`pipelines.config.data.nearest_bucket`). Steps: decode (EXIF orientation applied), any mode -> RGB,
    resize (bicubic; upscaling counted) by the smallest factor that makes the image cover H x W (for a square, the
    shorter side becomes H), crop H x W (random or centre), flip horizontally with p=0.5 when `random_flip`.
    The model's [-1, 1] comes later, on the training device (`to_model_range`).
    """
    out_h, out_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not data:
        raise SkipSample("empty_image")
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # truncated files fail here, not lazily later
            img = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise SkipSample("too_large") from None
    except Exception:
        raise SkipSample("corrupt_image") from None
    img, repair = to_rgb(img)
    if repair:
        notes.append(repair)
    w, h = img.size
    if min(w, h) < max(min_size, 1):
        raise SkipSample("too_small")
    if buckets:
        out_h, out_w = nearest_bucket(h, w, buckets)
    scale = max(out_h / h, out_w / w)
    if scale > 1:
        notes.append("upscaled")
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    if crop == "random":
        x0, y0 = int(rng.integers(0, new_w - out_w + 1)), int(rng.integers(0, new_h - out_h + 1))
    else:
        x0, y0 = (new_w - out_w) // 2, (new_h - out_h) // 2
    img = img.crop((x0, y0, x0 + out_w, y0 + out_h))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)), notes  # (H, W, 3) -> (3, H, W) uint8


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """The reader's uint8 images (any shape) -> float32 in [-1, 1] (x / 127.5 - 1), on their own device: call
    it after the batch reached the GPU, so that a quarter of the bytes crossed PCIe."""
    import torch

    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects the reader's uint8 images, got {images.dtype}")
    return images.float().div_(127.5).sub_(1.0)


def decode_sample(data: bytes | None, cfg: DataConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """`decode_image` with the resolution, crop, flip and minimum size of a DataConfig: what the reader does
    to every sample, usable without Ray (the DataLoader benchmark, notebooks)."""
    return decode_image(data, resolution=cfg.resolution, crop=cfg.crop, random_flip=cfg.random_flip,
                        min_size=cfg.min_size, rng=rng, buckets=cfg.shapes if cfg.buckets is not None else ())


_SOURCE_SUFFIX = re.compile(r"-\d+$")


def source_of(key: str) -> str:
    """The source a key was cut from: the key without a trailing `-<number>` (`skimage-coffee-017` -> `skimage-coffee`)."""
    return _SOURCE_SUFFIX.sub("", key)


def in_split(key: str, split: str, holdout_fraction: float, by: str = "sample") -> bool:
    """Stable train/holdout assignment from a hash of the key, or of its source (`by="source"`, see
    `DataConfig.holdout_by`): independent of shard layout and order."""
    if split == "all":
        return True
    unit = source_of(key) if by == "source" else key
    bucket = int.from_bytes(hashlib.blake2b(unit.encode(), digest_size=8).digest(), "big") / 2**64
    return (bucket < holdout_fraction) == (split == "holdout")


# ---------------------------------------------------------------------------------------------------
# Exploding shards into samples
# ---------------------------------------------------------------------------------------------------


class RawSample(NamedTuple):
    key: str
    image: bytes | None  # None: the shard holds no image for this key
    caption: str | None  # None: no caption


class ShardContents(NamedTuple):
    samples: list[RawSample]
    damaged: bool  # part of the shard could not be read; keys without an image lost theirs to the damage
    unreadable: bool  # nothing could be read at all


def read_tar(payload: bytes) -> ShardContents:
    """Group a webdataset tar's members by key. Tolerant of damage: a broken member header is skipped over
    (`ignore_zeros` scans on to the next valid header, which the offsets reveal as a gap of non-zero
    bytes), a member cut short ends the scan; either marks the shard damaged."""
    groups: dict[str, dict[str, bytes]] = {}
    damaged = False
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:", ignore_zeros=True) as tar:
            expected_offset = 0  # where the next header should start if nothing was skipped
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, OSError):
                    damaged = True
                    break
                if member is None:
                    break
                if member.offset != expected_offset and any(payload[expected_offset:member.offset]):
                    damaged = True
                expected_offset = tar.offset
                key, ext = split_member_name(member.name)
                if not member.isfile() or not ext:
                    continue
                try:
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                except (tarfile.TarError, OSError):
                    data = b""
                if len(data) != member.size:
                    damaged = True
                    break  # cut short: the stream ends inside this member
                groups.setdefault(key, {})[ext] = data
    except (tarfile.TarError, OSError):
        return ShardContents([], True, True)
    samples = []
    for key, parts in groups.items():
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        caption = parts["txt"].decode("utf-8", "replace").strip() if "txt" in parts else None
        samples.append(RawSample(key, image, caption))
    return ShardContents(samples, damaged, not samples and (damaged or bool(payload.strip(b"\0"))))


def _image_bytes(value) -> bytes | None:
    """An image cell: raw bytes, or a Hugging Face style struct {"bytes": ..., "path": ...}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


def read_parquet(payload: bytes, columns: dict, shard_name: str) -> ShardContents:
    """Rows of a Parquet shard, row group by row group: an unreadable row group loses only its rows."""
    try:
        pf = pq.ParquetFile(io.BytesIO(payload))
    except Exception:
        return ShardContents([], True, True)
    key_col, image_col, caption_col = columns.get("key"), columns["image"], columns["caption"]
    wanted = [c for c in (key_col, image_col, caption_col) if c]
    samples, damaged, row = [], False, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g, columns=wanted)
        except Exception:
            damaged, row = True, row + n
            continue
        keys = table.column(key_col).to_pylist() if key_col else [f"{shard_name}-{row + i:06d}" for i in range(n)]
        for key, image, caption in zip(keys, table.column(image_col).to_pylist(), table.column(caption_col).to_pylist()):
            samples.append(RawSample(str(key), _image_bytes(image), None if caption is None else str(caption)))
        row += n
    return ShardContents(samples, damaged, not samples and damaged)


def read_shard(payload: bytes, rel_path: str, columns: dict) -> ShardContents:
    if rel_path.endswith(".parquet"):
        return read_parquet(payload, columns, rel_path.rsplit("/", 1)[-1].rsplit(".", 1)[0])
    return read_tar(payload)


def _rows_per_block(size: tuple[int, int]) -> int:
    return max(1, TARGET_BLOCK_BYTES // (3 * size[0] * size[1]))  # uint8 (3, H, W) images


def verified(payload: bytes, sha256: str | None) -> bool:
    """Whether a whole file matches the sha256 its manifest recorded (True when none was recorded). A file that
    was gone when read arrives as b"" (see `read_whole_files`) and never matches."""
    return not sha256 or hashlib.sha256(payload).hexdigest() == sha256


MULTIPART_PART_SIZES = tuple(mib * 2**20 for mib in (5, 8, 10, 16, 50, 64, 100))
"""Part sizes common S3 writers use (the minimum; boto3 and the AWS CLI; pyarrow; s3fs; ...): a multipart ETag is
checked against those that give its part count."""


def s3_etag(payload: bytes, parts: int = 0, part_size: int = 0) -> str:
    """The ETag S3 gives these bytes: their MD5 when written in one PUT (`parts=0`), else the MD5 of the parts'
    MD5s, `-<parts>`."""
    if not parts:
        return hashlib.md5(payload, usedforsecurity=False).hexdigest()
    digests = b"".join(hashlib.md5(payload[i:i + part_size], usedforsecurity=False).digest()
                       for i in range(0, len(payload), part_size or len(payload) or 1))
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{parts}"


def shard_matches(payload: bytes, identity: dict) -> bool:
    """Whether a whole shard matches its manifest entry's identity: its sha256 when recorded; else (a shard indexed
    from its S3 listing) its size and its ETag, recomputed from the bytes (for a multipart upload, with the part
    sizes common writers use; when none gives its part count, the size alone is checked)."""
    if identity.get("sha256") or "size" not in identity:
        return verified(payload, identity.get("sha256"))
    etag = identity.get("etag") or ""
    if len(payload) != identity["size"]:
        return False
    if not etag:
        return True
    if "-" not in etag:
        return s3_etag(payload) == etag
    parts = int(etag.rsplit("-", 1)[1])
    sizes = [len(payload)] if parts == 1 else [p for p in MULTIPART_PART_SIZES if -(-len(payload) // p) == parts]
    return not sizes or any(s3_etag(payload, parts, size) == etag for size in sizes)


class FileTable:
    """Per-file facts of a manifest ({relative path: {field: value}}), looked up by path inside Ray tasks.

    Ray hands a map function's keyword arguments to every task it runs, and a task unpickles them anew: a dict with
    an entry per shard costs O(N) in each of N tasks, O(N^2) per pass (measured by `benchmarks/scale.py
    --task-payload`). Here the facts are sorted numpy columns, which pickle protocol 5 (Ray's) carries out of band:
    a task maps them from the object store and pays a binary search per lookup, whatever N.

    Fields hold ints or strings; an entry without a field (or with None) reads back without it, as from a dict.
    """

    def __init__(self, entries: dict[str, dict], fields: Sequence[str]):
        paths = sorted(entries)
        self._paths = np.array([p.encode() for p in paths], dtype=np.bytes_) if paths else np.zeros(0, "S1")
        self._columns: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
        for name in fields:
            values = [entries[p].get(name) for p in paths]
            present = np.array([v is not None for v in values], dtype=bool)
            numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in values if v is not None)
            if numeric:
                column = np.array([v if v is not None else 0 for v in values], dtype=np.int64)
            else:
                column = np.array([str(v).encode() if v is not None else b"" for v in values], dtype=np.bytes_)
            self._columns[name] = (column, present, numeric)

    def __len__(self) -> int:
        return len(self._paths)

    def get(self, path: str, default: dict | None = None) -> dict | None:
        key = path.encode()
        i = int(np.searchsorted(self._paths, key))
        if i == len(self._paths) or self._paths[i] != key:
            return default
        return {name: int(column[i]) if numeric else column[i].decode()
                for name, (column, present, numeric) in self._columns.items() if present[i]}


def decode_shards(batch: dict, *, cfg: DataConfig, split: str, seed: int, counter_name: str, root_path: str,
                  shards: FileTable, parquet_columns: dict, columns: tuple[str, ...]) -> Iterator[dict]:
    """Ray Data map_batches fn: whole shard files in, blocks of decoded samples out. `shards`: the manifest's
    `num_samples` and identity (`sha256`, or `size` and `etag`) of every shard, by path under `root_path`.

    A shard whose bytes do not match the manifest's sha256 or ETag (changed since it was written, or gone) is skipped
    whole, its samples counted as `corrupt_shard`: changed data is never used silently. Counts go to the
    SkipCounter once a shard is done: shard-level losses (which no split owns, since their keys are unknown)
    under part "shard", per-sample skips and repairs under the split.
    """
    # One pending block per shape (one, unless data.buckets is set): every block holds images of a single shape.
    pending: dict[tuple[int, ...], tuple[list[np.ndarray], list[str], list[str]]] = {}

    def block(shape: tuple[int, ...]) -> dict:
        images, captions, keys = pending.pop(shape)
        out = {"image": np.stack(images), "caption": np.array(captions, dtype=object), "key": np.array(keys, dtype=object)}
        return {c: out[c] for c in columns}

    for payload, path in zip(batch["bytes"], batch["path"]):
        rel = str(path)[len(root_path):].lstrip("/")
        entry = shards.get(rel, {})
        n_expected = entry.get("num_samples", 0)
        shard_hash = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=4).digest(), "big")
        # Seeded per shard, plus fresh entropy: crops and flips differ from epoch to epoch.
        rng = np.random.default_rng([seed, shard_hash, int(np.random.default_rng().integers(2**31))])
        if not shard_matches(payload, entry) or (not payload and n_expected):
            log.warning("shard %s %s: its %d samples are skipped (corrupt_shard)", rel,
                        "is gone" if not payload else "does not match the sha256 in the manifest", n_expected)
            contents = ShardContents([], True, True)
        else:
            contents = read_shard(payload, rel, parquet_columns)
        shard_counts: Counter = Counter()
        split_counts: Counter = Counter()
        if contents.unreadable:
            shard_counts["corrupt_shard"] = max(n_expected, 1)
        elif contents.damaged or len(contents.samples) < n_expected:
            lost = n_expected - len(contents.samples)
            if lost > 0:
                shard_counts["corrupt_member"] = lost
            elif not any(s.image is None for s in contents.samples):
                log.warning("shard %s is damaged but no sample was lost", rel)
        elif len(contents.samples) > n_expected:
            log.warning("shard %s holds %d samples, its manifest says %d", rel, len(contents.samples), n_expected)
        for sample in contents.samples:
            if not in_split(sample.key, split, cfg.holdout_fraction, cfg.holdout_by):
                continue
            if sample.image is None:
                split_counts["corrupt_member" if contents.damaged else "missing_image"] += 1
                continue
            try:
                array, notes = decode_sample(sample.image, cfg, rng)
            except SkipSample as skip:
                split_counts[skip.reason] += 1
                continue
            split_counts.update(notes)
            if sample.caption is None:
                split_counts["missing_caption"] += 1
            images, captions, keys = pending.setdefault(array.shape, ([], [], []))
            images.append(array)
            captions.append(sample.caption or "")
            keys.append(sample.key)
            if len(images) == _rows_per_block(array.shape[1:]):
                yield block(array.shape)
        record_skips(counter_name, rel, {"shard": dict(shard_counts), split: dict(split_counts)})
    for shape in list(pending):
        yield block(shape)


# ---------------------------------------------------------------------------------------------------
# Skip accounting
# ---------------------------------------------------------------------------------------------------


_actors: dict[str, "ray.actor.ActorHandle"] = {}
COUNTER_TIMEOUT_S = 10.0
"""How long a decode task or a snapshot waits for the SkipCounter before going on without it."""


def record_skips(counter_name: str, shard: str, parts: dict[str, dict[str, int]]) -> None:
    """Send a shard's counts to the SkipCounter. The counter's loss never blocks or fails a decode task: when it is
    dead, restarting past COUNTER_TIMEOUT_S or gone, the counts of this shard are lost (said in the log), the data is not."""
    try:
        ray.get(_counter_actor(counter_name).record.remote(shard, parts), timeout=COUNTER_TIMEOUT_S)
    except (ray.exceptions.RayError, ValueError) as e:  # ValueError: no actor of that name (any more)
        _actors.pop(counter_name, None)
        log.warning("skip counter %s unavailable (%s): the counts of shard %s are not recorded",
                    counter_name, type(e).__name__, shard)


def _counter_actor(name: str):
    if name not in _actors:
        _actors[name] = ray.get_actor(name, namespace=COUNTER_NAMESPACE)
    return _actors[name]


class SkipCounterHandle:
    """A picklable handle on a named SkipCounter actor, usable from the driver and from Train workers.

    `snapshot()` -> {reason: samples}; `dropped()` -> samples skipped (the reasons in DROP_REASONS).
    """

    def __init__(self, name: str, actor=None):
        self.name = name
        # The creator keeps a reference: an actor without one is torn down, name or not.
        self._actor = actor

    def snapshot(self) -> dict[str, int]:
        """The counts so far; {} (with a warning) when the counter cannot be reached: losing the counts must not
        stop a training loop that logs them."""
        try:
            actor = self._actor or _counter_actor(self.name)
            return ray.get(actor.snapshot.remote(), timeout=COUNTER_TIMEOUT_S)
        except (ray.exceptions.RayError, ValueError) as e:
            _actors.pop(self.name, None)
            log.warning("skip counter %s unavailable (%s): no skip counts", self.name, type(e).__name__)
            return {}

    def dropped(self) -> int:
        return sum(v for k, v in self.snapshot().items() if k in DROP_REASONS)


def open_skip_counter(name: str) -> SkipCounterHandle:
    """The handle on an existing counter, by name (e.g. inside a Train worker, from the loop config)."""
    return SkipCounterHandle(name)


def new_skip_counter() -> SkipCounterHandle:
    """A fresh counter actor, owned by the caller (it lives as long as the caller's Ray job)."""
    name = f"skips-{uuid.uuid4().hex[:12]}"
    # Not waited for: the name is registered now, and its process starts (~1 s, see skip_counter.py) while the
    # caller starts its Train workers; the first count arrives from a read task long after, and a count or snapshot
    # sent before the actor is up waits for it (up to COUNTER_TIMEOUT_S). (The node-loss hang once blamed on not
    # waiting here was the reader's CPU fit: benchmarks/README.md, "Round two".)
    actor = SkipCounter.options(name=name, namespace=COUNTER_NAMESPACE).remote()
    return SkipCounterHandle(name, actor)


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------


class _WholeFiles(FileBasedDatasource):
    """Each file as one row {"bytes"} ("path" added by include_paths). A file that is gone by the time it is read
    (deleted mid-epoch) comes back as b"" instead of failing the read task: the decoder counts it as lost."""

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except FileNotFoundError:
            log.warning("%s is gone: read as empty", path)
            return pa.BufferReader(b"")

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield pa.table({"bytes": pa.array([f.readall()], pa.binary())})

    def _rows_per_file(self) -> int:
        return 1


def read_whole_files(paths: list[str], filesystem, *, shuffle=None, num_cpus: float = 0.5,
                     override_num_blocks: int | None = None) -> ray.data.Dataset:
    """`ray.data.read_binary_files(paths, include_paths=True, ...)`, except that a file deleted after this call
    reads as b"" (counted by the consumer against its manifest) rather than failing the job. A file already
    missing now is a DatasetError naming it."""
    try:
        source = _WholeFiles(paths, filesystem=filesystem, include_paths=True, shuffle=shuffle)
    except FileNotFoundError as e:
        raise DatasetError(f"a file its manifest lists is missing: {e}") from None
    return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=override_num_blocks)


def build_dataset(cfg: DataConfig, split: str = "train", *, storage: StorageConfig | None = None, shuffle: bool = True,
                  seed: int = 0, skip_counter: SkipCounterHandle | None = None,
                  columns: Sequence[str] = COLUMNS) -> tuple[ray.data.Dataset, SkipCounterHandle]:
    """A streaming Ray Dataset of decoded samples (`image` uint8 (3, H, W), `caption`, `key`)
    and the handle on its skip counter (pass `skip_counter` to share one between the splits of a stage).

    `split`: "train", "holdout" (by `cfg.holdout_fraction`, stable per key) or "all". `shuffle`: shard order
    drawn from `seed`, different every epoch (an execution of the dataset); rows are shuffled further by
    the consumer's local shuffle buffer (`cfg.shuffle_buffer`). `columns`: the subset to keep (e.g. only
    "image" for Stage A). With `cfg.buckets`, images come in several shapes, one per block: consume them with
    `pipelines.data.buckets.iter_shape_batches`, which batches one shape at a time. Select columns here rather
    than with `Dataset.select_columns`, whose extra Project tasks reserve a whole CPU each and are never scheduled when only `data.reserved_cpus` < 1 is free
    (measured: the pipeline hangs). Raises DatasetError before anything runs when the dataset is missing,
    incomplete or empty.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    columns = tuple(columns)
    if not columns or set(columns) - set(COLUMNS):
        raise ValueError(f"columns {list(columns)}: choose among {', '.join(COLUMNS)}")
    manifest = read_manifest(cfg.uri, storage)
    if cfg.cpus_per_task is None:  # not fitted by a stage (`DataConfig.fit`): nothing else is known to need CPUs
        cfg = cfg.fit(ray.cluster_resources().get("CPU", 0))
    root = resolve(cfg.uri, storage)
    paths = [root.join(s["path"]).path for s in manifest["shards"]]
    counter = skip_counter or new_skip_counter()
    # One read task per shard: no read-side block splitting, so the read fuses with the decode below and
    # a shard's bytes never pass through the object store.
    ds = read_whole_files(
        paths, root.filesystem, override_num_blocks=len(paths),
        shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None,
        num_cpus=cfg.cpus_per_task,
    )
    return ds.map_batches(
        decode_shards, batch_size=None, num_cpus=cfg.cpus_per_task,  # None: whole read blocks, so it fuses
        fn_kwargs={
            "cfg": cfg, "split": split, "seed": seed, "counter_name": counter.name, "root_path": root.path,
            "shards": FileTable({s["path"]: s for s in manifest["shards"]}, ("num_samples", "sha256", "size", "etag")),
            "parquet_columns": manifest.get("columns", PARQUET_COLUMNS), "columns": columns,
        },
    ), counter

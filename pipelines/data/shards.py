"""Writing shard sets (webdataset tar or Parquet) and their manifest, and reading the manifest back.

The manifest is written last: a dataset without `manifest.json` is incomplete and no stage will read it.
It lists every shard with its sample count and sha256 (for shards indexed on S3 without reading them whole: their
size and ETag), the total count and a content digest (sha256 over the shards' paths, counts and identities), which
the lineage in MLflow refers to. The per-shard counts also
let the reader count samples lost inside a damaged shard, so nothing disappears unaccounted.

Shards that already exist (written by img2dataset, webdataset or a team's own Parquet export) get a
manifest with `index_shards`, without being rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from itertools import islice
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.platform import storage
from pipelines.data.sources import Sample, open_source
from pipelines.platform.progress import progress_line, summary_line
from pipelines.platform.storage import StorageConfig

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
# Parquet column roles -> the names this project writes; `index_shards` records other names in the manifest.
PARQUET_COLUMNS = {"key": "key", "image": "image", "caption": "caption"}


class DatasetError(RuntimeError):
    """The dataset cannot be used: missing, incomplete (no manifest) or empty."""


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: "dir/KEY.EXT" -> ("dir/KEY", "ext"), split at the first dot of the base name
    (so "0001.seg.png" is key "0001" with extension "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_shard(samples: list[Sample]) -> bytes:
    """A webdataset tar: KEY.EXT (image), KEY.txt (caption, absent when there is none), KEY.json (meta)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            members = [(f"{s.key}.{s.ext}", s.data), (f"{s.key}.json", json.dumps(s.meta).encode())]
            if s.caption is not None:  # webdataset convention: no caption, no .txt member
                members.insert(1, (f"{s.key}.txt", s.caption.encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _parquet_shard(samples: list[Sample]) -> bytes:
    """A Parquet table with columns key, image (encoded bytes), caption (null when there is none), meta (JSON)."""
    table = pa.table({
        "key": [s.key for s in samples],
        "image": pa.array([s.data for s in samples], type=pa.binary()),
        "caption": pa.array([s.caption for s in samples], type=pa.string()),
        "meta": [json.dumps(s.meta) for s in samples],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


SHARD_WRITERS = {"webdataset": _tar_shard, "parquet": _parquet_shard}


def _chunks(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def shard_identity(shard: dict) -> str:
    """What identifies a shard's bytes in its manifest entry: its sha256, or `etag:<ETag>:<size>`."""
    return shard.get("sha256") or f"etag:{shard['etag']}:{shard['size']}"


def content_digest(shards: list[dict]) -> str:
    """sha256 over every shard's path, sample count and identity (its sha256; for a shard indexed from its S3 listing,
    its ETag and size): equal digests mean equal datasets."""
    lines = "".join(f"{s['path']}\t{s['num_samples']}\t{shard_identity(s)}\n" for s in shards)
    return hashlib.sha256(lines.encode()).hexdigest()


def _finish(root: storage.Location, shards: list[dict], *, name: str, source: str, fmt: str, **extra) -> dict:
    """Write the manifest (last: its presence marks the dataset complete) and return it."""
    total = sum(s["num_samples"] for s in shards)
    if total == 0:
        raise DatasetError(f"source {source or name!r} yielded no samples: no manifest written to {root.uri}")
    manifest = {
        "version": MANIFEST_VERSION, "name": name, "source": source, "format": fmt, "num_samples": total,
        "shards": shards, "digest": content_digest(shards),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
    storage.write_json(root.join(MANIFEST), manifest)
    return manifest


def _refuse_complete(root: storage.Location) -> None:
    if storage.exists(root.join(MANIFEST)):
        raise DatasetError(f"{root.uri} already holds a complete dataset ({MANIFEST}); choose another output")


def decodable(data: bytes) -> bool:
    """Whether PIL can decode these image bytes (fully: truncated files fail too)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


def write_shards(samples: Iterable[Sample], output_uri: str, *, fmt: str = "webdataset", shard_size: int = 1000,
                 name: str = "images", source: str = "", storage_cfg: StorageConfig | None = None,
                 max_undecodable_fraction: float = 1.0, expected: int | None = None, **manifest_extra) -> dict:
    """Write samples as shards under `output_uri`, printing progress, then the manifest. Returns the manifest.

    Undecodable images are stored as they are (the reader counts them as `corrupt_image`/`empty_image`), but when
    more than `max_undecodable_fraction` of all images are, something is wrong with the source: DatasetError, the
    shards written are removed and no manifest is written. `expected`: how many samples will come, when known in
    advance (a `limit`): the progress lines then show the shard and sample totals and an ETA (a source shorter than
    that simply ends early)."""
    if fmt not in SHARD_WRITERS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(SHARD_WRITERS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 (got {shard_size})")
    root = storage.resolve(output_uri, storage_cfg)
    _refuse_complete(root)
    storage.makedirs(root)
    shards, total, started = [], 0, time.monotonic()
    shard_total = -(-expected // shard_size) if expected else None
    undecodable = 0
    for i, chunk in enumerate(_chunks(samples, shard_size)):
        undecodable += sum(not decodable(s.data) for s in chunk)
        payload = SHARD_WRITERS[fmt](chunk)
        rel = f"shard-{i:05d}{SHARD_SUFFIX[fmt]}"
        storage.write_bytes(root.join(rel), payload)
        shards.append({"path": rel, "num_samples": len(chunk), "sha256": hashlib.sha256(payload).hexdigest()})
        total += len(chunk)
        elapsed = time.monotonic() - started
        print(progress_line("prepare", i + 1, shard_total, unit="shard", images_per_s=total / elapsed if elapsed > 0 else None,
                            samples=f"{total}/{expected}" if expected else total,
                            eta_s=elapsed / total * max(0, expected - total) if expected else None), flush=True)
    if total and undecodable / total > max_undecodable_fraction:
        for shard in shards:
            root.filesystem.delete_file(root.join(shard["path"]).path)
        raise DatasetError(f"source {source or name!r}: {undecodable} of {total} images ({undecodable / total:.0%}) cannot "
                           f"be decoded, more than the limit of {max_undecodable_fraction:.0%} "
                           "(data.max_undecodable_fraction, --max-undecodable-fraction): no dataset written")
    extra = {"columns": PARQUET_COLUMNS} if fmt == "parquet" else {}
    manifest = _finish(root, shards, name=name, source=source, fmt=fmt, **extra, **manifest_extra)
    print(summary_line("prepare", f"{total} samples, {len(shards)} shards", seconds=time.monotonic() - started,
                       to=root.uri), flush=True)
    return manifest


def prepare_dataset(source: str, output_uri: str, *, fmt: str = "webdataset", shard_size: int = 1000,
                    resolution: int | None = None, limit: int | None = None, seed: int = 0,
                    captions: str | None = None, storage: StorageConfig | None = None,
                    max_undecodable_fraction: float = 0.5, crops_per_photo: int | None = None,
                    photo_crops: str = "square") -> dict:
    """Build a shard set from a bundled dataset name ("mnist", "skimage") or a folder of images.

    `resolution`: side of the stored images for bundled sources (None: their native size; folders are
    stored as they are). `limit`: keep the first N samples. `captions`: CSV/JSONL mapping for a folder.
    `crops_per_photo`: crops per photograph of the bundled skimage source (None: its default, 64); `photo_crops`: its
    crops' shapes ("square", or "any": own shapes and several scales, see `DataConfig.photo_crops`).
    Returns the manifest (with `digest`, `num_samples`, `shards`).
    """
    samples = open_source(source, resolution=resolution, seed=seed, captions=captions, crops_per_photo=crops_per_photo,
                          photo_crops=photo_crops)
    if limit is not None:
        samples = islice(samples, limit)
    name = source if "/" not in source else source.rstrip("/").rsplit("/", 1)[-1]
    return write_shards(samples, output_uri, fmt=fmt, shard_size=shard_size, name=name, source=source,
                        storage_cfg=storage, max_undecodable_fraction=max_undecodable_fraction, expected=limit,
                        prepare_resolution=resolution, seed=seed,
                        **({"crops_per_photo": crops_per_photo} if crops_per_photo is not None else {}),
                        **({"photo_crops": photo_crops} if photo_crops != "square" else {}))


INDEX_THREADS = 32
"""Shards `index_shards` reads at once. Its reads are a Parquet footer or an img2dataset stats file of a few KB
each: bound by request latency (tens of ms on S3), not by bandwidth or CPU, so threads in the one process that
writes the manifest overlap them; Ray tasks would add a cluster start and a scheduling round-trip per shard for
the same result."""
STREAM_BUFFER = 8 * 2**20
"""Bytes per ranged read when a whole shard must be read (a tar without a stats file, or `checksum=True`): memory
stays under INDEX_THREADS x this, whatever the shard size."""
IMG2DATASET_STATS = "_stats.json"
"""img2dataset writes `NNNNN_stats.json` beside each `NNNNN.tar`; its `successes` is the tar's sample count."""


class _HashingReader:
    """A read-only stream that hashes what passes through it (tarfile's stream mode reads from it)."""

    def __init__(self, stream):
        self.stream, self.sha256 = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read() if n is None or n < 0 else self.stream.read(n)
        self.sha256.update(data)
        return data

    def drain(self) -> str:
        while self.read(STREAM_BUFFER):
            pass
        return self.sha256.hexdigest()


def _count_tar_samples(fileobj) -> int:
    """Distinct keys in a webdataset tar read as a stream (a key is the member path up to the first dot of its base
    name): member headers are read, member data skipped."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        return len({split_member_name(m.name)[0] for m in tar if m.isfile()})


def _index_tar(root: storage.Location, objects: dict[str, storage.ObjectInfo], rel: str, whole: bool, fs) -> dict:
    stats_rel = rel[:-len(".tar")] + IMG2DATASET_STATS
    obj, stats = objects[rel], objects.get(stats_rel)
    if stats is not None and not whole:  # one small GET; the tar is not read at all
        count = int(json.loads(storage.RangedReader(root.join(stats_rel), stats.size, fs=fs).read())["successes"])
        return {"path": rel, "num_samples": count, "size": obj.size, "etag": obj.etag}
    reader = _HashingReader(storage.RangedReader(root.join(rel), obj.size, block=STREAM_BUFFER, fs=fs))
    count = _count_tar_samples(reader)
    return {"path": rel, "num_samples": count, "sha256": reader.drain()}


def _index_parquet(root: storage.Location, obj: storage.ObjectInfo, rel: str, whole: bool,
                   columns: tuple[str | None, ...], fs) -> dict:
    reader = storage.RangedReader(root.join(rel), obj.size, block=STREAM_BUFFER if whole else 64 * 2**10, fs=fs)
    if whole:
        payload = reader.read()
        reader, identity = io.BytesIO(payload), {"sha256": hashlib.sha256(payload).hexdigest()}
    else:  # the footer only: one ranged GET of the last 64 KiB (two when the metadata is larger)
        identity = {"size": obj.size, "etag": obj.etag}
    with pq.ParquetFile(reader) as pf:
        names, count = pf.schema_arrow.names, pf.metadata.num_rows
    missing = [c for c in columns if c is not None and c not in names]
    if missing:
        raise DatasetError(f"{root.join(rel).uri}: no column(s) {missing} (columns: {names}); "
                           "pass the right --image-column / --caption-column / --key-column")
    return {"path": rel, "num_samples": count, **identity}


def _shard_format(root: storage.Location, objects: dict[str, storage.ObjectInfo]) -> str:
    found = {fmt: [p for p in objects if p.endswith(suffix)] for fmt, suffix in SHARD_SUFFIX.items()}
    tar_stems = {p[:-len(".tar")] for p in found["webdataset"]}
    if found["webdataset"] and all(p[:-len(".parquet")] in tar_stems for p in found["parquet"]):
        return "webdataset"  # a NNNNN.parquet beside each NNNNN.tar is img2dataset's per-shard metadata, not a shard
    formats = [fmt for fmt, paths in found.items() if paths]
    if not formats:
        raise DatasetError(f"{root.uri}: no shards to index (no {' or '.join(SHARD_SUFFIX.values())} files)")
    if len(formats) > 1:
        raise DatasetError(f"{root.uri}: holds both tar and Parquet shards; index one format per dataset root")
    return formats[0]


def index_shards(uri: str, *, storage_cfg: StorageConfig | None = None, image_column: str = "image",
                 caption_column: str = "caption", key_column: str | None = "key", name: str | None = None,
                 checksum: bool = False, threads: int = INDEX_THREADS) -> dict:
    """Write a manifest for shards that already exist under `uri` (img2dataset / webdataset tars, or Parquet
    tables with an image-bytes column and a caption column), leaving the shards as they are.

    It lists the folder once and reads only what the manifest needs, `threads` shards at a time: a Parquet shard's
    footer (its row count and columns), a tar's img2dataset stats file (`NNNNN_stats.json`, its `successes`); only a
    tar without one is read whole (streamed), since its members' headers are spread through it. On S3 a shard not
    read whole is identified by the size and ETag its listing gave (the reader checks both: `reader.shard_matches`);
    a shard read whole, every local shard and every shard with `checksum=True` by the sha256 of its bytes, as
    `prepare_dataset` records it.

    Parquet column names are recorded in the manifest for the reader; `key_column=None` keys rows as
    SHARD-ROW. An image column may hold bytes or Hugging Face style structs {bytes, path}.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = storage.resolve(uri, storage_cfg)
    _refuse_complete(root)
    prefix = root.path.rstrip("/") + "/"
    objects = {o.path[len(prefix):]: o for o in storage.list_objects(root, storage_cfg)}
    fmt = _shard_format(root, objects)
    whole = checksum or root.scheme != "s3"  # local bytes are cheap to hash, and have no ETag
    columns = (image_column, caption_column, key_column)
    fs = storage.fsspec_filesystem(root.uri, storage_cfg) if root.scheme == "s3" else None

    def index_one(rel: str) -> dict:
        if fmt == "webdataset":
            return _index_tar(root, objects, rel, whole, fs)
        return _index_parquet(root, objects[rel], rel, whole, columns, fs)

    shard_paths = sorted(p for p in objects if p.endswith(SHARD_SUFFIX[fmt]))
    shards, started, every = [], time.monotonic(), max(1, len(shard_paths) // 20)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, shard in enumerate(pool.map(index_one, shard_paths), 1):  # in path order, as listed
            shards.append(shard)
            if i % every == 0 or i == len(shard_paths):
                print(f"  indexed {i}/{len(shard_paths)} shards of {root.uri} ({time.monotonic() - started:.1f}s)",
                      flush=True)
    extra = {"columns": {"key": key_column, "image": image_column, "caption": caption_column}} if fmt == "parquet" else {}
    return _finish(root, shards, name=name or root.path.rstrip("/").rsplit("/", 1)[-1], source=f"indexed:{root.uri}",
                   fmt=fmt, **extra)


def read_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """The dataset's manifest; a clear DatasetError when the dataset is missing, incomplete or empty."""
    root = storage.resolve(uri, storage_cfg)
    try:
        present = storage.exists(root)
    except OSError as e:  # e.g. the bucket does not exist
        raise DatasetError(f"dataset {root.uri}: cannot be reached ({e})") from e
    if not present:
        raise DatasetError(f"dataset {root.uri} does not exist (build it with pipelines/prepare_data.py)")
    loc = root.join(MANIFEST)
    if not storage.exists(loc):
        raise DatasetError(
            f"dataset {root.uri} has no {MANIFEST}: it is incomplete (an interrupted prepare?) or its shards were "
            "written elsewhere (give them a manifest with `pipelines/prepare_data.py --index --output URI`)"
        )
    try:
        manifest = storage.read_json(loc)
    except ValueError as e:
        raise DatasetError(f"{loc.uri} is not valid JSON ({e})") from e
    missing = [k for k in ("shards", "num_samples", "digest", "format") if k not in manifest]
    if missing:
        raise DatasetError(f"{loc.uri} lacks {', '.join(missing)}: not a manifest written by pipelines/prepare_data.py")
    if not manifest["shards"] or manifest["num_samples"] == 0:
        raise DatasetError(f"dataset {root.uri} is empty (its manifest lists no samples)")
    return manifest

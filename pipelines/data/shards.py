"""Writing shard sets (webdataset tar or Parquet) and their manifest, and reading the manifest back.

The manifest is written last: a dataset without `manifest.json` is incomplete and no stage will read it.
It lists every shard with its sample count and sha256, the total count and a content digest (sha256 over
the shard digests), which the lineage in MLflow refers to.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from itertools import islice
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.data.sources import Sample, open_source
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}


class DatasetError(RuntimeError):
    """The dataset cannot be used: missing, incomplete (no manifest) or empty."""


def _tar_shard(samples: list[Sample]) -> bytes:
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


def write_shards(samples: Iterable[Sample], output_uri: str, *, fmt: str = "webdataset", shard_size: int = 1000,
                 name: str = "images", source: str = "", storage_cfg: StorageConfig | None = None) -> dict:
    """Write samples as shards under `output_uri`, then the manifest. Returns the manifest."""
    if fmt not in SHARD_WRITERS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(SHARD_WRITERS)}")
    root = storage.resolve(output_uri, storage_cfg)
    manifest_loc = root.join(MANIFEST)
    if storage.exists(manifest_loc):
        raise DatasetError(f"{root.uri} already holds a complete dataset ({MANIFEST}); choose another output")
    storage.makedirs(root)
    shards, total, started = [], 0, time.monotonic()
    for i, chunk in enumerate(_chunks(samples, shard_size)):
        payload = SHARD_WRITERS[fmt](chunk)
        rel = f"shard-{i:05d}{SHARD_SUFFIX[fmt]}"
        storage.write_bytes(root.join(rel), payload)
        shards.append({"path": rel, "num_samples": len(chunk), "sha256": hashlib.sha256(payload).hexdigest()})
        total += len(chunk)
        print(f"  wrote {rel}: {len(chunk)} samples ({total} so far, {time.monotonic() - started:.1f}s)", flush=True)
    if total == 0:
        raise DatasetError(f"source {source or name!r} yielded no samples: nothing written to {root.uri}")
    digest = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    manifest = {
        "name": name, "source": source, "format": fmt, "num_samples": total, "shards": shards,
        "digest": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(manifest_loc, manifest)  # last: its presence marks the dataset complete
    return manifest


def prepare_dataset(source: str, output_uri: str, *, fmt: str = "webdataset", shard_size: int = 1000,
                    resolution: int | None = None, limit: int | None = None, seed: int = 0,
                    captions: str | None = None, storage: StorageConfig | None = None) -> dict:
    """Build a shard set from a bundled dataset name ("mnist", "skimage") or a folder of images."""
    samples = open_source(source, resolution=resolution, seed=seed, captions=captions)
    if limit is not None:
        samples = islice(samples, limit)
    name = source if "/" not in source else source.rstrip("/").rsplit("/", 1)[-1]
    return write_shards(samples, output_uri, fmt=fmt, shard_size=shard_size, name=name, source=source, storage_cfg=storage)


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
            f"dataset {root.uri} has no {MANIFEST}: it is incomplete (an interrupted prepare?) or not a dataset "
            "built by pipelines/prepare_data.py"
        )
    manifest = storage.read_json(loc)
    if not manifest.get("shards") or manifest.get("num_samples", 0) == 0:
        raise DatasetError(f"dataset {root.uri} is empty (its manifest lists no samples)")
    return manifest

"""The Parquet latent dataset Stage B trains on: format, writer (a Ray Data datasink) and reader.

A latents folder (local or s3://) holds

    manifest.json                   written last: its presence marks the folder complete
    null_condition.safetensors      the empty prompt's hidden states (L, D) and mask (L,): the CFG null condition
    parts-<attempt>/part-*.parquet  one row per image (the files the manifest lists, nothing else, is read)

Columns (tensors are Ray Data fixed-shape tensor columns; everything scaled latents is already multiplied by the
autoencoder's scale factor, so Stage B samples z = latent_mean + latent_std * eps directly):

    key                str       the image's dataset key
    caption            str
    latent_mean        (C, h, w) float32   scale_factor * mu of q(z | x)
    latent_std         (C, h, w) float32   scale_factor * sigma of q(z | x) (0 for a deterministic autoencoder)
    text_hidden        (L, D)    float32   text encoder hidden states, zero at padding positions
    text_mask          (L,)      bool      attention mask (True = real token)
    caption_truncated  bool      the caption had more than L tokens
    holdout            bool      in the held-out split (same hash split as the image reader)
    text_encoder       str       which text encoder produced text_hidden

Every part file holds latents of one shape (its manifest entry's `latent_shape`; the manifest's `latent_shapes`
counts the rows of each): with aspect-ratio buckets (`data.buckets`) there are several, and a Stage B worker reads rows
of several shapes and batches them one shape at a time (pipelines/data/buckets.py). The manifest's `latent_shape` is
the default one (that of `data.resolution`), which sampling uses unless told otherwise.

An interrupted encode leaves part files but no manifest; readers refuse such a folder. Every encode holds the
folder's lease (`.lease.json`, pipelines/platform/lease.py) and records there the `parts-<attempt>/` folder it writes; the
next encode writes a fresh one and, once its manifest is in place, removes only the folders it inherited that
way (never one it finds unaccounted for, never a live owner's). The manifest lists only files that exist when it
is written.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor
from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorType

from pipelines.platform import storage
from pipelines.data.reader import FileTable, read_whole_files, record_skips, verified
from pipelines.platform.storage import Location, StorageConfig

if TYPE_CHECKING:
    import torch
# torch (and safetensors.torch) are imported inside the two functions that make tensors: Stage B's read tasks and
# the Ray processes that plan them import this module, and need neither (see pipelines/data/reader.py).

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NULL_CONDITION = "null_condition.safetensors"
FORMAT = "ldm_pipeline.latents"
FORMAT_VERSION = 1
PARTS_PREFIX = "parts-"
COMPRESSION = "zstd"

TRAIN_COLUMNS = ["latent_mean", "latent_std", "text_hidden", "text_mask"]
"""What a Stage B worker reads (keys and captions stay on disk)."""


ENCODE_STAGE = "encode"
"""The stage that writes latents (its runs' `stage` tag)."""
TAG_LATENTS_URI = "latents_uri"
"""The tag of an encode run that names the folder it wrote."""


class LatentsError(RuntimeError):
    """A latents folder is missing, incomplete or inconsistent."""


class EncodeFaultInjected(RuntimeError):
    """TEST-ONLY: raised by the writer when `encode.fail_after_rows` is reached (simulates a crash)."""


# ---------------------------------------------------------------------------------------------------
# Writing: a Ray Data datasink that writes Parquet files and reports what it wrote
# ---------------------------------------------------------------------------------------------------


@dataclass
class PartFile:
    """One Parquet file a write task produced."""

    path: str
    """Relative to the latents root."""
    num_rows: int
    num_bytes: int
    sha256: str
    truncated: int
    """Rows whose caption was truncated."""
    holdout: int
    """Rows in the held-out split."""
    latent_shape: list[int] | None = None
    """(C, h, w) of every row's latents: a file holds one shape (several files, with aspect-ratio buckets)."""


class LatentParquetSink(Datasink):
    """Writes each write task's rows to Parquet files of at most `rows_per_file` rows under `<root>/<folder>/`.

    Each file is written in one piece (a single PUT on S3, temp file + rename locally). The driver-side
    instance collects every task's `PartFile`s in `self.files` when the write completes; nothing is "committed"
    here: the manifest written by the caller afterwards is what makes the files count.
    """

    def __init__(self, root_uri: str, storage_cfg: StorageConfig | None, folder: str, rows_per_file: int,
                 fail_after_rows: int | None = None):
        self.root_uri = root_uri
        self.storage_cfg = storage_cfg
        self.folder = folder
        self.rows_per_file = rows_per_file
        self.fail_after_rows = fail_after_rows
        self.files: list[PartFile] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "LatentParquet"

    def write(self, blocks: Iterable, ctx) -> list[dict]:
        """Rows are gathered per latent shape (one, unless the images came in aspect-ratio buckets), so that every
        file holds a single shape: a fixed-shape tensor column, which Stage B batches by file."""
        root = storage.resolve(self.root_uri, self.storage_cfg)
        written: list[PartFile] = []
        pending: dict[tuple[int, ...], list[pa.Table]] = {}

        def flush(shape: tuple[int, ...]) -> None:
            table = pa.concat_tables(pending.pop(shape))
            for start in range(0, table.num_rows, self.rows_per_file):
                part = table.slice(start, self.rows_per_file)
                written.append(self._write_file(root, part, ctx.task_idx, len(written), shape))
                if self.fail_after_rows is not None and sum(f.num_rows for f in written) >= self.fail_after_rows:
                    raise EncodeFaultInjected(f"fault hook: writer stopping after {self.fail_after_rows} rows "
                                              "(encode.fail_after_rows)")

        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            for shape, same in split_by_shape(table, "latent_mean"):
                pending.setdefault(shape, []).append(same)
                if sum(t.num_rows for t in pending[shape]) >= self.rows_per_file:
                    flush(shape)
        for shape in list(pending):
            flush(shape)
        return [asdict(f) for f in written]

    def _write_file(self, root: Location, table: pa.Table, task_idx: int, index: int,
                    shape: tuple[int, ...]) -> PartFile:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=COMPRESSION)
        payload = buf.getvalue()
        rel = f"{self.folder}/part-{task_idx:05d}-{index:03d}.parquet"
        storage.write_bytes(root.join(rel), payload)
        column = table.column
        return PartFile(
            path=rel, num_rows=table.num_rows, num_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
            truncated=int(np.asarray(column("caption_truncated")).sum()), holdout=int(np.asarray(column("holdout")).sum()),
            latent_shape=list(shape),
        )

    def on_write_complete(self, write_result) -> None:
        self.files = sorted((PartFile(**f) for task in write_result.write_returns for f in task), key=lambda f: f.path)


def split_by_shape(table: pa.Table, column: str) -> list[tuple[tuple[int, ...], pa.Table]]:
    """A table -> (shape, table) per shape of the tensor `column`'s rows, each with fixed-shape tensor columns.

    The encoder emits one block per shape, but Ray Data may merge blocks on their way to the writer; a merged block
    holds variable-shaped tensor columns (`ArrowVariableShapedTensorType`), which are split here again by row."""
    if not isinstance(table.schema.field(column).type, ArrowVariableShapedTensorType):
        return [(tuple(int(s) for s in table.schema.field(column).type.shape), table)]
    accessor = BlockAccessor.for_block(table)
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, value in enumerate(accessor.to_numpy(column)):
        rows.setdefault(tuple(int(s) for s in np.shape(value)), []).append(i)
    out = []
    for shape, index in rows.items():
        part = table.take(index)
        for name in part.column_names:
            if isinstance(part.schema.field(name).type, ArrowVariableShapedTensorType):
                fixed = ArrowTensorArray.from_numpy(np.stack(list(BlockAccessor.for_block(part).to_numpy(name))))
                part = part.set_column(part.column_names.index(name), name, fixed)
        out.append((shape, part))
    return out


def shape_counts(files: list[PartFile]) -> list[dict]:
    """Rows per latent shape over the part files, most rows first: [{"shape": [C, h, w], "rows": n}, ...]."""
    counts: dict[tuple[int, ...], int] = {}
    for f in files:
        key = tuple(f.latent_shape or ())
        counts[key] = counts.get(key, 0) + f.num_rows
    return [{"shape": list(k), "rows": n} for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]


# ---------------------------------------------------------------------------------------------------
# The manifest and the null condition
# ---------------------------------------------------------------------------------------------------


def null_condition_bytes(context: torch.Tensor, mask: torch.Tensor) -> bytes:
    import torch
    from safetensors.torch import save as save_safetensors

    return save_safetensors({"context": context.float().contiguous(), "mask": mask.to(torch.bool).contiguous()})


def manifest_digest(files: list[dict], null_sha256: str, settings: dict) -> str:
    """Content digest of a latents folder: its part files, the null condition and what produced them."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["path"]):
        h.update(f"{f['path']}:{f['sha256']}\n".encode())
    h.update(null_sha256.encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def write_manifest(root: Location, manifest: dict) -> None:
    storage.write_json(root.join(MANIFEST), manifest)


def read_latents_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """The manifest of a complete latents folder; LatentsError naming the problem otherwise."""
    root = storage.resolve(uri, storage_cfg)
    loc = root.join(MANIFEST)
    try:
        present = storage.exists(loc)
    except OSError as e:
        raise LatentsError(f"latents {root.uri}: cannot be reached ({e})") from e
    if not present:
        partial = storage.list_files(root, ".parquet") if storage.exists(root) else []
        what = (f"has {len(partial)} Parquet file(s) but no {MANIFEST}: an interrupted encode; re-run "
                "pipelines/encode_latents.py to complete it") if partial else "does not exist (run pipelines/encode_latents.py)"
        raise LatentsError(f"latents {root.uri} {what}")
    try:
        manifest = storage.read_json(loc)
    except ValueError as e:
        raise LatentsError(f"latents {root.uri}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise LatentsError(f"latents {root.uri}: {MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise LatentsError(f"latents {root.uri}: {MANIFEST} has format {manifest.get('format')!r} "
                           f"v{manifest.get('format_version')!r}, expected {FORMAT!r} v{FORMAT_VERSION}")
    if not manifest.get("files") or manifest.get("num_rows", 0) == 0:
        raise LatentsError(f"latents {root.uri} is empty (its manifest lists no rows)")
    return manifest


def read_null_condition(uri: str, manifest: dict, storage_cfg: StorageConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty-prompt condition recorded with the latents: (context (L, D) float32, mask (L,) bool)."""
    root = storage.resolve(uri, storage_cfg)
    entry = manifest["null_condition"]
    payload = storage.read_bytes(root.join(entry["path"]))
    if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
        raise LatentsError(f"latents {root.uri}: {entry['path']} does not match the sha256 in {MANIFEST}")
    import torch
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(payload)
    return tensors["context"], tensors["mask"].to(torch.bool)


def remove_parts(root: Location, folders: list[str]) -> int:
    """Delete the Parquet files of the given part folders (those of interrupted attempts that the caller inherited
    through the folder's lease), nothing else. Returns files removed."""
    removed = 0
    for folder in folders:
        if not folder.startswith(PARTS_PREFIX) or "/" in folder:
            raise ValueError(f"{folder!r} is not a part folder name")
        for path in storage.list_files(root.join(folder), ".parquet"):
            root.filesystem.delete_file(path)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------------
# Reading: a streaming Ray Dataset over the files the manifest lists
# ---------------------------------------------------------------------------------------------------


def read_part_files(batch: dict, *, columns: list[str], split: str, root_path: str, files: FileTable,
                    counter_name: str | None = None) -> Iterator[pa.Table]:
    """Ray Data map_batches fn: whole Parquet files (bytes) -> their rows of `split`, projected to `columns`.

    A file whose bytes do not match the manifest's sha256 (changed, or gone mid-epoch) is skipped: its rows are
    counted as `corrupt_shard` in the SkipCounter `counter_name` (when given) and logged, never used."""
    read = columns + (["holdout"] if split != "all" and "holdout" not in columns else [])
    for payload, path in zip(batch["bytes"], batch["path"]):
        rel = str(path)[len(root_path):].lstrip("/")
        entry = files.get(rel, {})
        if not payload or not verified(payload, entry.get("sha256")):
            log.warning("latents part %s %s: its %d rows are skipped (corrupt_shard)", rel,
                        "is gone" if not payload else "does not match the sha256 in the manifest", entry.get("num_rows", 0))
            if counter_name:
                record_skips(counter_name, rel, {"shard": {"corrupt_shard": int(entry.get("num_rows", 0))}})
            continue
        table = pq.read_table(pa.BufferReader(payload), columns=read)
        if split != "all":
            table = table.filter(pc.equal(table.column("holdout"), split == "holdout"))
        yield table.select(columns)


def build_latent_dataset(uri: str, storage_cfg: StorageConfig | None = None, *, split: str = "train",
                         shuffle: bool = True, columns: list[str] | None = None,
                         num_cpus: float = 0.5, skip_counter=None) -> tuple[ray.data.Dataset, dict]:
    """(Ray Dataset of latent rows, manifest). `split`: "train" (not held out), "holdout" or "all".

    Only the files the manifest lists are read (in shuffled order when `shuffle`), so leftovers of an
    interrupted attempt never leak in; each is checked against its sha256 (`read_part_files`), and the rows of
    a bad or vanished one are counted in `skip_counter` (a pipelines.data SkipCounterHandle) when given. `columns` defaults to TRAIN_COLUMNS. Like the image reader, whole files
    are read and then parsed by tasks reserving `num_cpus` each (fractions keep them schedulable next to
    Train workers on small machines).
    """
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split {split!r}: choose train, holdout or all")
    manifest = read_latents_manifest(uri, storage_cfg)
    root = storage.resolve(uri, storage_cfg)
    paths = [root.join(f["path"]).path for f in manifest["files"]]
    ds = read_whole_files(paths, root.filesystem, shuffle="files" if shuffle else None, num_cpus=num_cpus)
    ds = ds.map_batches(read_part_files, batch_size=1, num_cpus=num_cpus,
                        fn_kwargs={"columns": list(columns or TRAIN_COLUMNS), "split": split, "root_path": root.path,
                                   "files": FileTable({f["path"]: f for f in manifest["files"]}, ("num_rows", "sha256")),
                                   "counter_name": skip_counter.name if skip_counter is not None else None})
    return ds, manifest


def summarize(files: list[PartFile]) -> dict[str, Any]:
    return {
        "num_rows": sum(f.num_rows for f in files),
        "num_bytes": sum(f.num_bytes for f in files),
        "truncated": sum(f.truncated for f in files),
        "holdout": sum(f.holdout for f in files),
    }


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

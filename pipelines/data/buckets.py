"""Aspect-ratio buckets: which shape each image is trained at, and batches that hold one shape each.

With `data.buckets` set (pipelines/config/data.py: a list of shapes, or a `BucketGrid` generated from a pixel area),
the reader (`decode_image`) puts each image in the bucket nearest its aspect ratio (`nearest_bucket`: the least
|log(w/h) - log(bw/bh)|), resizes it to cover that bucket and crops the rest, so that an image keeps as much of its
frame as a bucket allows. Its blocks then hold one shape each, and Ray Data hands a consumer rows of several shapes
(a variable-shaped tensor column). `ShapeBatcher` turns those rows into batches of a single shape, keeping one
pending buffer per shape: a rank trains on whichever bucket fills first, and rows left over at the end of an epoch
wait in their buffer for the next one, so nothing is dropped but the last partial batch of a run.

How ranks pick buckets: each rank on its own. DDP averages gradients, whose shapes are the parameters', not the
inputs', so ranks may train on different buckets in one step. Buckets have about the same pixel count, so their step
times differ by little (benchmarks/bench_buckets.py measures it per bucket: the straggler cost is the slowest
bucket's step over the mean); making every rank take the same bucket would instead need a collective per step and
buffers that wait for the rarest shape.

Stage B's latents carry their shape the same way (one shape per Parquet part file, see pipelines/data/latents.py),
and its workers batch them with the same `ShapeBatcher`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ldm_core.autoencoder import latent_shape_for
from pipelines.config.data import DataConfig, nearest_bucket  # noqa: F401  (re-exported: the rule lives with the config, whose default shape uses it too)


def check_shapes(data: DataConfig, latent_channels: int, f: int) -> list[tuple[int, int, int]]:
    """The latent shape (c, H / f, W / f) of every shape the reader yields (`data.shapes`), default shape first; a
    side that is not a multiple of f is refused (ConfigError) naming the field that gave it: data.resolution, or
    data.buckets when set (the default shape is then one of them)."""
    if data.buckets is None:
        return [latent_shape_for(data.size, latent_channels, f, "data.resolution")]
    ordered = [data.size, *(s for s in data.shapes if s != data.size)]  # (the default is one of the buckets)
    return [latent_shape_for(shape, latent_channels, f, "a bucket of data.buckets") for shape in ordered]


def cropped_fraction(height: int, width: int, bucket: tuple[int, int]) -> float:
    """The share of an image's pixels that resizing it to cover `bucket` and cropping to it throws away."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return 1.0 - (bh * bw) / (height * scale * width * scale)


def split_by_shape(batch: dict[str, np.ndarray], column: str | None = None
                   ) -> Iterator[tuple[tuple, dict[str, np.ndarray]]]:
    """A numpy batch -> (shape, batch) per distinct row shape, in order of first appearance: the shape of `column`, or
    without one, of every column together. The batch itself when it has one shape (fixed-shape columns: no per-row
    loop); otherwise every variable-shaped column (an object array of arrays) comes out stacked."""
    n = len(next(iter(batch.values()), ()))
    columns = [column] if column else list(batch)
    if not n:
        return
    if all(batch[c].dtype != object for c in columns):
        yield tuple(batch[c].shape[1:] for c in columns), batch
        return
    index: dict[tuple, list[int]] = {}
    for i in range(n):
        index.setdefault(tuple(np.shape(batch[c][i]) for c in columns), []).append(i)
    for shape, rows in index.items():
        yield shape, {c: _stack(v, rows) for c, v in batch.items()}


class ShapeBatcher:
    """Rows of any shapes in (numpy batches, a column per field), batches of `batch_size` rows of one shape out.

    A row's shape is that of all its array columns together (Stage A: the image; Stage B: the latents). One pending
    buffer per shape; a batch goes out as soon as its buffer holds `batch_size` rows. A numpy batch whose columns have
    a fixed shape (one bucket, or no buckets) is taken whole, without a per-row loop.
    """

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        self.batch_size = batch_size
        self._pending: dict[tuple, list[dict[str, np.ndarray]]] = {}
        self._counts: dict[tuple, int] = {}

    def add(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Take in a batch; yield every batch of one shape that is complete now."""
        for shape, chunk in split_by_shape(batch):
            self._pending.setdefault(shape, []).append(chunk)
            self._counts[shape] = self._counts.get(shape, 0) + len(next(iter(chunk.values())))
            while self._counts[shape] >= self.batch_size:
                yield self._take(shape, self.batch_size)

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        """The rows still pending, one (partial) batch per shape, largest count first."""
        for shape in sorted(self._counts, key=lambda s: -self._counts[s]):
            if self._counts[shape]:
                yield self._take(shape, self._counts[shape])

    @property
    def pending(self) -> int:
        return sum(self._counts.values())

    def _take(self, shape: tuple, n: int) -> dict[str, np.ndarray]:
        chunks = self._pending[shape]
        merged = chunks[0] if len(chunks) == 1 else {c: np.concatenate([ch[c] for ch in chunks]) for c in chunks[0]}
        out = {c: v[:n] for c, v in merged.items()}
        rest = {c: v[n:] for c, v in merged.items()}
        left = len(next(iter(rest.values())))
        self._pending[shape] = [rest] if left else []
        self._counts[shape] = left
        return out


def _stack(column: np.ndarray, rows: list[int]) -> np.ndarray:
    """`column[rows]`, stacked into one array when the column holds arrays (a variable-shaped tensor column)."""
    if column.dtype != object or not isinstance(column[rows[0]], np.ndarray):
        return column[rows]
    return np.stack([column[i] for i in rows])


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor | np.ndarray]:
    """A numpy batch -> tensors on `device` (copies: Ray's arrays are read-only); text columns (keys, captions) stay
    numpy arrays."""
    return {c: torch.from_numpy(np.array(v, copy=True)).to(device, non_blocking=True) if v.dtype.kind in "biuf" else v
            for c, v in batch.items()}


def iter_shape_batches(shard, *, batch_size: int, device: torch.device, drop_last: bool = False,
                       local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                       batcher: ShapeBatcher | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """`shard.iter_torch_batches(...)` for rows of several shapes (a Ray Dataset or a Train worker's DataIterator):
    batches of one shape each. Without `drop_last`, the rows left at the end come out as one partial batch per shape.
    Pass a `batcher` to carry pending rows over from one call (an epoch) to the next instead."""
    own = batcher is None
    batcher = batcher or ShapeBatcher(batch_size)
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=local_shuffle_buffer_size,
                                    local_shuffle_seed=local_shuffle_seed):
        for out in batcher.add(batch):
            yield to_torch(out, device)
    if own and not drop_last:
        for out in batcher.flush():
            yield to_torch(out, device)

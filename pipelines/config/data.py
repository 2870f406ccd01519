"""The dataset section of the pipeline config: where the shards are, how to build them, how to stream them."""

from __future__ import annotations

import functools
import math
from typing import Literal, Sequence

from pydantic import Field, model_validator

from ldm_core.config import StrictConfig

WHOLE_CPU_FROM = 2.0
"""Free CPUs from which an unset `data.cpus_per_task` is a whole CPU (`DataConfig.fit`)."""


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (h, w) whose aspect ratio is nearest the image's, on a log scale (a 2:1 and a 1:2 image are as far
    from a square); on a tie, the first listed. The reader places every image with it (pipelines/data/buckets.py);
    `DataConfig` picks its default shape with it (the bucket nearest a square)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


@functools.lru_cache(maxsize=64)
def _grid_shapes(area: int, step: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    """`BucketGrid.shapes`, computed once per setting: the reader asks for it with every image it decodes."""
    out = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step
        if height >= step and max(height, width) <= max_aspect * min(height, width):
            out.add((height, width))
    side = max(step, round(math.sqrt(area) / step) * step)
    if side * side <= area * 1.25:
        out.add((side, side))
    return tuple(sorted(out, key=lambda s: s[1] / s[0], reverse=True))


class BucketGrid(StrictConfig):
    """Aspect-ratio buckets generated from a pixel budget (SDXL's and kohya's recipe): every (height, width) that is a
    multiple of `step`, has about `area` pixels (the largest height for each width with height x width <= area) and a
    long side at most `max_aspect` times the short one."""

    area: int = Field(ge=64)
    """Target pixels per image, e.g. 65536 for 256 x 256."""
    step: int = Field(default=64, ge=1)
    """Every side is a multiple of this: use a multiple of the autoencoder's factor f (8 for kl-f8; 64 is SDXL's)."""
    max_aspect: float = Field(default=2.0, ge=1.0)
    """Longest side over shortest side, at most."""

    def shapes(self) -> list[tuple[int, int]]:
        """The buckets as (height, width), widest first; always holds the square nearest `area` (when it fits)."""
        return list(_grid_shapes(self.area, self.step, self.max_aspect))


class DataConfig(StrictConfig):
    """The `data` section: one dataset, read the same way by every stage (pipelines/data/reader.py)."""

    uri: str
    """Dataset root holding `manifest.json` and the shards: a local path, file:// or s3://bucket/prefix."""

    # --- building shards (pipelines/prepare_data.py, and the DAG's prepare node)
    source: str | None = None
    """What to build the shards from when `uri` has none yet: a bundled dataset ("mnist", "mnist_bold", "numbers", "skimage") or a
    folder of images. None: the shards must already exist."""
    format: Literal["webdataset", "parquet"] = "webdataset"
    """Shard format when building: webdataset tar (KEY.png + KEY.txt + KEY.json) or Parquet (key, image,
    caption, meta). Reading takes the format from the manifest."""
    shard_size: int = Field(default=1000, ge=1)
    """Samples per shard when building."""
    prepare_resolution: int | None = Field(default=None, ge=8)
    """Side of stored images when building from a bundled source (None: MNIST's native 28 px, skimage crops
    at 128 px; for "numbers" the height, the width being twice it, None: 32x64). Folders are stored as they are."""
    crops_per_photo: int | None = Field(default=None, ge=1)
    """The bundled "skimage" source only: random crops cut from each of its 15 photographs (None: 64). More
    crops are more varied training data from the same photographs (configs/photos.yaml)."""
    photo_crops: Literal["square", "any"] = "square"
    """The bundled "skimage" source only: "square" crops resized to `prepare_resolution`, or "any": the photographs at
    their own shapes and at several scales (each whole photograph, then crops of random aspect ratio up to 2:1 whose
    scale runs from the photograph's own pixels to all of it), stored with their shorter side at `prepare_resolution`
    (None: 128), for aspect-ratio buckets (`buckets`) to place."""
    limit: int | None = Field(default=None, ge=1)
    """Keep only the first N samples when building (quick experiments and tests)."""
    max_undecodable_fraction: float = Field(default=0.5, ge=0, le=1)
    """Building fails (no manifest, no shards left) when more than this fraction of the source's images cannot be
    decoded: a folder of mostly broken files is a mistake to report, not a dataset."""

    # --- streaming (every stage)
    resolution: int | tuple[int, int] = 256
    """Size of the training crops: one side (square, e.g. 256) or [height, width] (e.g. [32, 64]), each at least 8 px
    and a multiple of the autoencoder's downsampling factor (checked where the autoencoder is known). Images are
    resized to cover it (bicubic) and cropped (`crop`)."""
    buckets: list[tuple[int, int]] | BucketGrid | None = None
    """Aspect-ratio buckets (pipelines/data/buckets.py): None keeps every image at `resolution`. A list of
    [height, width] shapes, or {area, step, max_aspect} to generate them (`BucketGrid`). Each image goes to the bucket
    nearest its aspect ratio and is resized to cover it, cropping as little as possible; every training batch holds
    one bucket. `resolution` is then the default shape (what sampling uses unless told otherwise): one of the
    buckets, by default the one nearest a square. Every side must be a multiple of the autoencoder's factor f."""
    crop: Literal["random", "center"] = "random"
    """Random crops for training augmentation, or centre crops."""
    random_flip: bool = False
    """Flip horizontally with probability 0.5."""
    min_size: int = Field(default=0, ge=0)
    """Images whose shorter side is below this many pixels are skipped (counted as `too_small`); larger ones
    smaller than `resolution` are upscaled (counted as `upscaled`)."""
    batch_size: int = Field(default=16, ge=1)
    """Images per batch on each worker."""
    shuffle_buffer: int = Field(default=1024, ge=0)
    """Rows in each worker's local shuffle buffer (0: no local shuffle). Shard order is shuffled too (seeded by
    run.seed, different every epoch)."""
    holdout_fraction: float = Field(default=0.01, ge=0, lt=1)
    """Fraction of samples held out for evaluation (split "holdout"); chosen by a hash of the key (or of its
    source, see `holdout_by`), so stable across runs, shard layouts and formats."""
    holdout_by: Literal["sample", "source"] = "sample"
    """What the held-out split is drawn over. "sample": each key on its own. "source": keys that differ only in
    a trailing `-<number>` (crops or frames of one photograph or video, e.g. the bundled `skimage-<photo>-<n>`)
    go to the same split, so no held-out image shares a source with a training one; the held-out fraction is
    then one of sources, not of samples. Use it whenever samples are cut from common sources: a held-out crop
    of a training photograph flatters the model."""

    # --- CPU budget
    cpus_per_task: float | None = Field(default=None, gt=0)
    """CPUs each Ray Data read+decode task (one shard) reserves. Unset (the default): chosen when a stage starts,
    from the CPUs its Train workers (or encode actors) leave free on the cluster (`fit`): 1 where at least
    `WHOLE_CPU_FROM` are free (data has cores of its own: a cluster's CPU nodes, a GPU node's spare cores), 0.5 where
    fewer are (two 0.5-CPU Train workers on a 2-core laptop, where whole-CPU tasks would wait behind them). Measured
    on 2 cores (benchmarks/README.md): 1 CPU per task reads 256-px JPEGs at 0.8x+ a DataLoader, 0.5 at ~0.7x; below
    0.5 more decode tasks run at once than there are cores, and throughput drops. The choice holds for the run: after
    a node is lost and nothing replaces it, tasks no survivor has the CPUs for wait (each rank logs it after
    `pipelines.train.rank.STALL_WARN_S`); set 0.5 where nodes may go without a replacement."""
    reserved_cpus: float | None = Field(default=None, ge=0)
    """CPUs that must stay free of Train workers so read/decode tasks can run: `check_cpu_budget` fails
    before training when num_workers x cpus_per_worker leaves less; on an autoscaling cluster the stage asks
    the autoscaler for them next to its workers (pipelines/platform/cluster.py). At least `cpus_per_task`; 0 turns
    both off. Unset (the default): one task's worth, `cpus_per_task` as chosen."""

    def fit(self, free_cpus: float) -> "DataConfig":
        """This config with `cpus_per_task` and `reserved_cpus` chosen where they are unset, for a cluster on which
        `free_cpus` CPUs are left to Ray Data (its CPUs less the stage's Train workers or encode actors). Values the
        user set are kept; an explicit `reserved_cpus` caps the chosen `cpus_per_task`."""
        per_task = self.cpus_per_task
        if per_task is None:
            per_task = 1.0 if free_cpus >= WHOLE_CPU_FROM else 0.5
            if self.reserved_cpus:
                per_task = min(per_task, self.reserved_cpus)
        reserved = per_task if self.reserved_cpus is None else self.reserved_cpus
        if (per_task, reserved) == (self.cpus_per_task, self.reserved_cpus):
            return self
        return self.model_copy(update={"cpus_per_task": per_task, "reserved_cpus": reserved})

    @property
    def size(self) -> tuple[int, int]:
        """`resolution` as (height, width)."""
        return (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every shape an image can come out of the reader in, as (height, width): the buckets, or `size` alone."""
        if self.buckets is None:
            return [self.size]
        return self.buckets.shapes() if isinstance(self.buckets, BucketGrid) else [tuple(b) for b in self.buckets]

    @property
    def largest(self) -> tuple[int, int]:
        """The shape of the most pixels among `shapes`: what a memory estimate must fit."""
        return max(self.shapes, key=lambda s: (s[0] * s[1], s))

    @model_validator(mode="before")
    @classmethod
    def _default_resolution(cls, data):
        """With buckets and no `resolution`, the default shape is the bucket nearest a square (the first listed on a
        tie; a grid lists the widest first)."""
        if isinstance(data, dict) and data.get("buckets") is not None and data.get("resolution") is None:
            buckets = data["buckets"]
            shapes = BucketGrid.model_validate(buckets).shapes() if isinstance(buckets, dict) else buckets
            if shapes and all(isinstance(s, (list, tuple)) and len(s) == 2 and min(s) > 0 for s in shapes):
                h, w = nearest_bucket(1, 1, shapes)
                data = {**data, "resolution": h if h == w else [h, w]}
        return data

    @model_validator(mode="after")
    def _check(self):
        if min(self.size) < 8:
            raise ValueError(f"resolution {self.resolution}: every side must be at least 8 px")
        if self.buckets is not None:
            shapes = self.shapes
            if not shapes:
                raise ValueError(f"buckets {self.buckets}: no shape fits (raise area or max_aspect, or lower step)")
            if len(set(shapes)) != len(shapes):
                raise ValueError(f"buckets {[list(s) for s in shapes]}: a shape is listed twice")
            small = [list(s) for s in shapes if min(s) < 8]
            if small:
                raise ValueError(f"buckets: {small[0]} has a side below 8 px")
            if self.size not in shapes:
                raise ValueError(f"resolution {self.resolution} is not one of the buckets {[list(s) for s in shapes]}: "
                                 "it is the default shape, so it must be one of them (or leave it out)")
        if self.min_size > min(min(s) for s in self.shapes):
            raise ValueError(f"min_size ({self.min_size}) must not exceed resolution ({self.resolution})")
        if self.reserved_cpus and self.cpus_per_task and self.reserved_cpus < self.cpus_per_task:
            raise ValueError(
                f"reserved_cpus ({self.reserved_cpus}) is smaller than cpus_per_task ({self.cpus_per_task}): "
                "not even one read task could run"
            )
        return self

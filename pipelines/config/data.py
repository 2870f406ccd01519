"""The dataset section of the pipeline config: where the shards are, how to build them, how to stream them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ldm_core.config import StrictConfig


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
    cpus_per_task: float = Field(default=0.5, gt=0)
    """CPUs each Ray Data read+decode task (one shard) reserves. Measured on 2 cores (benchmarks/README.md):
    smaller fractions run more decode tasks at once than there are cores, and throughput drops."""
    reserved_cpus: float = Field(default=0.5, ge=0)
    """CPUs that must stay free of Train workers so read/decode tasks can run: `check_cpu_budget` fails
    before training when num_workers x cpus_per_worker leaves less; on an autoscaling cluster the stage asks
    the autoscaler for them next to its workers (pipelines/platform/cluster.py). At least `cpus_per_task`; 0 turns
    both off."""

    @property
    def size(self) -> tuple[int, int]:
        """`resolution` as (height, width)."""
        return (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)

    @model_validator(mode="after")
    def _check(self):
        if min(self.size) < 8:
            raise ValueError(f"resolution {self.resolution}: every side must be at least 8 px")
        if self.min_size > min(self.size):
            raise ValueError(f"min_size ({self.min_size}) must not exceed resolution ({self.resolution})")
        if self.reserved_cpus and self.reserved_cpus < self.cpus_per_task:
            raise ValueError(
                f"reserved_cpus ({self.reserved_cpus}) is smaller than cpus_per_task ({self.cpus_per_task}): "
                "not even one read task could run"
            )
        return self

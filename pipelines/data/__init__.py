"""Sharded image datasets: building shards, streaming them with Ray Data, accounting for bad samples.

    prepare_dataset("mnist", "s3://bucket/datasets/mnist", fmt="webdataset", shard_size=1000)
    ds, skips = build_dataset(DataConfig(uri="s3://bucket/datasets/mnist", resolution=32), split="train")
    skips.snapshot()  # {"converted_l": 4750, "upscaled": 4750}

Images arrive as uint8 (3, R, R); `to_model_range` turns a batch into the model's float32 [-1, 1] on its device.
"""

from pipelines.config.data import DataConfig
from pipelines.data.reader import (
    DROP_REASONS,
    SkipCounterHandle,
    build_dataset,
    decode_image,
    decode_sample,
    new_skip_counter,
    open_skip_counter,
    to_model_range,
)
from pipelines.data.shards import DatasetError, index_shards, prepare_dataset, read_manifest, write_shards

__all__ = [
    "DROP_REASONS", "DataConfig", "DatasetError", "SkipCounterHandle", "build_dataset",
    "decode_image", "decode_sample", "index_shards", "new_skip_counter", "open_skip_counter", "prepare_dataset",
    "read_manifest", "to_model_range", "write_shards",
]

"""Sharded image datasets: building shards, streaming them with Ray Data, accounting for bad samples."""

from pipelines.data.config import DataConfig
from pipelines.data.reader import (
    DROP_REASONS,
    SkipCounterHandle,
    build_dataset,
    check_cpu_budget,
    decode_image,
    open_skip_counter,
)
from pipelines.data.shards import DatasetError, prepare_dataset, read_manifest, write_shards

__all__ = [
    "DROP_REASONS", "DataConfig", "DatasetError", "SkipCounterHandle", "build_dataset", "check_cpu_budget",
    "decode_image", "open_skip_counter", "prepare_dataset", "read_manifest", "write_shards",
]

"""The actor where read tasks count the samples they skip or repair (`pipelines.data.reader` uses it and says
how). It lives in a module that imports Ray and nothing else: an actor's process imports its class's module, and
the reader's (Ray Data, pyarrow, PIL, the config) would add seconds to every stage's start."""

from __future__ import annotations

from collections import Counter

import ray


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SkipCounter:
    """Skips and repairs by reason, one record per (shard, part). A shard read again (next epoch, a retried
    task) replaces its record, so a sample is counted once however often it is read.

    Ray restarts it under the same name when its process dies; the records it held are gone, and come back as
    the shards are read again (every epoch re-records every shard). Until then its counts are low, never high.
    """

    def __init__(self):
        self.records: dict[tuple[str, str], dict[str, int]] = {}

    def record(self, shard: str, parts: dict[str, dict[str, int]]) -> None:
        """`parts`: {"shard": shard-level losses, SPLIT: that split's per-sample counts}."""
        for part, counts in parts.items():
            self.records[(shard, part)] = counts

    def snapshot(self) -> dict[str, int]:
        total: Counter = Counter()
        for (shard, part), counts in self.records.items():
            if part in ("train", "holdout") and (shard, "all") in self.records:
                continue  # "all" already holds both splits of this shard
            total.update(counts)
        return {reason: n for reason, n in sorted(total.items()) if n}

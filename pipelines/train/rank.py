"""Pieces every Ray Train loop in this project shares: devices, precision, data iteration and timing,
non-finite-loss handling, checkpoint reporting, and the test-only fault hook.

These run inside Train workers. Config reaches them only through `train_loop_config`.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from pipelines.data.buckets import ShapeBatcher, iter_shape_batches
from pipelines.platform import storage
from pipelines.platform.devices import autocast  # noqa: F401  (the loop's precision)
from pipelines.config.sections import OptimSection, TrainLoopSection

log = logging.getLogger(__name__)


FAULT_GRACE_S = 10.0
"""How long the fault hook's worker lives on after writing its marker: tests that kill a driver at the fault wait
for the marker (on S3: a listing, seconds on a loaded box) and 2 s more, and must act before the worker exits."""
STALL_WARN_S = 300.0
"""A rank that has waited this long for its next batch says so (again at every multiple): Ray Data waits silently
for CPUs that no node has free, e.g. a reader sized for the cluster at the start, after a node was lost."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced a NaN/inf loss."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (to record where the worker group actually ran)."""
    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [str(n) for n in everyone]


def warmup_schedule(optim: OptimSection) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over `warmup_steps`, then constant."""
    warmup = optim.warmup_steps

    def factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return factor


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class NonFiniteGuard:
    """Skips steps whose loss (or gradient norm) is NaN/inf on any rank (all ranks agree, so DDP never
    desynchronises) and stops the run after `limit` such steps in a row."""

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.device = device
        self.consecutive = 0
        self.total = 0

    def should_skip(self, *losses: torch.Tensor, agreed: bool = False) -> bool:
        """One host sync. `agreed=True`: the values are already identical on every rank (a gradient norm after
        DDP's all-reduce), so no collective is needed to agree."""
        finite = torch.stack([torch.isfinite(l).all() for l in losses]).all()
        bad = (~finite).float().reshape(1)
        if not agreed:
            bad = all_reduce_sum(bad)
        if bad.item() > 0:
            self.consecutive += 1
            self.total += 1
            if self.consecutive >= self.limit:
                raise NonFiniteLossError(
                    f"{self.consecutive} consecutive steps had a non-finite loss "
                    f"(train.max_consecutive_nonfinite={self.limit}); stopping. The last good checkpoint is kept."
                )
            return True
        self.consecutive = 0
        return False


class StepTimer:
    """Splits wall time into waiting for data and computing, to report the data-wait fraction."""

    def __init__(self):
        self.data_s = 0.0
        self.total_s = 0.0
        self.samples = 0
        self._t = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self._t

    def step_done(self, samples: int) -> None:
        now = time.perf_counter()
        self.total_s += now - self._t
        self.samples += samples
        self._t = now

    def restart(self) -> None:
        """Start timing afresh: what ran since the last step (the stage's periodic work: checkpoints, grids,
        evaluations) is no step's compute and no step's data wait."""
        self._t = time.perf_counter()

    def pop(self) -> dict[str, float]:
        out = {
            "perf/samples_per_s_per_worker": self.samples / self.total_s if self.total_s else 0.0,
            "perf/data_wait_fraction": self.data_s / self.total_s if self.total_s else 0.0,
            "perf/step_time_s": self.total_s,
        }
        self.data_s = self.total_s = 0.0
        self.samples = 0
        self._t = time.perf_counter()
        return out


def _epochs(shard, *, batch_size: int, shuffle_buffer: int, seed: int, device: torch.device,
            by_shape: bool = False) -> Iterator[dict]:
    """This worker's dataset shard, epoch after epoch, reshuffled each epoch. `by_shape`: the rows come in several
    shapes (aspect-ratio buckets): each batch holds one (`pipelines.data.buckets.ShapeBatcher`), and rows pending at
    an epoch's end wait for the next."""
    epoch = 0
    batcher = ShapeBatcher(batch_size) if by_shape else None
    while True:
        produced = 0
        shuffle = {"local_shuffle_buffer_size": shuffle_buffer or None,
                   "local_shuffle_seed": seed + epoch if shuffle_buffer else None}
        pending_before = batcher.pending if batcher is not None else 0
        if batcher is not None:
            epoch_batches = iter_shape_batches(shard, batch_size=batch_size, device=device, batcher=batcher, **shuffle)
        else:
            epoch_batches = shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device, **shuffle)
        for batch in epoch_batches:
            produced += 1
            yield batch
        # By shape, an epoch may end with every row still pending (fewer than a batch of each shape): they carry over,
        # and the next epoch completes batches. Only an epoch that brought no row at all is a dead end.
        rows = produced * batch_size + (batcher.pending - pending_before if batcher is not None else 0)
        if produced == 0 and (batcher is None or rows == 0):
            raise RuntimeError(
                f"this worker's data shard yielded no full batch of {batch_size}: the dataset is smaller than "
                "num_workers x batch_size (or everything was skipped)"
            )
        epoch += 1


def batches_forever(shard, *, batch_size: int, shuffle_buffer: int, seed: int, device: torch.device,
                    ahead: int = 8, by_shape: bool = False) -> "ReadAhead":
    """Endless iterator over this worker's dataset shard, epoch after epoch, reshuffled each epoch, read ahead
    by a background thread that starts now (`ReadAhead`). `by_shape`: batches of one shape each (see `_epochs`)."""
    return ReadAhead(_epochs(shard, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed, device=device,
                             by_shape=by_shape), ahead=ahead)


def _read_into(source: Iterator[Any], ready: queue.Queue, stop: threading.Event) -> None:
    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put(("item", item)):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
        put(("error", e))
    else:
        put(("end", None))


class ReadAhead:
    """An iterator whose items a background thread fetches from `source`, keeping up to `ahead` ready.

    Ray Data prefetches within an epoch, not across: each epoch's split iterator starts its read plan anew
    (about half a second on the quickstart's latents), and a loop that asked for the next epoch only when it
    needed the next batch stood still for that long at every epoch boundary. The thread starts the next epoch
    while the loop trains on the batches it holds, and, started before the model is wrapped in DDP, overlaps
    Ray Data's start-up with the stage's. An error in the reader is raised in the consumer; `close()` (or
    dropping the iterator) stops the thread.
    """

    def __init__(self, source: Iterator[Any], ahead: int = 8, stall_warn_s: float = STALL_WARN_S):
        self._ready: queue.Queue = queue.Queue(maxsize=ahead)
        self._stall_warn_s = stall_warn_s
        self._stop = threading.Event()
        # The thread holds the queue and the event, not this object, so dropping the iterator stops it.
        self._thread = threading.Thread(target=_read_into, args=(source, self._ready, self._stop), name="read-ahead",
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> "ReadAhead":
        return self

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        waited = 0.0
        while True:
            try:
                kind, item = self._ready.get(timeout=self._stall_warn_s)
                break
            except queue.Empty:
                waited += self._stall_warn_s
                log.warning("no batch from Ray Data for %g s: its tasks may be waiting for CPUs that no node has free "
                            "(`ray status` lists pending demands; data.cpus_per_task sets what each read task takes)",
                            waited)
        if kind != "item":
            self.close()
            if kind == "error":
                raise item
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()

    __del__ = close


def report(metrics: dict[str, Any], write_checkpoint: Callable[[Path], None] | None, rank: int) -> None:
    """Every rank reports (Ray Train V2 requires it); rank 0 alone writes and attaches the checkpoint."""
    if write_checkpoint is not None and rank == 0:
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            write_checkpoint(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


def fault_marker(checkpoint_root: str, run_name: str) -> str:
    return f"{checkpoint_root.rstrip('/')}/{run_name}/.fault_injected"


def maybe_inject_fault(train: TrainLoopSection, step: int, rank: int, world_size: int, marker_uri: str) -> None:
    """TEST-ONLY: kill this worker process once at `train.fail_at_step`, to exercise FailureConfig + resume.

    A marker object next to the checkpoints makes it fire once per run name, across worker restarts.
    """
    if train.fail_at_step is None or step != train.fail_at_step:
        return
    if rank != (1 if world_size > 1 else 0):
        return
    marker = storage.resolve(marker_uri)
    if storage.exists(marker):
        return
    storage.write_bytes(marker, f"step={step}\n".encode())
    log.error("fault hook: rank %d exiting at step %d (train.fail_at_step)", rank, step)
    # Ray Train's controller collects reports by polling; a process that dies right after reporting can
    # take its last checkpoint with it. A real crash comes some time after the last checkpoint: so here.
    time.sleep(FAULT_GRACE_S)
    os._exit(1)

"""The Train-loop helpers that do not need a worker group: the non-finite guard and the warm-up."""

import pytest
import torch

from pipelines.config.sections import OptimSection
from pipelines.train.rank import NonFiniteGuard, NonFiniteLossError, warmup_schedule


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_after_the_limit():
    guard = NonFiniteGuard(limit=3, device=torch.device("cpu"))
    assert not guard.should_skip(torch.tensor(1.0))
    assert guard.should_skip(torch.tensor(float("nan")))
    assert guard.should_skip(torch.tensor(1.0), torch.tensor(float("inf")))
    assert not guard.should_skip(torch.tensor(0.5))  # a finite step resets the streak, not the total
    assert (guard.consecutive, guard.total) == (0, 2)
    guard.should_skip(torch.tensor(float("nan")))
    guard.should_skip(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="max_consecutive_nonfinite=3"):
        guard.should_skip(torch.tensor(float("nan")))
    assert guard.total == 5


def test_linear_warmup():
    factor = warmup_schedule(OptimSection(warmup_steps=4))
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_schedule(OptimSection(warmup_steps=0))(0) == 1.0


class _CountingShard:
    """A real Ray DataIterator that counts how often an epoch was started (no behaviour changed)."""

    def __init__(self, iterator):
        self.iterator, self.epochs_started = iterator, 0

    def iter_torch_batches(self, **kwargs):
        self.epochs_started += 1
        return self.iterator.iter_torch_batches(**kwargs)


def _wait_for(condition, timeout_s: float = 60.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_batches_forever_starts_the_next_epoch_before_the_loop_asks_for_it(ray_local):
    """Issue 17: an epoch boundary must not stall the training loop, nor Ray Data's start-up the first step. The
    reader starts when the stream is made and, with 8 batches of room, has begun epoch 2 of a 3-batch epoch before
    the loop took anything; every row comes once per epoch, reshuffled; close() stops the reader."""
    import ray

    from pipelines.train.rank import batches_forever

    shard = _CountingShard(ray.data.range(12, override_num_blocks=3).iterator())
    stream = batches_forever(shard, batch_size=4, shuffle_buffer=12, seed=0, device=torch.device("cpu"), ahead=8)
    assert _wait_for(lambda: shard.epochs_started >= 2), "the next epoch was not started ahead of the loop"
    epochs = [torch.cat([next(stream)["id"] for _ in range(3)]) for _ in range(3)]
    stream.close()
    stream._thread.join(timeout=30)
    assert not stream._thread.is_alive()
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(12))
    assert len({tuple(ids.tolist()) for ids in epochs}) > 1  # reshuffled per epoch


def test_batches_forever_raises_the_readers_error_in_the_loop(ray_local):
    import ray

    from pipelines.train.rank import batches_forever

    stream = batches_forever(ray.data.range(3).iterator(), batch_size=4, shuffle_buffer=0, seed=0,
                             device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="yielded no full batch of 4"):
        next(stream)


def test_read_ahead_ends_with_its_source():
    from pipelines.train.rank import ReadAhead

    assert list(ReadAhead(iter(range(20)), ahead=3)) == list(range(20))


def test_read_ahead_says_when_a_batch_is_long_overdue(caplog):
    """A reader that stalls (Ray Data waiting for CPUs no node has) is named in the log, then its item still comes."""
    import logging
    import time

    from pipelines.train.rank import ReadAhead

    def slow():
        time.sleep(1.0)  # well past the second warning (at 0.4 s), even if next() is called late on a loaded box
        yield "late"

    with caplog.at_level(logging.WARNING, logger="pipelines.train.rank"):
        assert next(ReadAhead(slow(), stall_warn_s=0.2)) == "late"
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no batch from Ray Data for ")]
    assert [m.split(" s: ")[0].rsplit(" ", 1)[1] for m in stalls[:2]] == ["0.2", "0.4"]
    assert stalls[0].endswith("(`ray status` lists pending demands; data.cpus_per_task sets what each read task takes)")

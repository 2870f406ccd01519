"""The Train-loop helpers that do not need a worker group: the non-finite guard and the warm-up."""

import pytest
import torch

from pipelines.settings import OptimSection
from pipelines.training import NonFiniteGuard, NonFiniteLossError, warmup_schedule


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

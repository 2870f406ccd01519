"""The console's progress and summary lines (pipelines/platform/progress.py): their shape, in place on a terminal, one line
every N steps elsewhere, and never a control code off a terminal."""

from __future__ import annotations

import io
import os
import re
import time

from pipelines.platform.progress import Progress, format_duration, progress_line, summary_line

ANSI_OR_CR = re.compile(r"\x1b\[|\r")


class TerminalBuffer(io.StringIO):
    """An in-memory stream that says it is a terminal (what a pty would say)."""

    def isatty(self) -> bool:
        return True


def test_lines_carry_stage_step_loss_throughput_data_wait_and_eta():
    line = progress_line("stage_a", 20, 200, loss=0.123456, images_per_s=85.33, data_wait=0.12, eta_s=151)
    assert line == "[stage_a] step 20/200  loss 0.1235  images/s 85.3  data-wait 12%  ETA 2m31s"
    assert progress_line("prepare", 3, None, unit="shard", samples=96) == "[prepare] shard 3  samples 96"
    assert summary_line("stage_b", "500 steps", seconds=184.2, loss=0.25) == "[stage_b] done  500 steps in 3m04s  loss 0.25"
    assert summary_line("encode", "reused 96 rows") == "[encode] done  reused 96 rows"
    assert [format_duration(s) for s in (0, 59.4, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]


def test_off_a_terminal_one_plain_line_every_n_steps_and_at_the_end():
    out = io.StringIO()
    progress = Progress("stage_b", total=25, every=10, start_step=0, stream=out)
    printed = [progress.update(step, loss=1.0 / step) for step in range(1, 26)]
    summary = progress.done("25 steps", loss=0.04)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines[:-1]] == ["10/25", "20/25", "25/25"]
    assert sum(p is not None for p in printed) == 3
    assert lines[-1] == summary and summary.startswith("[stage_b] done  25 steps in ")
    assert not ANSI_OR_CR.search(out.getvalue())


def test_on_a_terminal_the_line_is_rewritten_in_place_then_closed_by_the_summary():
    out = TerminalBuffer()
    progress = Progress("sample", total=4, every=1, stream=out, min_interval_s=0.0, unit="images")
    for step in range(1, 5):
        progress.update(step)
    progress.done("4 images")
    text = out.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 2  # four redraws of one line, then the summary's line
    assert text.rstrip("\n").splitlines()[-1].startswith("[sample] done  4 images")


def test_eta_counts_only_the_steps_this_process_ran():
    progress = Progress("stage_a", total=200, every=50, start_step=100, stream=io.StringIO())
    progress._t0 = time.monotonic() - 10.0  # 10 s for the 50 steps since the resume at step 100
    eta = progress.eta_s(150)
    assert 9.0 < eta < 11.0  # 50 steps left at 0.2 s each, not 0.067 s (which counting from step 0 would give)
    assert progress.eta_s(100) is None


def test_is_terminal_of_a_real_pipe_is_false():
    from pipelines.platform.progress import is_terminal

    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe, os.fdopen(r) as _:
        assert not is_terminal(pipe)

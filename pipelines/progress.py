"""The console's progress and summary lines: one per stage, the same shape from every entry point.

    [stage_a] step 20/200  loss 0.1234  images/s 85.3  data-wait 12%  ETA 2m31s
    [stage_a] done  200 steps in 3m05s  loss 0.0312  images/s 84.1

On a terminal the progress line is rewritten in place (carriage return); anywhere else (CI, a log file,
`ray job logs`, a Ray Train worker whose stdout Ray forwards to the driver) one line is printed every
`every` steps and at the last step, with no control codes. Nothing here imports Ray or torch, so both the
driver and the Train workers can call it.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream if stream is not None else sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for one line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fields(loss: float | None = None, images_per_s: float | None = None, data_wait: float | None = None,
            **extra: Any) -> list[str]:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if images_per_s is not None:
        parts.append(f"images/s {images_per_s:.1f}")
    if data_wait is not None:
        parts.append(f"data-wait {100 * data_wait:.0f}%")
    for name, value in extra.items():
        if value is None:
            continue
        parts.append(f"{name.replace('_', ' ')} {value:.4g}" if isinstance(value, float) else f"{name.replace('_', ' ')} {value}")
    return parts


def progress_line(stage: str, step: int, total: int | None, *, loss: float | None = None, images_per_s: float | None = None,
                  data_wait: float | None = None, eta_s: float | None = None, unit: str = "step", **extra: Any) -> str:
    """`[stage] step 20/200  loss ...  images/s ...  data-wait 12%  ETA 2m31s` (absent fields are left out; a
    None total prints `step 20`). `data_wait` is a fraction (0..1) of wall time spent waiting for input; `extra`
    fields print as `name value`."""
    count = f"{step}/{total}" if total is not None else f"{step}"
    parts = [f"[{stage}] {unit} {count}", *_fields(loss, images_per_s, data_wait, **extra)]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def summary_line(stage: str, what: str = "", *, seconds: float | None = None, loss: float | None = None,
                 images_per_s: float | None = None, data_wait: float | None = None, **extra: Any) -> str:
    """`[stage] done  200 steps in 3m05s  loss ...`: the one line a stage ends with. `what` says what was done
    (`200 steps`, `5000 rows`, `reused run 1a2b...`)."""
    head = f"[{stage}] done"
    if what:
        head += f"  {what}"
    if seconds is not None:
        head += f" in {format_duration(seconds)}" if what else f"  {format_duration(seconds)}"
    return "  ".join([head, *_fields(loss, images_per_s, data_wait, **extra)])


class Progress:
    """Prints one stage's progress line: in place on a terminal, every `every` steps otherwise.

    `start_step` is where this process began (a resumed run starts past 0): the ETA is the remaining steps
    times the mean wall time per step seen by this process, so a resume does not look instantly fast.
    """

    def __init__(self, stage: str, total: int, *, every: int = 10, start_step: int = 0, unit: str = "step",
                 stream: IO[str] | None = None, min_interval_s: float = 0.5):
        self.stage = stage
        self.total = total
        self.every = max(1, every)
        self.start_step = start_step
        self.unit = unit
        self.stream = stream if stream is not None else sys.stdout
        self.in_place = is_terminal(self.stream)
        self.min_interval_s = min_interval_s  # on a terminal: redraw at most this often
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._open_line = False  # a terminal line drawn without its newline yet

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._t0) / done * max(0, self.total - step)

    def update(self, step: int, **fields: Any) -> str | None:
        """Report that `step` of `total` is done; returns the line if one was printed. `fields` are those of
        `progress_line` (loss, images_per_s, data_wait, ...)."""
        last = step >= self.total
        if self.in_place:
            now = time.monotonic()
            if not last and now - self._last_draw < self.min_interval_s:
                return None
            self._last_draw = now
        elif not last and step % self.every:
            return None
        line = progress_line(self.stage, step, self.total, eta_s=self.eta_s(step), unit=self.unit, **fields)
        if self.in_place:
            self.stream.write("\r" + line + "\033[K")  # \033[K: erase what a longer previous line left
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def done(self, what: str = "", **fields: Any) -> str:
        """Print the stage's summary line (closing an in-place progress line first); returns it."""
        line = summary_line(self.stage, what, seconds=time.monotonic() - self._t0, **fields)
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(line + "\n")
        self.stream.flush()
        return line


def print_summary(stage: str, what: str = "", **fields: Any) -> str:
    """Print one summary line for a stage that has no step loop (prepare, encode, sample); returns it."""
    line = summary_line(stage, what, **fields)
    print(line, flush=True)
    return line

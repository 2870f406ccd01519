"""The console's progress and summary lines: one per stage, the same shape from every entry point.

    [stage_a] step 20/200  loss 0.1234  images/s 85.3  data-wait 12%  ETA 2m31s
    [stage_a] done  200 steps in 3m05s  loss 0.0312  images/s 84.1

On a terminal the progress line is rewritten in place (carriage return); anywhere else (CI, a log file,
`ray job logs`, a Ray Train worker whose stdout Ray forwards to the driver) one line is printed every
`every` steps and at the last step, with no control codes. Nothing here imports Ray or torch, so both the
driver and the Train workers can call it.

Run as a script, this file is the console filter a quiet driver puts on its stderr (pipelines/platform/runtime.py): it
passes everything through except Ray's core (C++) log records, which Ray's log files keep anyway.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import threading
import time
from typing import IO, Any, Callable, TypeVar

T = TypeVar("T")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""A terminal control sequence (colour, cursor movement, line erase)."""


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


    def close(self) -> None:
        """End an in-place progress line (for a stage whose summary is printed by other means)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def run_with_progress(stage: str, total: int, work: Callable[[], T], count: Callable[[], int | None], *,
                      unit: str = "images", poll_s: float = 1.0, lines: int = 10, stream: IO[str] | None = None) -> T:
    """`work()` in a background thread while `stage`'s progress line shows `count()` of `total` done (with the rate
    and an ETA), polled every `poll_s`: in place on a terminal; elsewhere one line each time another 1/`lines` of
    `total` is done, and one for the final count. `count` may return None or raise (not known right now): that poll
    is skipped. Returns what `work` returns, or raises what it raised. For a job whose progress lives elsewhere
    (a Ray Data pipeline writing through a datasink, counted by an actor)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    progress = Progress(stage, total, every=1, unit=unit, stream=stream)
    mark = max(1, -(-total // max(1, lines)))
    started, next_line, shown = time.monotonic(), 0, None
    thread = threading.Thread(target=target, name=f"{stage}-work", daemon=True)  # daemon: Ctrl-C still ends the process
    thread.start()
    while True:
        thread.join(poll_s)
        finished = not thread.is_alive()
        try:
            done = count()
        except Exception:
            done = None
        if done and done != shown and (progress.in_place or done >= next_line or finished):
            progress.update(done, images_per_s=done / max(time.monotonic() - started, 1e-9))
            shown, next_line = done, (done // mark + 1) * mark
        if finished:
            break
    progress.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def print_summary(stage: str, what: str = "", **fields: Any) -> str:
    """Print one summary line for a stage that has no step loop (prepare, encode, sample); returns it."""
    line = summary_line(stage, what, **fields)
    print(line, flush=True)
    return line


# ---------------------------------------------------------------------------------------------------
# Ray's core log records on the console. Ray's C++ core worker writes its ERROR records to stderr as well as to its
# log file (python-core-driver-*.log, python-core-worker-*.log in the session's logs/), and the driver forwards a
# worker's stderr with a "(ActorName pid=N)" prefix: Ray's own notices such as `core_worker.cc:... Actor with class
# name: 'PreemptionWatcher' ... has constructor arguments in the object store and max_restarts > 0`, logged at E
# for every actor Ray Train or Ray Data makes. Fatal records (C, a crash) stay on the console.
# ---------------------------------------------------------------------------------------------------

RAY_CORE_RECORD = re.compile(
    r"^(?P<source>\([^)]*\) )?\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[TDIWEC]) \d+ \d+\] [\w./-]+:\d+: ")
"""`[2026-11-26 03:32:08,163 E 11281 11311] core_worker.cc:2465: ...`, possibly behind a "(TrainController pid=N) "."""
WORKER_SOURCE = re.compile(r"^\([^)]*pid=[^)]*\) ")


class RayCoreRecords:
    """A line filter: False for a Ray core log record below fatal and for the lines that continue it (indented, or
    the traceback it opens up to its exception line), True for everything else."""

    def __init__(self):
        self._open: dict[str, str] = {}  # source ("" for this process) -> "record" | "traceback"

    def keep(self, line: str) -> bool:
        plain = ANSI.sub("", line)
        record = RAY_CORE_RECORD.match(plain)
        if record:
            source = record["source"] or ""
            if record["level"] == "C":
                self._open.pop(source, None)
                return True
            self._open[source] = "traceback" if plain.rstrip().endswith("Traceback (most recent call last):") else "record"
            return False
        worker = WORKER_SOURCE.match(plain)
        source = worker.group(0) if worker else ""
        state = self._open.get(source)
        if state is None:
            return True
        message = plain[len(source):]
        if message[:1] in (" ", "\t") or message.startswith("***"):
            return False
        del self._open[source]
        return state != "traceback"  # the exception line that ends the record's traceback goes with it


def _write_all(fd: int, data: bytes) -> bool:
    try:
        while data:
            data = data[os.write(fd, data):]
        return True
    except OSError:  # the console is gone: keep reading, so the writer never blocks or sees a broken pipe
        return False


def filter_ray_core_records(src: int = 0, dst: int = 1, *, partial_after_s: float = 0.1) -> None:
    """Copy `src` to `dst` line by line without Ray's core log records, until `src` ends. A partial line (a prompt,
    a progress bar) goes out as it is once nothing more came for `partial_after_s`."""
    records = RayCoreRecords()
    pending = b""
    console = True
    while True:
        ready, _, _ = select.select([src], [], [], partial_after_s if pending else None)
        if not ready:
            console = console and _write_all(dst, pending)
            pending = b""
            continue
        chunk = os.read(src, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(line + b"\n" for line in lines if records.keep(line.decode("utf-8", "replace")))
        if out and console:
            console = _write_all(dst, out)
    if pending and console:
        _write_all(dst, pending)


if __name__ == "__main__":
    # The driver's stderr filter: it must outlive whatever the driver's process group is sent (Ctrl-C) so that the
    # driver's last lines still reach the console; it ends when the driver's side of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    filter_ray_core_records()

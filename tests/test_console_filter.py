"""The driver's stderr filter (Ray core log records off the console) and the progress line of a job counted elsewhere.
The end-to-end check, against a real pipeline run, is in test_pipeline.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time

import pytest

from pipelines.platform import progress
from pipelines.platform.progress import RayCoreRecords, run_with_progress

CORE_E = ("[2026-11-26 03:32:27,124 E 10729 10729] core_worker.cc:2465: Actor with class name: 'MapWorker(...)' and ID: "
          "'4119d2' has constructor arguments in the object store and max_restarts > 0.")
WORKER_E = "(TrainController pid=11281) [2026-11-26 03:32:08,163 E 11281 11311] core_worker.cc:2465: Actor 'PreemptionWatcher'"


def test_core_records_below_fatal_are_dropped_with_their_continuation_and_nothing_else():
    records = RayCoreRecords()
    lines = [
        "[stage_a] running ...",
        CORE_E,
        "    an indented continuation of that record",
        "[encode] done  96 rows in 11s",
        "\x1b[36m" + WORKER_E.replace(") [", ")\x1b[0m [", 1),  # a terminal's coloured worker prefix
        "(RayTrainWorker pid=12) [stage_b] step 1/4  loss 0.39",
        "(TrainController pid=11281)   continued",
        "(TrainController pid=11281) [2026-11-26 03:32:08,163 E 11281 11311] task_manager.cc:1: failed: Traceback (most recent call last):",
        "(TrainController pid=11281)   File \"x.py\", line 1, in f",
        "(TrainController pid=11281) ValueError: the end of that traceback",
        "(TrainController pid=11281) a line of its own",
        "[2026-11-26 03:32:27,124 C 10729 10729] logging.cc:1: a fatal record stays",
        "Traceback (most recent call last):",
        "  File \"run.py\", line 3, in main",
        "RuntimeError: a real failure of the driver",
        "[stage_b] FAILED  MLflow run abc  cause: RuntimeError: x  resume: python pipelines/run.py --from stage_b",
    ]
    kept = [line for line in lines if records.keep(line)]
    assert kept == [lines[0], lines[3], lines[5], lines[10], *lines[11:]]


def test_the_filter_process_passes_everything_else_in_order_and_a_partial_line_goes_out():
    proc = subprocess.Popen([sys.executable, "-S", progress.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(f"one\n{CORE_E}\n{WORKER_E}\ntwo\nprompt> ".encode())
    proc.stdin.flush()
    time.sleep(0.5)  # the partial line goes out without waiting for its newline
    assert os.read(proc.stdout.fileno(), 1000).decode().endswith("prompt> ")
    proc.stdin.write(b"three\n")
    proc.stdin.close()
    rest = proc.stdout.read().decode()
    assert proc.wait(timeout=10) == 0 and rest == "three\n"


def test_a_driver_whose_filter_runs_keeps_its_last_stderr_lines_and_drops_core_records(tmp_path):
    # fd 2 of a child process goes through the filter as init_ray puts it there; its exit message must come out.
    script = (
        "import os, sys\n"
        "from pipelines.platform import runtime\n"
        "runtime._filter_stderr()\n"
        "import atexit; atexit.register(runtime._close_stderr_filter)\n"
        f"os.write(2, {(CORE_E + chr(10)).encode()!r})\n"
        "print('from python', file=sys.stderr)\n"
        "raise SystemExit('error: the last line')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=progress.__file__.rsplit("/pipelines/", 1)[0],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["from python", "error: the last line"]


def test_run_with_progress_prints_totals_rate_eta_and_returns_or_raises():
    count = {"n": 0}

    def work():
        for _ in range(4):
            time.sleep(0.15)
            count["n"] += 25
        return "written"

    stream = io.StringIO()
    assert run_with_progress("encode", 100, work, lambda: count["n"], poll_s=0.05, stream=stream) == "written"
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["[encode] images 25/100", "[encode] images 50/100",
                                                       "[encode] images 75/100", "[encode] images 100/100"]
    assert all("images/s " in line and "ETA " in line for line in lines)

    def broken():
        raise RuntimeError("datasink failed")

    with pytest.raises(RuntimeError, match="datasink failed"):
        run_with_progress("encode", 100, broken, lambda: None, poll_s=0.01, stream=io.StringIO())
    assert not [t for t in threading.enumerate() if t.name == "encode-work"]

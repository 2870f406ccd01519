"""Where a pipeline run's time goes that is not training: CPU seconds by process kind, and each stage's wall time.

    .venv/bin/python benchmarks/bench_overhead.py [--config configs/quickstart.yaml] [--tiny] [--set KEY=VALUE ...]
        [--results FILE.jsonl] [--label NAME]

`--tiny`: the shortened DAG the test suite runs again and again (tests/helpers.py's overrides: 96 MNIST digits,
4 steps a stage, tiny networks), where nearly all the time is start-up; without it, `make run`'s whole quickstart.

Runs `pipelines/run.py` (make run's command, with the given overrides) in a subprocess against a fresh local Ray,
MLflow store and output folder under a temporary directory, and samples /proc twice a second for every process
descended from it: the driver, Ray's own servers (GCS, raylet, dashboard), and each Ray worker under the name Ray
gives it (`ray::RayTrainWorker`, `ray::SplitCoordinator`, a read task's operator name, ...). At the end it prints
the CPU seconds and the count of processes of each kind, the stages' own lines (`[stage] ran  N s`) and the
load average, and appends one JSON line to --results. A process that starts and ends between two samples is
missed; one that lives a second or more is counted.

Only this run's processes are counted, so other work on the machine shows as a higher load and longer walls, not
as CPU here. On a 2-core box every process start costs CPU that the training processes wait for: the table is
the list of what a stage pays before and after its steps. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HZ = os.sysconf("SC_CLK_TCK")
STAGE_LINE = re.compile(r"^\[(\w+)\] (ran|reused|resumed|skipped)\s+([\d.]+)s")


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, start time in ticks since boot, CPU seconds used) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), float(fields[19]), (int(fields[11]) + int(fields[12])) / HZ


def _name(pid: int) -> str:
    """Ray's process title for its workers (`ray::Kind.method` -> `ray::Kind`), else the program's name."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    if "default_worker.py" in " ".join(a.decode(errors="replace") for a in args):
        return "ray worker (before its first task)"
    words = [a.decode(errors="replace") for a in args if a]
    if "pipelines/run.py" in " ".join(words[:3]):
        return "driver (pipelines/run.py)"
    program = Path(first.split()[0]).name if first else ""
    if not program.startswith("python"):
        return program
    # Ray's helpers (dashboard, agents, log monitor) and the console filter: by their script, module or code.
    for flag, value in zip(words[1:], words[2:] + [""]):
        if flag.endswith(".py"):
            return f"python {Path(flag).name}"
        if flag == "-m" and value:
            return f"python -m {value}"
        if flag == "-c" and value:
            return "python -c (console filter)" if "ANSI" in value else f"python -c {value[:40]!r}"
    return program


class Sampler(threading.Thread):
    """Every `interval` s: the CPU used so far by each descendant of `root`, and the first informative name it had."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[tuple[int, float], list] = {}  # (pid, start) -> [name, cpu seconds]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def sample(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _stat(int(entry))) is not None:
                stats[int(entry)] = st
        children = collections.defaultdict(list)
        for pid, (ppid, _, _) in stats.items():
            children[ppid].append(pid)
        stack, tree = [self.root], []
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack.extend(children.get(pid, ()))
        for pid in tree:
            if pid not in stats:
                continue
            _, start, cpu = stats[pid]
            name = _name(pid)
            known = self.procs.setdefault((pid, start), [name, cpu])
            # Keep the first name that says what the process did: an idle pooled worker is later `ray::IDLE`.
            if name and (not known[0] or known[0].startswith("ray worker") or known[0] == "ray::IDLE") and name != known[0]:
                known[0] = name
            known[1] = max(known[1], cpu)

    def by_kind(self) -> list[tuple[str, int, float]]:
        kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        for name, cpu in self.procs.values():
            kinds[name or "(unnamed)"][0] += 1
            kinds[name or "(unnamed)"][1] += cpu
        return sorted(((k, n, round(c, 1)) for k, (n, c) in kinds.items()), key=lambda row: -row[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--tiny", action="store_true", help="the test suite's shortened DAG (tests/helpers.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", help="JSON lines file to append the result to")
    parser.add_argument("--label", default="", help="a name for this run in the results (e.g. the change measured)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its console.log)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ldm-overhead-"))
    tiny = []
    if args.tiny:
        sys.path.insert(0, str(REPO))
        from tests.helpers import tiny_later_stages, tiny_overrides

        tiny = [*tiny_overrides(tmp, str(tmp / "data" / "mnist")), *tiny_later_stages(), "data.source=mnist",
                "data.limit=96", "data.shard_size=32", "ray.num_cpus=2"]
    sets = [*tiny, f"run.output_uri={tmp / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *args.overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, str(REPO / "pipelines/run.py"), "--config", args.config, *[f"--set={s}" for s in sets]]
    load_before = os.getloadavg()
    started = time.monotonic()
    with open(tmp / "console.log", "wb") as console:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    wall = time.monotonic() - started
    lines = (tmp / "console.log").read_text(errors="replace").splitlines()
    stages = {m.group(1): {"status": m.group(2), "seconds": float(m.group(3))}
              for m in map(STAGE_LINE.match, lines) if m}
    kinds = sampler.by_kind()
    row = {
        "label": args.label, "config": args.config, "tiny": args.tiny, "overrides": args.overrides, "rc": rc, "wall_s": round(wall, 1),
        "stages": stages, "cpu_s_total": round(sum(c for _, _, c in kinds), 1), "processes": sum(n for _, n, _ in kinds),
        "cpu_by_kind": [{"kind": k, "processes": n, "cpu_s": c} for k, n, c in kinds],
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"rc {rc}  wall {wall:.0f} s  CPU {row['cpu_s_total']:.0f} s in {row['processes']} processes  "
          f"load {load_before[0]:.1f} -> {row['load_after'][0]:.1f}")
    for stage, r in stages.items():
        print(f"  [{stage}] {r['status']} {r['seconds']:.1f} s")
    print(f"  {'CPU s':>7}  {'procs':>5}  kind")
    for kind, n, cpu in kinds:
        print(f"  {cpu:7.1f}  {n:5d}  {kind}")
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
    if rc != 0:
        print("\n".join(lines[-30:]))
    if args.keep or rc != 0:
        print(f"console: {tmp / 'console.log'}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()

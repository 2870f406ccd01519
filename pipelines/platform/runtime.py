"""Starting or attaching to Ray, and the few lines every entry point shares."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray
from ray._private import ray_constants

from ldm_core.config import one_line
from pipelines.platform import progress
from pipelines.platform.progress import ANSI, is_terminal
from pipelines.config.sections import RaySection
from pipelines.platform.storage import outage_message

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------
# Console noise. By default the console shows this project's lines (progress, summaries, warnings, errors);
# Ray's own INFO chatter (Ray Train's per-report dumps, worker-group set-up, Ray Data's progress bars and
# operator stats) goes only to the Ray session logs (/tmp/ray/session_latest/logs: ray-data.log, train/), and so do
# the ERROR records Ray's C++ core workers copy to stderr (notices such as "actor has constructor arguments in the
# object store", logged for every actor Ray Train and Ray Data make: a filter on the driver's stderr drops them).
# `--verbose` (or LDM_VERBOSE=1, or LDM_LOG_LEVEL=DEBUG) brings all of it back. The settings are environment
# variables, so they reach `ray job submit` drivers and, through init_ray's runtime_env, every Ray worker.
# ---------------------------------------------------------------------------------------------------

VERBOSE_ENV = "LDM_VERBOSE"
RAY_DATA_LOGGING_YAML = Path(__file__).with_name("ray_data_logging.yaml")
"""Ray Data's logging config for quiet runs: everything to ray-data.log, only warnings to the console."""
_RAY_DATA_LOGGING = RAY_DATA_LOGGING_YAML.read_text()
"""Its text, read with this module: Ray Data opens the file named by RAY_DATA_LOGGING_CONFIG whenever a process
first imports it, and a path inside the job's unpacked working_dir can be missing at that moment (a node joining
a cluster whose nodes share a temp dir unpacks it again; seen failing an encode read task)."""
TRAIN_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
"""Where Ray Train logs "Reporting training result N: TrainingReport(metrics={...})" at INFO on every rank, under
a logger named by the module's file path (so Train's own log-level setting does not reach it)."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or os.environ.get("LDM_LOG_LEVEL", "").upper() == "DEBUG"


def set_verbose(on: bool) -> None:
    """Apply `--verbose` (called once the command line is parsed; setup_logging has already made things quiet)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        for name in _QUIET_ENV_SET:
            os.environ.pop(name, None)
        logging.getLogger("py.warnings").removeFilter(_drop_mlflow_advice)
        logging.captureWarnings(False)
        logging.getLogger().setLevel(logging.DEBUG if os.environ.get("LDM_LOG_LEVEL", "").upper() == "DEBUG" else logging.INFO)


def worker_setup() -> None:
    """Ray's `worker_process_setup_hook` (init_ray installs it): runs first in every Ray worker process of the job.

    It pins RAY_ADDRESS to this cluster, so Ray's own helpers in workers that look the cluster up (Ray Train's
    placement-group cleaner uses the state API) do not fail when other Ray instances run on the same machine.
    Unless verbose: Ray Data's console handler keeps only warnings, and Ray Train's per-report INFO line is
    dropped (the metrics are in MLflow). Like the driver, a worker leaves Ray's unpacked working dir first
    (leave_unpacked_working_dir): a node joining later may unpack it again under the worker's feet."""
    leave_unpacked_working_dir()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    if verbose():
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(_ray_data_logging_file()))
    spec = importlib.util.find_spec(TRAIN_REPORT_LOGGER_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")


_RAY_DATA_LOGGING_COPY = (Path(tempfile.gettempdir()) /
                          f"ldm-ray-data-logging-{hashlib.sha256(_RAY_DATA_LOGGING.encode()).hexdigest()[:16]}.yaml")


def _ray_data_logging_file() -> Path:
    """A copy of ray_data_logging.yaml outside Ray's working_dir, named by its content (written once per machine
    and version, atomically: concurrent workers write the same bytes)."""
    path = _RAY_DATA_LOGGING_COPY
    if not path.is_file():
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(_RAY_DATA_LOGGING)
        os.replace(part, path)
    return path


def _quiet_ray_data_in_this_process() -> None:
    """The driver's side of worker_setup for Ray Data (ray.data may already be imported and configured
    here): its console handler keeps warnings only, and no tqdm bars travel from Ray Data actors."""
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.use_ray_tqdm = False  # off a terminal, Ray Data then logs its progress (to ray-data.log) instead
    ctx.print_on_execution_start = False


def _drop_mlflow_advice(record: logging.LogRecord) -> bool:
    """A `py.warnings` log filter: False for a warning raised in MLflow's own code (its file is in the message)."""
    where = record.getMessage().split(": ", 1)[0]
    return f"{os.sep}mlflow{os.sep}" not in where
_QUIET_ENV_SET: list[str] = []


def local_ray_cpus(cfg: RaySection) -> float | None:
    """The CPUs of the local Ray that `init_ray` would start (None: it attaches to a running Ray or cluster), so
    a CPU budget can be checked before anything starts."""
    if ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS"):
        return None
    return float(cfg.num_cpus or os.cpu_count() or 1)


TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.5"
"""How often a local Ray's Train controller polls its worker group, in seconds (see init_ray)."""
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
"""Ray Train's watcher of node drains (spot reclaims): one more actor process per training stage. A local Ray is one
machine that nothing drains, so `init_ray` turns it off there (unless set); clusters keep it."""


def set_local_train_defaults() -> None:
    """Ray Train's settings for a local Ray, in this process's environment (its Ray processes inherit it), each
    unless already set: the controller polls at `LOCAL_TRAIN_POLL_S` (see init_ray) and runs no preemption watcher.
    `init_ray` calls it before starting a local Ray, and the tests before starting theirs."""
    os.environ.setdefault(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


IDLE_WORKER_KEEP_MS = 60_000
"""How long a local Ray keeps an idle worker process (Ray's default: 1 s once more processes run than CPUs)."""


def local_system_config(cpus: float) -> dict:
    """The `_system_config` of a local Ray with `cpus` CPUs (`init_ray`, and the tests' own local Ray).

    - More workers may start at once than the raylet's default (one per CPU) expects, and it warns at 4x that: two
      training stages' worker groups, Ray Data's actors and tasks started 8 on 2 CPUs in the quickstart.
    - Idle workers are kept `IDLE_WORKER_KEEP_MS`. Ray kills a task's worker 1 s after it goes idle whenever more
      processes run than CPUs, which a training stage always does (its controller, ranks, split coordinators...):
      every epoch's Ray Data read task then started a fresh Python (2-3 s of CPU importing Ray, pyarrow and the
      reader): 8 such starts in the quickstart's Stage B alone (2-core box, 2026-12-07). Kept, they are reused.
    """
    return {"worker_maximum_startup_concurrency": max(16, int(4 * cpus)),
            "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS}


PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
"""The checkout this code runs from (the folder holding `pipelines/` and `ldm_core/`)."""


def _workers_import_this_checkout() -> None:
    """Put this checkout first on the PYTHONPATH that a local Ray's processes inherit. A worker imports `pipelines`
    before the driver's paths reach it (the setup hook lives there), so without this it takes whatever the venv
    installed: with one venv shared by two checkouts (an editable install of the first), a driver run from the
    second ran its workers on the first one's code."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not paths or paths[0] != PROJECT_ROOT:
        os.environ["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT, *[p for p in paths if p != PROJECT_ROOT]])


def init_ray(cfg: RaySection) -> None:
    """Attach to the configured cluster (or RAY_ADDRESS, as set by `ray job submit`), else start a local Ray.

    A Ray that this process already started (tests, the DAG driver) is reused as is.
    """
    if ray.is_initialized():
        return
    quiet = not verbose()
    if quiet:
        atexit.register(_close_stderr_filter)  # before ray.init's own atexit (ray.shutdown): runs after it
    # Every worker of this job runs worker_setup first (merged into the job's runtime_env under `ray job submit`);
    # quiet, the "ray" logger shows warnings only.
    runtime_env = {"worker_process_setup_hook": worker_setup, **({} if quiet else {"env_vars": {VERBOSE_ENV: "1"}})}
    options = {"runtime_env": runtime_env, **({"logging_level": logging.WARNING} if quiet else {})}
    if quiet:  # a rank's progress lines reach the console as the driver's own, without "(RayTrainWorker pid=...)"
        ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = True
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, **options)
        leave_unpacked_working_dir()
    else:
        # "local" always starts a fresh Ray for this process, never a stale or foreign `ray start` cluster
        # (attach to one of those explicitly with ray.address=auto).
        log.info("starting a local Ray (num_cpus=%s)", cfg.num_cpus or "all")
        cpus = cfg.num_cpus or os.cpu_count() or 1
        # The Train controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and
        # learns only then that the train function has returned: a trivial TorchTrainer.fit took 5.0 s from the
        # last report to its return at 2 s, 0.8 s at 0.25 s (2-core box, 2026-12-07). A local Ray runs this one
        # driver's stages, so it polls at 0.5 s; a cluster keeps Ray's default (and whatever its operator sets).
        set_local_train_defaults()
        _workers_import_this_checkout()
        ray.init(address="local", num_cpus=cfg.num_cpus, _system_config=local_system_config(cpus), **options)
    if quiet:
        _quiet_ray_data_in_this_process()
        _filter_stderr()


_stderr_filter: tuple[subprocess.Popen, int] | None = None
"""The console filter process on this driver's stderr and a descriptor of the console it writes to."""
_FILTER_SOURCE = Path(progress.__file__).read_text()
"""The filter process's code, read when this module is imported and passed with `python -c`, not as a path: under
`ray job submit` on a cluster whose nodes share one temp dir, a node that joins later re-extracts the job's
working_dir over the running driver's, and the file was seen missing at the moment the filter started (the
driver's stderr then went nowhere)."""


def _filter_stderr() -> None:
    """Route this process's stderr (fd 2: Python's writes, the worker lines Ray forwards, and the C++ core worker's
    ERROR records) through `progress.filter_ray_core_records`, which drops Ray's core log records (they stay in
    Ray's log files). Installed after ray.init, so the Ray processes it started keep the real stderr. A process
    of its own, not a thread: whatever reached the pipe still gets out when the driver dies."""
    global _stderr_filter
    if _stderr_filter is not None:
        return
    sys.stderr.flush()
    console = os.dup(2)
    proc = subprocess.Popen([sys.executable, "-S", "-c", _FILTER_SOURCE], stdin=subprocess.PIPE, stdout=console)
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()  # fd 2 is the pipe's only write end in this process: restoring it ends the filter
    _stderr_filter = (proc, console)


def _close_stderr_filter() -> None:
    """At exit, after ray.shutdown: give fd 2 back to the console and let the filter write out what it still holds."""
    global _stderr_filter
    if _stderr_filter is None:
        return
    proc, console = _stderr_filter
    _stderr_filter = None
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(console, 2)
    os.close(console)
    try:
        proc.wait(timeout=5)  # longer only if a child process of the driver still holds the pipe
    except subprocess.TimeoutExpired:
        pass


def leave_unpacked_working_dir() -> None:
    """Under `ray job submit --runtime-env` the driver starts in Ray's unpacked copy of the job's working_dir,
    which Ray owns: a node that sets the same package up in a temp dir it shares with this one (several raylets
    on one machine, as in Ray's fake multi-node clusters) deletes and unpacks it again, and this process's
    working directory is gone (`Path.cwd()`, which MLflow's model logging calls, raises). The config's paths are
    absolute by now and the code is imported from the same path, so the process moves to the system temp dir."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # already unpacked again
        cwd = None
    if cwd is None or Path(cwd).parent.name == "working_dir_files":  # <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>
        log.debug("leaving Ray's unpacked working dir %s for %s", cwd, tempfile.gettempdir())
        os.chdir(tempfile.gettempdir())


def train_logging_config():
    """Ray Train's RunConfig(logging_config=...): its own INFO lines (worker-group start, checkpoints) stay in
    the Ray Train log files unless verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


class PlainText:
    """A text stream that drops terminal control sequences: what Ray (its "[repeated 2x across cluster]" notes,
    actor names in remote errors) and MLflow (its warnings) colour whatever the output reaches a file plain."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(ANSI.sub("", text))

    def writelines(self, lines) -> None:
        self.stream.writelines(ANSI.sub("", line) for line in lines)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def setup_logging() -> None:
    """This process's logging; quiet (see above) unless LDM_VERBOSE / LDM_LOG_LEVEL=DEBUG; `--verbose` later
    calls set_verbose. Off a terminal, nothing printed carries a control sequence, verbose or not."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not is_terminal(stream) and not isinstance(stream, PlainText):
            plain = PlainText(stream)
            setattr(sys, name, plain)
            _repoint_handlers(stream, plain)
    logging.basicConfig(
        level=os.environ.get("LDM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    if verbose():
        return
    quiet_env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if not is_terminal(sys.stdout):
        quiet_env["RAY_COLOR_PREFIX"] = "0"  # the "(RayTrainWorker pid=...)" prefixes Ray adds to worker lines
    for name, value in quiet_env.items():
        if name not in os.environ:
            os.environ[name] = value
            _QUIET_ENV_SET.append(name)
    # Python warnings go through logging, where MLflow's advice to library authors (type hints on predict, input
    # examples, ambiguous dataset sources; ANSI-coloured whatever the output) is dropped. A warnings filter
    # cannot do it: MLflow re-enables its warnings inside the calls that give them.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_drop_mlflow_advice)


def _repoint_handlers(old, new) -> None:
    """Log handlers made before setup_logging (Ray's, at `import ray`) hold the raw stream: give them `new`."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old:
                handler.setStream(new)


@contextmanager
def exit_on(*errors: type[BaseException]) -> Iterator[None]:
    """In an entry point's main(): turn the given (user-facing) errors, and object storage unreachable past its
    retries (`storage.outage_message`), into a one-line "error: ..." exit."""
    try:
        yield
    except errors as e:
        raise SystemExit("error: " + one_line(str(e))) from None
    except Exception as e:  # object storage down past its retries is the user's outage, not a bug: one line too
        message = outage_message(e)
        if message is None:
            raise
        raise SystemExit("error: " + message) from None

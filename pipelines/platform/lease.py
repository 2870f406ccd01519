"""Owner leases: at most one live execution per stage output, across processes and hosts.

A lease is a small JSON object stored next to what a stage writes (through `pipelines/platform/storage.py`, so local
disk and S3 alike): the owner (a random id, host, pid), what it is doing, and a heartbeat time that a
background thread of the owning driver refreshes every `run.lease.heartbeat_s`. A driver that wants the
same output

* finds no lease, a released one, or one it holds itself: takes it (a driver's claims nest);
* finds a live one: **waits** for the owner to finish (polling every `poll_s`, at most `wait_s`, by default as
  long as the owner's heartbeat goes on), then takes it, and its caller re-checks the outputs and reuses
  them. Past `wait_s`, `LeaseHeld` says in one line who owns it;
* finds a dead one (no heartbeat for `ttl_s` seconds, whatever host it ran on; on this host, as soon as the
  owner's process is gone): takes it over and resumes the work. `Lease.previous` is the record it inherited,
  notes included (`Lease.note`), so the new owner knows what the dead or failed execution left behind.

On S3, claiming is write-then-verify: write our record, wait `settle_s`, read it back; of two drivers that claim
at the same moment only the last writer goes on, the other waits. On a local path each read-then-write of the
record (a claim, a heartbeat, a note, the release) runs under an exclusive `flock` of the lease's folder, so two
claims cannot interleave and no settle wait is needed (a folder shared between hosts must then be on a file
system with working locks, as NFSv4 is; across hosts, S3 is the shared store this pipeline expects). A released
lease stays as a record (`released: true`) so its notes reach the next owner. A heartbeat that finds someone
else's record (this driver stalled past `ttl_s` and was taken over) marks the lease lost: `check()` raises
`LeaseLost`, and callers check before they publish anything.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.platform import storage
from pipelines.config.sections import LeaseSection
from pipelines.platform.storage import StorageConfig

log = logging.getLogger(__name__)

FORMAT = "ldm_pipeline.lease"


class LeaseHeld(RuntimeError):
    """Another live driver owns the output, and `wait_s` ran out."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it looked dead): it must not publish anything."""


_thread_owner = threading.local()


def owner_id() -> str:
    """This thread's owner id: host, pid and a random part (pids are reused, hosts share names). Per thread, so
    two drivers in one process (threads) contend like two processes, while one driver's nested claims nest."""
    if getattr(_thread_owner, "pid", None) != os.getpid():
        _thread_owner.pid = os.getpid()
        _thread_owner.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return _thread_owner.owner


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a zombie not yet reaped counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(record: dict, now: float | None = None) -> str:
    """`owner X (host h, pid p), heartbeat 3s ago, doing <what>`: how a lease's owner is named in messages."""
    age = (now or time.time()) - float(record.get("heartbeat_at", 0))
    return (f"owner {record.get('owner')} (host {record.get('host')}, pid {record.get('pid')}), "
            f"heartbeat {age:.0f}s ago, running {record.get('what')!r}")


class Lease:
    """One claim on `uri` (a JSON object). Use `acquire()` / `hold()` rather than building one directly."""

    def __init__(self, uri: str, what: str, settings: LeaseSection, storage_cfg: StorageConfig | None):
        self.loc = storage.resolve(uri, storage_cfg)
        self.what = what
        self.settings = settings
        self.owner = owner_id()
        self.notes: dict[str, Any] = {}
        self.previous: dict | None = None
        """The record this lease replaced (released, or dead and taken over); None when there was none."""
        self.waited = False
        """True when another live owner held it first: the caller should re-check that owner's outputs."""
        self.lost = False
        self.acquired_at = 0.0
        self._depth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- the record

    def _record(self, released: bool = False) -> dict:
        return {"format": FORMAT, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "what": self.what, "acquired_at": self.acquired_at, "heartbeat_at": time.time(),
                "released": released, "notes": self.notes}

    def read(self) -> dict | None:
        """The current record; None when there is none. An unreadable record counts as none (it cannot name a
        live owner; local writes are atomic and S3 PUTs whole, so only a foreign file looks like this)."""
        try:
            if not storage.exists(self.loc):
                return None
            record = storage.read_json(self.loc)
        except (ValueError, FileNotFoundError):
            return None
        return record if isinstance(record, dict) and record.get("format") == FORMAT else None

    def _write(self, released: bool = False) -> None:
        storage.write_json(self.loc, self._record(released))

    def _exclusive(self):
        """Around a read-then-write of the record: on a local path, an exclusive `flock` of the lease's folder
        (every process and thread opens its own descriptor, so they exclude each other); on S3, nothing (claims
        settle instead)."""
        return _folder_lock(Path(self.loc.path).parent) if self.loc.scheme == "file" else nullcontext()

    def _live_other(self, record: dict | None) -> bool:
        if record is None or record.get("released") or record.get("owner") == self.owner:
            return False
        pid = record.get("pid")
        if record.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not process_alive(pid):
            return False  # its driver ran here and is gone (SIGKILL, OOM, a closed terminal): no need to wait ttl_s
        return time.time() - float(record.get("heartbeat_at", 0)) <= self.settings.ttl_s

    # --- taking and giving back

    def acquire(self) -> "Lease":
        s = self.settings
        started = time.monotonic()
        announced = False
        while True:
            with self._exclusive() as atomic:
                record = self.read()
                free = not self._live_other(record)
                if free:
                    self.previous = record  # released, dead, or an earlier claim of this same thread
                    self.acquired_at = time.time()
                    if self.previous is not None and not self.previous.get("released"):
                        log.warning("lease %s: taking over from a dead %s", self.loc.uri, describe(self.previous))
                    self._write()
            if free:
                if atomic:  # nobody could read or write between our read and our write
                    break
                time.sleep(s.settle_s)
                mine = self.read()
                if mine is not None and mine.get("owner") == self.owner:
                    break
                record = mine  # another driver claimed it at the same moment and won: wait for it
            self.waited = True
            waited = time.monotonic() - started
            if s.wait_s is not None and waited >= s.wait_s:
                raise LeaseHeld(f"{self.loc.uri} is held by {describe(record)}; it is still alive "
                                f"(waited {waited:.0f}s of run.lease.wait_s={s.wait_s:g}): wait for it to finish, "
                                f"or stop it, then run again")
            if not announced:
                log.info("lease %s: waiting for the live %s", self.loc.uri, describe(record))
                print(f"waiting for {describe(record)} to finish ({self.loc.uri})", flush=True)
                announced = True
            time.sleep(s.poll_s if s.wait_s is None else min(s.poll_s, max(s.wait_s - waited, 0.01)))
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.loc.uri}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                with self._lock, self._exclusive():
                    record = self.read()
                    if record is None or record.get("owner") != self.owner:
                        self.lost = True
                        log.error("lease %s was taken over by %s: this driver looked dead and must not publish",
                                  self.loc.uri, describe(record) if record else "nobody (it was deleted)")
                        return
                    self._write()
            except OSError as e:  # storage unreachable for a moment: the next beat tries again
                log.warning("lease %s: heartbeat failed (%s)", self.loc.uri, e)

    def note(self, **notes: Any) -> None:
        """Record facts for whoever holds the lease next (e.g. the folder this execution writes), now."""
        with self._lock, self._exclusive():
            self.notes.update(notes)
            if not self.lost:
                self._write()

    def check(self) -> None:
        """Raise LeaseLost unless this driver still owns the lease (call it right before publishing)."""
        record = self.read()
        if self.lost or record is None or record.get("owner") != self.owner:
            self.lost = True
            raise LeaseLost(f"{self.loc.uri}: this driver's lease was taken over "
                            f"({describe(record) if record else 'its record is gone'}); nothing was published")

    def release(self) -> None:
        """Mark the record released (its notes kept for the next owner). When storage cannot be reached the record
        stays as it is and expires after ttl_s: a failed release must not hide the error that ended the work."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            try:
                with self._exclusive():
                    record = self.read()
                    if not self.lost and record is not None and record.get("owner") == self.owner:
                        self._write(released=True)
            except OSError as e:
                log.warning("lease %s: could not be released (%s); it expires in %gs", self.loc.uri, e, self.settings.ttl_s)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """An exclusive `flock` of `folder` (created if missing) while the block runs; yields True."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_held: dict[tuple[str, str], Lease] = {}
_held_lock = threading.Lock()


def acquire(uri: str, *, what: str, settings: LeaseSection | None = None,
            storage_cfg: StorageConfig | None = None) -> Lease:
    """Take the lease at `uri` (waiting for a live owner, taking over a dead one). Re-entrant for its owner."""
    key = (owner_id(), storage.resolve(uri, storage_cfg).uri)
    with _held_lock:
        lease = _held.get(key)
        if lease is not None:
            lease._depth += 1
            return lease
    lease = Lease(uri, what, settings or LeaseSection(), storage_cfg).acquire()
    lease._depth = 1
    with _held_lock:
        _held[key] = lease
    return lease


def release(lease: Lease) -> None:
    with _held_lock:
        lease._depth -= 1
        if lease._depth > 0:
            return
        _held.pop((lease.owner, lease.loc.uri), None)
    lease.release()


def check_held() -> None:
    """`Lease.check()` every lease this driver (thread) holds: raises LeaseLost if any was taken over. Called
    right before a result is published, by code that does not see the lease objects (fit_and_publish)."""
    me = owner_id()
    with _held_lock:
        mine = [held for (owner, _), held in _held.items() if owner == me]
    for held in mine:
        held.check()


@contextmanager
def hold(uri: str, *, what: str, settings: LeaseSection | None = None,
         storage_cfg: StorageConfig | None = None) -> Iterator[Lease]:
    """`with hold(uri, what=...) as lease:` the block runs as the lease's only live owner."""
    lease = acquire(uri, what=what, settings=settings, storage_cfg=storage_cfg)
    try:
        yield lease
    finally:
        release(lease)


def output_lease_uri(folder_uri: str) -> str:
    """The lease of an output folder written outside a training stage (a dataset, a sample folder): the sibling
    object `<folder>.lease.json`, never inside the folder, whose listing is the output."""
    return folder_uri.rstrip("/") + ".lease.json"


def training_lease_uri(cfg, stage: str) -> str:
    """Where a training stage's lease lives: next to its Ray Train folder `<checkpoint_root>/<run.name>-<stage>`."""
    return f"{cfg.run.checkpoint_root.rstrip('/')}/{cfg.run.name}-{stage}.lease.json"


def stage_lease(stage: str) -> Callable:
    """Decorator for a training stage's driver `run_<stage>(cfg, ...)`: it runs holding the lease of its
    checkpoint folder, so two drivers never train into (and prune) the same folder at once."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            with hold(training_lease_uri(cfg, stage), what=f"{stage} {cfg.run.name}", settings=cfg.run.lease,
                      storage_cfg=cfg.storage):
                return fn(cfg, *args, **kwargs)

        return run

    return wrap


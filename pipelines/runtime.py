"""Starting or attaching to Ray, and the few lines every entry point shares."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray

from pipelines.settings import RaySection

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def init_ray(cfg: RaySection) -> None:
    """Attach to the configured cluster (or RAY_ADDRESS, as set by `ray job submit`), else start a local Ray.

    A Ray that this process already started (tests, the DAG driver) is reused as is.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address)
    else:
        # "local" always starts a fresh Ray for this process, never a stale or foreign `ray start` cluster
        # (attach to one of those explicitly with ray.address=auto).
        log.info("starting a local Ray (num_cpus=%s)", cfg.num_cpus or "all")
        ray.init(address="local", num_cpus=cfg.num_cpus)


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LDM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


@contextmanager
def exit_on(*errors: type[BaseException]) -> Iterator[None]:
    """In an entry point's main(): turn the given (user-facing) errors into a one-line "error: ..." exit."""
    try:
        yield
    except errors as e:
        raise SystemExit("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip())) from None

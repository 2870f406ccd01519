"""Rank 0's MLflow logging from inside a training loop: buffered, so an MLflow outage never stalls training.

`RunLogger.log_metrics / set_tag / log_image` only append to a bounded in-memory queue and return; one daemon
thread sends the queue to the tracking server in order. When a call fails (server down, network), the thread
keeps the item, waits (exponential back-off, capped) and tries again; training goes on meanwhile. Memory is
bounded: past `max_pending` metric batches the oldest are dropped (and counted), and only the newest
`max_pending_images` images are kept. `flush(timeout_s)` waits for the queue to drain, for the end of a run.

Each HTTP call is bounded too: unless the user set them, the worker's MLflow client gets
MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT small enough that one call fails within
seconds instead of retrying for minutes (the queue does the retrying).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Mapping

import numpy as np
from mlflow.tracking import MlflowClient

from pipelines.platform import tracking

log = logging.getLogger(__name__)

CALL_MAX_RETRIES = "1"
CALL_TIMEOUT_S = "10"


class RunLogger:
    """Queue of MLflow calls for one run, sent in order by a background thread."""

    def __init__(self, tracking_uri: str, run_id: str, *, max_pending: int = 10_000, max_pending_images: int = 8,
                 max_backoff_s: float = 30.0):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", CALL_MAX_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", CALL_TIMEOUT_S)
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.max_pending = max_pending
        self.max_pending_images = max_pending_images
        self.max_backoff_s = max_backoff_s
        self.dropped = 0
        self.failures = 0
        self.tags: dict[str, str] = {}
        """Every tag set so far (a finished checkpoint keeps them, for a run that adopts it)."""
        self._queue: deque[tuple[str, tuple]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread = threading.Thread(target=self._drain, name="mlflow-run-logger", daemon=True)
        self._thread.start()

    # --- called from the training loop: never blocks on the network
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Stamped now, however late they reach the server."""
        self._put("metrics", (dict(metrics), step, int(time.time() * 1000)))

    def set_tag(self, key: str, value: str) -> None:
        self.tags[key] = value
        self._put("tag", (key, value))

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self._put("image", (image, artifact_file))

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + int(self._busy)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued so far was sent; False when `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    # --- internals
    def _put(self, kind: str, payload: tuple) -> None:
        with self._cond:
            self._queue.append((kind, payload))
            if kind == "image":
                images = [item for item in self._queue if item[0] == "image"]
                for old in images[: max(0, len(images) - self.max_pending_images)]:
                    self._queue.remove(old)
                    self.dropped += 1
            while len(self._queue) > self.max_pending:
                oldest = next((item for item in self._queue if item[0] == "metrics"), self._queue[0])
                self._queue.remove(oldest)
                self.dropped += 1
            self._cond.notify_all()

    def _send(self, kind: str, payload: tuple) -> None:
        if kind == "metrics":
            metrics, step, timestamp_ms = payload
            tracking.log_metrics(self.client, self.run_id, metrics, step, timestamp_ms)
        elif kind == "tag":
            self.client.set_tag(self.run_id, *payload)
        else:
            image, artifact_file = payload
            tracking.log_image(self.client, self.run_id, image, artifact_file)

    def _drain(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                kind, payload = self._queue[0]
                self._busy = True
            try:
                self._send(kind, payload)
            except Exception as e:  # noqa: BLE001 - any failure to reach MLflow: keep the item, retry later
                self.failures += 1
                if self.failures == 1 or self.failures % 10 == 0:
                    log.warning("MLflow unreachable (%s: %s); %d calls buffered, training continues",
                                type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", self.pending())
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 0.5
            with self._cond:
                if self._queue and self._queue[0][1] is payload:
                    self._queue.popleft()
                self._busy = False
                self._cond.notify_all()

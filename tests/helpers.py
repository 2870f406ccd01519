"""Small builders shared by the pipeline tests: tiny configs and tiny real datasets."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mnist_dataset(tmp_path: Path, limit: int = 96, resolution: int | None = None, fmt: str = "webdataset") -> str:
    """A real (tiny) shard set of bundled MNIST digits in tmp_path. Returns its URI."""
    from pipelines.data import prepare_dataset

    uri = str(tmp_path / f"mnist-{fmt}-{limit}")
    prepare_dataset("mnist", uri, fmt=fmt, shard_size=32, resolution=resolution, limit=limit, seed=0)
    return uri


def tiny_overrides(tmp_path: Path, data_uri: str) -> list[str]:
    """--set overrides that shrink the quickstart to seconds: 32 px, 8-channel models, 4 steps."""
    return [
        f"run.output_uri={tmp_path / 'out'}",
        f"data.uri={data_uri}",
        "data.resolution=32",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        "data.holdout_fraction=0.2",
        "stage_a.model.base_channels=8",
        "stage_a.model.channel_mult=[1, 2, 2]",
        "stage_a.model.norm_groups=4",
        "stage_a.model.num_res_blocks=1",
        "stage_a.discriminator.base_channels=8",
        "stage_a.discriminator.norm_groups=4",
        "stage_a.discriminator.num_layers=2",
        "stage_a.lpips.net=squeeze",
        "stage_a.train.max_steps=4",
        "stage_a.train.log_every=1",
        "stage_a.train.image_every=2",
        "stage_a.train.checkpoint_every=2",
        "stage_a.eval.scale_batches=2",
        "stage_a.eval.max_batches=2",
        "stage_a.train.max_failures=0",
    ]


def tiny_later_stages() -> list[str]:
    """--set overrides that shrink encode, Stage B and sampling to seconds: a 2-level 8-channel U-Net, 4 steps,
    12-token prompts, two prompts, no digit classifier."""
    return [
        "encode.batch_size=16",
        "encode.rows_per_shard=16",
        "encode.scaling.cpus_per_actor=0.5",
        "encode.text_encoder.max_length=12",
        "stage_b.unet.model_channels=8",
        "stage_b.unet.channel_mult=[1, 2]",
        "stage_b.unet.num_res_blocks=1",
        "stage_b.unet.attention_levels=[1]",
        "stage_b.unet.num_heads=2",
        "stage_b.unet.norm_groups=4",
        "stage_b.unet.context_dim=384",
        "stage_b.unet.in_channels=4",
        "stage_b.unet.out_channels=4",
        "stage_b.diffusion.num_timesteps=100",
        "stage_b.batch_size=4",
        "stage_b.shuffle_buffer=8",
        "stage_b.train.max_steps=4",
        "stage_b.train.log_every=1",
        "stage_b.train.image_every=2",
        "stage_b.train.checkpoint_every=2",
        "stage_b.train.max_failures=0",
        "stage_b.sample_steps=3",
        "stage_b.sample_columns=2",
        "stage_b.eval_batches=1",
        "stage_b.scaling.num_workers=1",
        "sample.prompts=[a handwritten digit three, '']",
        "sample.num_per_prompt=2",
        "sample.steps=3",
        "sample.evaluate_digits=false",
    ]


def start_mlflow_server(port: int, root: Path, timeout: float = 120.0):
    """A real `mlflow server` on 127.0.0.1:port over a SQLite store and an artifact folder under `root` (the same
    `root` and port again bring the same server back after it was stopped). Returns the process."""
    import subprocess
    import sys

    from tests.conftest import wait_for_port

    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=timeout, proc=proc)
    except Exception:
        stop_process_group(proc)
        raise
    return proc


def stop_process_group(proc) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started (an outage, not a shutdown)."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def start_moto_server(log_path: Path):
    """A real S3 API server (the venv's moto_server, pinned by pyproject) on 127.0.0.1:<free port>, logging each
    request it serves to `log_path` (read by `S3RequestLog`). Returns (process, endpoint URL)."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import free_port, wait_for_port

    venv_exe = Path(sys.executable).parent / "moto_server"
    exe = str(venv_exe) if venv_exe.exists() else shutil.which("moto_server")
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the server holds its own handle
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        proc.terminate()
        proc.wait(timeout=10)
        raise
    return proc, f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class S3Request:
    method: str
    path: str
    """/bucket/key, without the query."""
    query: str
    status: int


_REQUEST_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/[^ ?"]*)\??([^ "]*) HTTP/[0-9.]+(?:\x1b\[[0-9;]*m)*" (\d{3})')


class S3RequestLog:
    """The requests a moto_server served, read from its access log (werkzeug writes one line per request as it
    answers it): `mark()`, do something, then `since()` lists what that something asked of S3."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since(self, until: int | None = None) -> list[S3Request]:
        """The requests served since `mark()`; with `until`, only those logged before that byte offset of the log
        (its size at some moment, e.g. a benchmark's first batch)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read(-1 if until is None else max(0, until - self.offset)).decode(errors="replace")
        return [S3Request(m[1], m[2], m[3], int(m[4])) for m in _REQUEST_LINE.finditer(text)]


def synthetic_shards(uri: str, num_shards: int, *, samples_per_shard: int = 2, fmt: str = "webdataset",
                     img2dataset_stats: bool = True, img2dataset_parquet: bool = True) -> int:
    """`num_shards` shards of tiny 8-px PNGs at `uri`, laid out as img2dataset writes them (`NNNNN.tar` with
    KEY.jpg/.txt/.json members, and with `img2dataset_stats` its `NNNNN_stats.json`, and with `img2dataset_parquet`
    too its `NNNNN.parquet` metadata, beside it), or as Parquet shards (key, image, caption); no manifest. Written as img2dataset writes them too:
    through fsspec (s3fs), one PUT per object, many at once. Returns the number of samples."""
    import io
    import json
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines.platform import storage

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="PNG")
    image = buf.getvalue()
    root = storage.resolve(uri)
    storage.makedirs(root)

    def parquet(table: pa.Table) -> bytes:
        out = io.BytesIO()
        pq.write_table(table, out)
        return out.getvalue()

    def shard_objects(shard: int) -> dict[str, bytes]:
        keys = [f"{shard:05d}{i:04d}" for i in range(samples_per_shard)]
        captions = [f"a grey square {k}" for k in keys]
        if fmt == "parquet":
            return {f"{shard:05d}.parquet": parquet(pa.table(
                {"key": keys, "image": pa.array([image] * len(keys), pa.binary()), "caption": captions}))}
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            for key, caption in zip(keys, captions):
                for ext, payload in (("jpg", image), ("txt", caption.encode()), ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        objects = {f"{shard:05d}.tar": tar_buf.getvalue()}
        if img2dataset_stats:
            stats = {"count": len(keys), "successes": len(keys), "failed_to_download": 0, "failed_to_resize": 0}
            objects[f"{shard:05d}_stats.json"] = json.dumps(stats).encode()
        if img2dataset_stats and img2dataset_parquet:
            objects[f"{shard:05d}.parquet"] = parquet(pa.table({"key": keys, "caption": captions,
                                                                "status": ["success"] * len(keys)}))
        return objects

    fs = storage.fsspec_filesystem(uri)
    for start in range(0, num_shards, 500):  # bounded memory at any count
        batch = {f"{root.path}/{name}": data for shard in range(start, min(num_shards, start + 500))
                 for name, data in shard_objects(shard).items()}
        if root.scheme == "s3":
            fs.pipe(batch)
        else:
            for path, data in batch.items():
                storage.write_bytes(storage.resolve(path), data)
    return num_shards * samples_per_shard


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended by
    NUL, commands on its fd 3, answers on its fd 4), so a test can wait in real time for what a page draws."""

    def __init__(self, profile: Path):
        exe = shutil.which("chromium")
        assert exe, "this test needs Debian's chromium package (.ci/run installs it)"
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium's ends, moved above 99 so that neither is 3 or 4, then put at 3 and 4 by bash's redirections (no
        # preexec_fn: forking a threaded test process into Python code is not safe).
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        r, w = theirs
        # A tall window: the UI draws a chart only once it scrolls into view (an IntersectionObserver), and headless
        # Chromium's default 800x600 leaves most of a metrics page below the fold.
        self._proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', "bash", exe, "--headless", "--no-sandbox",
             "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--window-size=1600,4000", f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=theirs,
            start_new_session=True)
        for fd in theirs:
            os.close(fd)
        self._buffer, self._next_id = b"", 0

    def _call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self._from_chrome], [], [], left)[0], \
                f"Chromium did not answer {method} within {timeout} s"
            chunk = os.read(self._from_chrome, 1 << 16)
            assert chunk, "Chromium closed its DevTools pipe"
            self._buffer += chunk

    def dom(self, url: str, wait_for: str, timeout: float = 120) -> str:
        """The page at `url` in a fresh tab, once its DOM contains `wait_for` (or when `timeout` seconds have passed:
        the caller's assert decides)."""
        target = self._call("Target.createTarget", url=url)["targetId"]
        session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        deadline, html = time.monotonic() + timeout, ""
        try:
            while time.monotonic() < deadline:
                html = self._call("Runtime.evaluate", session, expression="document.documentElement.outerHTML",
                                  returnByValue=True)["result"].get("value", "")
                if wait_for in html:
                    break
                time.sleep(0.5)
        finally:
            self._call("Target.closeTarget", targetId=target)
        return html

    def close(self):
        try:
            self._call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, 9)
            self._proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)

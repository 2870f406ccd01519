"""Object storage: one place that turns a URI into a filesystem.

Every stage reads and writes through here, so local paths, ``file://`` and ``s3://`` behave the same.
Credentials come from the standard AWS sources (environment variables, ``~/.aws``, instance roles); they
are never part of a config. The S3 endpoint can be overridden for S3-compatible stores (MinIO, Ceph, a
local moto server) with ``storage.s3_endpoint_url`` in the config or the standard ``AWS_ENDPOINT_URL``
variable.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines.config.sections import SCHEMES, StorageConfig, check_uri  # noqa: F401  (the URI rules live with the config)

log = logging.getLogger(__name__)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with `max_attempts` per request (AWS standard retries), also after pickling: pyarrow's
    own pickling drops the retry strategy (measured: an unpickled copy, as in a Ray worker or the Ray Train controller
    that writes checkpoint state, gives up after 3 attempts, about 2 s), so it is rebuilt from these arguments."""

    def __init__(self, max_attempts: int, **kwargs: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts
        self.kwargs = kwargs

    def __reduce__(self):
        return RetryingS3FileSystem._rebuild, (self.max_attempts, self.kwargs)

    @staticmethod
    def _rebuild(max_attempts: int, kwargs: dict) -> "RetryingS3FileSystem":
        return RetryingS3FileSystem(max_attempts, **kwargs)


@dataclass(frozen=True)
class Location:
    """A resolved URI: the scheme, the pyarrow filesystem and the path inside it."""

    uri: str
    scheme: str  # "file" or "s3"
    path: str  # bucket/key for s3, absolute path for local files
    filesystem: pafs.FileSystem

    def join(self, *parts: str) -> "Location":
        sep = "/"
        path = sep.join([self.path.rstrip(sep), *[p.strip(sep) for p in parts]])
        uri = f"s3://{path}" if self.scheme == "s3" else path
        return Location(uri=uri, scheme=self.scheme, path=path, filesystem=self.filesystem)


def _endpoint(cfg: StorageConfig | None) -> str | None:
    if cfg is not None and cfg.s3_endpoint_url:
        return cfg.s3_endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region(cfg: StorageConfig | None) -> str:
    if cfg is not None and cfg.s3_region:
        return cfg.s3_region
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


_probed: set[str] = set()


def _say_if_unreachable(endpoint: str, attempts: int) -> None:
    """Once per endpoint and process: when it does not accept a connection (2 s), say that every request will be
    retried and for about how long, rather than staying silent through the retries."""
    if endpoint in _probed:
        return
    _probed.add(endpoint)
    parsed = urlparse(endpoint)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout=2).close()
    except OSError as e:
        # AWS standard retries: exponential backoff with jitter, at most 20 s apart (measured: 10 attempts, 81 s).
        longest = sum(min(20.0, 0.4 * 2 ** i) for i in range(1, attempts))
        log.warning("S3 endpoint %s is unreachable (%s): retrying each request up to storage.s3_max_attempts=%d times, "
                    "for up to about %.0f s, before giving up", endpoint, e.strerror or type(e).__name__, attempts, longest)


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def resolve(uri: str | os.PathLike, cfg: StorageConfig | None = None) -> Location:
    """Resolve a local path, ``file://`` URI or ``s3://bucket/prefix`` to a pyarrow filesystem + path."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        endpoint = _endpoint(cfg)
        attempts = cfg.s3_max_attempts if cfg is not None else StorageConfig().s3_max_attempts
        kwargs: dict[str, Any] = {"region": _region(cfg)}
        if endpoint:
            _say_if_unreachable(endpoint, attempts)
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = urlparse(endpoint).scheme or "https"
        fs = RetryingS3FileSystem(attempts, **kwargs)
        path = (parsed.netloc + parsed.path).rstrip("/")
        return Location(uri=f"s3://{path}", scheme="s3", path=path, filesystem=fs)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else uri
        path = str(Path(local).expanduser().resolve())
        return Location(uri=path, scheme="file", path=path, filesystem=pafs.LocalFileSystem())
    raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")


def check_writable(loc: Location) -> None:
    """Fail before any work when `loc` cannot be written: an S3 bucket that does not exist (or cannot be reached),
    a local path under a file or a read-only folder. Writes nothing."""
    if loc.scheme == "s3":
        bucket = loc.path.split("/", 1)[0]
        try:
            missing = loc.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            raise OSError(f"{loc.uri}: cannot reach bucket {bucket!r} ({e})") from None
        if missing:
            raise FileNotFoundError(f"{loc.uri}: bucket {bucket!r} does not exist")
        return
    path = Path(loc.path)
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise PermissionError(f"{loc.uri}: cannot write under {path} (not a writable folder)")


def fsspec_filesystem(uri: str, cfg: StorageConfig | None = None):
    """An fsspec filesystem for ``uri`` (s3fs for s3://), for libraries that want fsspec rather than pyarrow."""
    if is_remote(uri):
        import s3fs

        endpoint = _endpoint(cfg)
        client_kwargs = {"region_name": _region(cfg)}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        attempts = cfg.s3_max_attempts if cfg is not None else StorageConfig().s3_max_attempts
        return s3fs.S3FileSystem(client_kwargs=client_kwargs,
                                 config_kwargs={"retries": {"max_attempts": attempts, "mode": "standard"}})
    import fsspec

    return fsspec.filesystem("file")


def exists(loc: Location) -> bool:
    return loc.filesystem.get_file_info(loc.path).type != pafs.FileType.NotFound


def makedirs(loc: Location) -> None:
    if loc.scheme == "file":
        loc.filesystem.create_dir(loc.path, recursive=True)
    # S3 has no directories: a prefix exists as soon as an object is written under it.


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object. On local disk the write is atomic (temp file + rename)."""
    if loc.scheme == "file":
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{loc.path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique: concurrent writers never share one
        tmp.write_bytes(data)
        os.replace(tmp, loc.path)
        return
    with loc.filesystem.open_output_stream(loc.path) as f:
        f.write(data)


def read_bytes(loc: Location) -> bytes:
    with loc.filesystem.open_input_stream(loc.path) as f:
        return f.read()


def write_json(loc: Location, obj: Any) -> None:
    write_bytes(loc, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(loc: Location, attempts: int = 5) -> Any:
    """A JSON object. On S3 an object overwritten while it is read (a lease's heartbeat record) can come back torn:
    pyarrow sizes the read with a HEAD, then GETs that many bytes of whatever object is there by then. A torn JSON
    object never parses, so it is read again; one that still does not parse is what the store holds (ValueError).
    Local writes are atomic renames: nothing to read again."""
    for attempt in range(attempts):
        data = read_bytes(loc)
        try:
            return json.loads(data)
        except ValueError:
            if loc.scheme == "file" or attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Paths (inside the filesystem) of the files under ``loc`` ending in ``suffix``, sorted."""
    infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


@dataclass(frozen=True)
class ObjectInfo:
    """A file found by `list_objects`: its path inside the filesystem, its size, and on S3 its ETag (the store's
    own content tag: the MD5 of the bytes for an object written in one PUT, `<md5 of the parts' MD5s>-<parts>` for
    a multipart upload)."""

    path: str
    size: int
    etag: str | None = None



class RangedReader(io.RawIOBase):
    """A read-only, seekable file over an object of known size (from a listing), read with ranged GETs of at least
    `block` bytes and no HEAD first: pyarrow's S3 files (and s3fs's) make a HEAD per file opened, and a Parquet
    footer or a stats file is then one request, not two. `fs`: the s3fs filesystem to read with (one shared by many
    readers saves making one each). `fetched` counts the bytes read from storage."""

    def __init__(self, loc: Location, size: int, cfg: StorageConfig | None = None, block: int = 8 * 2**20, fs=None):
        self.loc, self.size, self.block = loc, size, block
        self.fs = (fs or fsspec_filesystem(loc.uri, cfg)) if loc.scheme == "s3" else None
        self.pos, self.start, self.buffer, self.fetched = 0, 0, b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def _fetch(self, start: int, end: int) -> bytes:
        if self.fs is not None:
            data = self.fs.cat_file(self.loc.path, start=start, end=end)
        else:
            with open(self.loc.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        self.fetched += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos >= end:
            return b""
        if not (self.start <= self.pos and end <= self.start + len(self.buffer)):
            self.start = self.pos
            self.buffer = self._fetch(self.pos, max(end, min(self.size, self.pos + self.block)))
        data = self.buffer[self.pos - self.start:end - self.start]
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def list_objects(loc: Location, cfg: StorageConfig | None = None) -> list[ObjectInfo]:
    """Every file under ``loc`` (recursively) with its size and, on S3, its ETag, sorted by path: one listing
    request per 1,000 objects on S3 (pyarrow's listing does not return ETags, so s3fs lists there)."""
    if loc.scheme == "s3":
        fs = fsspec_filesystem(loc.uri, cfg)
        fs.invalidate_cache(loc.path)  # fsspec shares instances and their listings: always list afresh
        found = fs.find(loc.path, detail=True)
        return sorted((ObjectInfo(path, int(info["size"]), str(info.get("ETag", "")).strip('"') or None)
                       for path, info in found.items() if info.get("type") != "directory"), key=lambda o: o.path)
    infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    return sorted((ObjectInfo(i.path, i.size) for i in infos if i.type == pafs.FileType.File), key=lambda o: o.path)


def missing_files(root: Location, relative: list[str]) -> list[str]:
    """Those of `relative` (paths under `root`) that do not exist: one listing, not one request per file."""
    present = set(list_files(root))
    return [rel for rel in relative if root.join(rel).path not in present]


_UNREACHABLE = re.compile(r"AWS Error NETWORK_CONNECTION[^\n]*|Could not connect to the endpoint URL[^\n]*")


def outage_message(exc: BaseException) -> str | None:
    """When `exc` (or what it wraps: causes, Ray task and Ray Train worker failures) is object storage that stayed
    unreachable past its retries, one line saying so; None for any other error."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = _UNREACHABLE.search(str(e))
        if found:
            return (f"object storage unreachable, still failing after storage.s3_max_attempts retries: "
                    f"{found.group(0).strip()[:300]}; the last completed checkpoint is kept: re-run to resume")
        failures = getattr(e, "worker_failures", None) or {}
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                  *failures.values()]
    return None


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.filesystem.delete_dir(loc.path)

"""Object storage: one place that turns a URI into a filesystem.

Every stage reads and writes through here, so local paths, ``file://`` and ``s3://`` behave the same.
Credentials come from the standard AWS sources (environment variables, ``~/.aws``, instance roles); they
are never part of a config. The S3 endpoint can be overridden for S3-compatible stores (MinIO, Ceph, a
local moto server) with ``storage.s3_endpoint_url`` in the config or the standard ``AWS_ENDPOINT_URL``
variable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ldm_core.config import StrictConfig


class StorageConfig(StrictConfig):
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, Ceph, moto). None: AWS_ENDPOINT_URL or AWS itself."""
    s3_region: str | None = None
    """Region for S3. None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1."""


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


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def resolve(uri: str | os.PathLike, cfg: StorageConfig | None = None) -> Location:
    """Resolve a local path, ``file://`` URI or ``s3://bucket/prefix`` to a pyarrow filesystem + path."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        endpoint = _endpoint(cfg)
        kwargs: dict[str, Any] = {"region": _region(cfg)}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = urlparse(endpoint).scheme or "https"
        fs = pafs.S3FileSystem(**kwargs)
        path = (parsed.netloc + parsed.path).rstrip("/")
        return Location(uri=f"s3://{path}", scheme="s3", path=path, filesystem=fs)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else uri
        path = str(Path(local).expanduser().resolve())
        return Location(uri=path, scheme="file", path=path, filesystem=pafs.LocalFileSystem())
    raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")


def fsspec_filesystem(uri: str, cfg: StorageConfig | None = None):
    """An fsspec filesystem for ``uri`` (s3fs for s3://), for libraries that want fsspec rather than pyarrow."""
    if is_remote(uri):
        import s3fs

        endpoint = _endpoint(cfg)
        client_kwargs = {"region_name": _region(cfg)}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        return s3fs.S3FileSystem(client_kwargs=client_kwargs)
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
        tmp = Path(loc.path + ".tmp")
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


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Paths (inside the filesystem) of the files under ``loc`` ending in ``suffix``, sorted."""
    infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.filesystem.delete_dir(loc.path)

"""Object store for artifacts and materialised inputs: a local directory or an S3 bucket.

Keys are "/"-separated relative paths. Writers upload under a temporary key and publish
by copy/rename when complete, so a partial object is never visible under its final key.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from core.settings import Settings

CHUNK = 1024 * 1024


class StoreError(Exception):
    pass


def validate_key(key: str) -> str:
    """Reject absolute keys, traversal and empty segments."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StoreError(f"invalid object key {key!r}")
    # Split by hand: PurePosixPath would normalise "a//b" and "a/./b" away before we look.
    if any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    url: str

    def put_file(self, key: str, path: Path) -> None: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def download_prefix(self, prefix: str, dest: Path) -> list[Path]: ...
    def ping(self) -> None: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.url = f"file://{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise StoreError(f"key escapes the store: {key!r}")
        return path

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)  # atomic publish

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(stream, out, CHUNK)
        os.replace(tmp, dest)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        remaining = (end - start + 1) if end is not None else None
        with open(path, "rb") as f:
            f.seek(start)
            while remaining is None or remaining > 0:
                chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        base = self._path(prefix.rstrip("/"))
        out: list[Path] = []
        for src in sorted(base.rglob("*")):
            if src.is_file() and not src.name.endswith(".partial"):
                target = dest / src.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                out.append(target)
        return out

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"store root not writable: {self.root}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def open_store(url: str, **s3_options: str | None) -> ObjectStore:
    """file:///dir -> LocalStore; s3://bucket[/prefix] -> S3Store (core.store_s3)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        from core.store_s3 import S3Store

        return S3Store(url, **s3_options)
    raise StoreError(f"unsupported storage URL scheme: {parsed.scheme!r}")


def store_from_settings(settings: Settings) -> ObjectStore:
    """The artifact store the settings name, with the S3 endpoint and credentials applied."""
    url = settings.resolved_storage_url
    if url.startswith("s3://"):
        return open_store(url, **s3_options(settings))
    return open_store(url)


def s3_options(settings: Settings) -> dict[str, str | None]:
    return {
        "endpoint_url": settings.s3_endpoint_url,
        "access_key_id": settings.s3_access_key_id,
        "secret_access_key": settings.s3_secret_access_key,
        "region": settings.s3_region,
    }

"""S3-compatible object store (AWS S3, MinIO, SeaweedFS) with the same interface as LocalStore.

Uploads go to a temporary key and are published by a server-side copy, so readers never see
a partial object under its final key. Transient errors are retried with backoff by botocore;
whatever still fails surfaces as a StoreError that names the bucket and key.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.store import CHUNK, StoreError, validate_key

T = TypeVar("T")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
# Server-side copy is a single request up to 5 GiB; above that boto3's managed copy goes multipart.
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store:
    # Attempts per request (botocore backs off exponentially between them), then a StoreError.
    max_attempts = 5
    connect_timeout = 5.0
    read_timeout = 60.0

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = "us-east-1",
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"not an s3://bucket[/prefix] URL: {url!r}")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        config = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": self.max_attempts, "mode": "adaptive"},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            signature_version="s3v4",
        )
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region or "us-east-1",
            config=config,
        )

    # -- helpers -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _prefix_key(self, prefix: str) -> str:
        return self._key(prefix.rstrip("/")) + "/"

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise FileNotFoundError(key) from exc
            raise StoreError(
                f"S3 {what} s3://{self.bucket}/{key} failed: {_error_code(exc)} "
                f"{exc.response.get('Error', {}).get('Message', '')}".rstrip()
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} s3://{self.bucket}/{key} failed after retries: {exc}") from exc

    # -- interface -----------------------------------------------------------------------------

    def put_file(self, key: str, path: Path) -> None:
        final = self._key(key)
        tmp = self._key(f".partial/{uuid.uuid4().hex}")
        self._call("upload", final, lambda: self.client.upload_file(str(path), self.bucket, tmp, Config=_TRANSFER))
        try:
            self._call(
                "publish",
                final,
                lambda: self.client.copy({"Bucket": self.bucket, "Key": tmp}, self.bucket, final, Config=_TRANSFER),
            )
        finally:
            # An orphaned temp key is invisible under any final key; a lifecycle rule reaps it.
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.delete_object(Bucket=self.bucket, Key=tmp)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        full = self._key(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        # Fetch eagerly so a missing key raises at call time, like opening a file.
        response = self._call("get", full, lambda: self.client.get_object(**kwargs))
        return self._iter_body(response["Body"], full)

    def _iter_body(self, body: Any, key: str) -> Iterator[bytes]:
        try:
            while True:
                chunk = self._call("read", key, lambda: body.read(CHUNK))
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    def size(self, key: str) -> int:
        full = self._key(key)
        head = self._call("head", full, lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        full = self._prefix_key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", full, lambda: iter(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        while True:
            page = self._call("list", full, lambda: next(pages, None))
            if page is None:
                return
            yield from page.get("Contents", [])

    def delete_prefix(self, prefix: str) -> None:
        full = self._prefix_key(prefix)
        keys = [obj["Key"] for obj in self._list(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            result = self._call(
                "delete",
                full,
                lambda b=batch: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}
                ),
            )
            if result.get("Errors"):
                raise StoreError(f"S3 delete under s3://{self.bucket}/{full} failed: {result['Errors'][:3]}")

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        full = self._prefix_key(prefix)
        out: list[Path] = []
        for obj in self._list(prefix):
            rel = obj["Key"][len(full) :]
            if not rel or rel.endswith("/") or "/.partial/" in f"/{rel}":
                continue
            validate_key(rel)  # a hostile key in the bucket must not write outside dest
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.partial")
            self._call(
                "download",
                obj["Key"],
                lambda k=obj["Key"], t=tmp: self.client.download_file(  # type: ignore[misc]
                    self.bucket, k, str(t)
                ),
            )
            tmp.replace(target)
            out.append(target)
        return sorted(out)

    def ping(self) -> None:
        self._call("head_bucket", "", lambda: self.client.head_bucket(Bucket=self.bucket))

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (embedded/dev setups; production buckets are provisioned)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call("create_bucket", "", lambda: self.client.create_bucket(Bucket=self.bucket))

"""The object store contract, run on LocalStore here and on S3Store in tests/integration."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from core.store import LocalStore, ObjectStore, StoreError, open_store

BAD_KEYS = ["", "/abs", "../up", "a/../../b", "a//b", "a/./b", "a\\b", "dir/", "nul\x00"]


def check_put_range_size_delete(store: ObjectStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # > 1 MiB so reads span chunks
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    store.put_file("jobs/j1/artifacts/merged/model.safetensors", src)
    store.put_file("jobs/j1/artifacts/config.json", src)
    store.put_file("jobs/j2/artifacts/config.json", src)
    key = "jobs/j1/artifacts/merged/model.safetensors"
    assert store.exists(key) and store.size(key) == len(data)
    assert b"".join(store.open_range(key)) == data
    assert b"".join(store.open_range(key, 10, 19)) == data[10:20]
    assert b"".join(store.open_range(key, len(data) - 4)) == b"tail"
    got = store.download_prefix("jobs/j1", tmp_path / "dl")
    assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in got) == [
        "artifacts/config.json",
        "artifacts/merged/model.safetensors",
    ]
    assert hashlib.sha256(got[-1].read_bytes()).digest() == hashlib.sha256(data).digest()
    store.delete_prefix("jobs/j1")
    assert not store.exists(key) and not store.exists("jobs/j1/artifacts/config.json")
    assert store.exists("jobs/j2/artifacts/config.json")  # a sibling prefix is untouched
    assert store.download_prefix("jobs/j1", tmp_path / "dl2") == []
    with pytest.raises(FileNotFoundError):
        list(store.open_range(key))
    store.ping()


def check_traversal_rejected(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "x"
    src.write_bytes(b"x")
    for key in BAD_KEYS:
        with pytest.raises(StoreError):
            store.put_file(key, src)
        with pytest.raises(StoreError):
            store.exists(key)
    for prefix in ["../", "/etc", "a/../.."]:
        with pytest.raises(StoreError):
            store.delete_prefix(prefix)


def check_partial_upload_invisible(store: ObjectStore, tmp_path: Path, source: Path) -> None:
    """While a large upload is in flight, its final key does not exist; afterwards it is whole."""
    key = "jobs/big/artifacts/model.safetensors"
    seen_partial: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if store.exists(key):
                seen_partial.append(store.size(key))
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        store.put_file(key, source)
    finally:
        done.set()
        watcher.join(timeout=30)
    assert all(size == source.stat().st_size for size in seen_partial)
    assert store.size(key) == source.stat().st_size


def test_local_store_contract(tmp_path: Path) -> None:
    check_put_range_size_delete(LocalStore(tmp_path / "store"), tmp_path)


def test_local_store_rejects_traversal(tmp_path: Path) -> None:
    check_traversal_rejected(LocalStore(tmp_path / "store"), tmp_path)
    assert not (tmp_path / "x.escaped").exists()


def test_local_store_partial_upload_invisible(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * (64 * 1024 * 1024))
    store = LocalStore(tmp_path / "store")
    check_partial_upload_invisible(store, tmp_path, big)
    assert [p.name for p in (store.root / "jobs/big/artifacts").iterdir()] == ["model.safetensors"]


def test_open_store_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    with pytest.raises(StoreError):
        open_store("ftp://x/y")
    from core.store_s3 import S3Store

    s3 = open_store(
        "s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b"
    )
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")


def test_s3_store_unreachable_is_a_clear_store_error() -> None:
    from core.store_s3 import S3Store

    class Fast(S3Store):
        max_attempts = 2
        connect_timeout = 0.5
        read_timeout = 0.5

    store = Fast("s3://bucket", endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b")
    with pytest.raises(StoreError, match="s3://bucket"):
        store.ping()

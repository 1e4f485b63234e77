"""S3Store against a real SeaweedFS S3 server: the same contract as LocalStore."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.store_s3 import S3Store
from tests.integration.conftest import Seaweed
from tests.unit.test_store import (
    check_partial_upload_invisible,
    check_put_range_size_delete,
    check_traversal_rejected,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(seaweed: Seaweed) -> S3Store:
    return S3Store(seaweed.bucket() + "/artifacts", **seaweed.options())


def test_s3_store_contract(s3: S3Store, tmp_path: Path) -> None:
    check_put_range_size_delete(s3, tmp_path)


def test_s3_store_rejects_traversal(s3: S3Store, tmp_path: Path) -> None:
    check_traversal_rejected(s3, tmp_path)


def test_s3_partial_upload_invisible_and_temp_key_removed(s3: S3Store, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x02" * (24 * 1024 * 1024))
    check_partial_upload_invisible(s3, tmp_path, big)
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])]
    assert keys == ["artifacts/jobs/big/artifacts/model.safetensors"]


def test_s3_missing_bucket_is_store_error(seaweed: Seaweed) -> None:
    from core.store import StoreError

    with pytest.raises((StoreError, FileNotFoundError)):
        S3Store("s3://no-such-bucket-bakehouse", **seaweed.options()).ping()

"""Artifact list and download: streamed from the store, ETag = sha256, single byte ranges."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.testing import Harness, api_harness

CONTENT = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    with api_harness(data_dir=tmp_path / "data", database_url=sqlite_url) as harness:
        yield harness


@pytest.fixture
def job(api: Harness, tmp_path: Path) -> str:
    job_id = api.create()["id"]
    api.add_artifact(job_id, "model.safetensors", CONTENT, tmp_path)
    api.add_artifact(job_id, "merged/config.json", b'{"a": 1}', tmp_path)
    return job_id


def test_list_artifacts_and_job_view(api: Harness, job: str) -> None:
    data = api.client.get(f"/v1/bake-jobs/{job}/artifacts").json()["data"]
    assert data == [
        {"name": "merged/config.json", "size": 8, "sha256": hashlib.sha256(b'{"a": 1}').hexdigest()},
        {"name": "model.safetensors", "size": len(CONTENT), "sha256": hashlib.sha256(CONTENT).hexdigest()},
    ]
    assert api.client.get(f"/v1/bake-jobs/{job}").json()["artifacts"] == data


def test_download_whole_with_etag(api: Harness, job: str) -> None:
    r = api.client.get(f"/v1/bake-jobs/{job}/artifacts/model.safetensors")
    assert r.status_code == 200
    assert r.content == CONTENT
    assert r.headers["etag"] == f'"{hashlib.sha256(CONTENT).hexdigest()}"'
    assert r.headers["content-length"] == str(len(CONTENT))
    assert r.headers["accept-ranges"] == "bytes"
    again = api.client.get(
        f"/v1/bake-jobs/{job}/artifacts/model.safetensors", headers={"If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == r.headers["etag"]


@pytest.mark.parametrize("path", ["merged/config.json", "merged%2Fconfig.json"])
def test_download_nested_name(api: Harness, job: str, path: str) -> None:
    r = api.client.get(f"/v1/bake-jobs/{job}/artifacts/{path}")
    assert r.status_code == 200
    assert r.content == b'{"a": 1}'


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-40", 10200, 10239),
        ("bytes=10230-99999", 10230, 10239),
    ],
)
def test_range_gives_206(api: Harness, job: str, header: str, start: int, end: int) -> None:
    r = api.client.get(f"/v1/bake-jobs/{job}/artifacts/model.safetensors", headers={"Range": header})
    assert r.status_code == 206
    assert r.content == CONTENT[start : end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(CONTENT)}"
    assert r.headers["content-length"] == str(end - start + 1)


def test_unsatisfiable_range_is_416(api: Harness, job: str) -> None:
    r = api.client.get(f"/v1/bake-jobs/{job}/artifacts/model.safetensors", headers={"Range": "bytes=20000-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(CONTENT)}"
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "range_not_satisfiable"


def test_stale_if_range_serves_whole_body(api: Harness, job: str) -> None:
    r = api.client.get(
        f"/v1/bake-jobs/{job}/artifacts/model.safetensors",
        headers={"Range": "bytes=0-9", "If-Range": '"stale"'},
    )
    assert r.status_code == 200
    assert r.content == CONTENT


def test_traversal_is_422_and_unknown_is_404(api: Harness, job: str) -> None:
    r = api.client.get(f"/v1/bake-jobs/{job}/artifacts/..%2F..%2Fetc%2Fpasswd")
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_artifact_name"
    r = api.client.get(f"/v1/bake-jobs/{job}/artifacts/nope.bin")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"

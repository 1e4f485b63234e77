"""The retry helpers of the worker, without processes: what is retried, for how long, and what
the job says when the store stays away."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from baking.events import ArtifactFile, BakeError, BakeResult
from core.settings import Settings
from core.store import LocalStore, StoreError
from worker import runner

pytestmark = [pytest.mark.faults]


class Flaky:
    """Raises `exc` for the first `failures` calls, then returns "ok"."""

    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def test_store_errors_are_retried_with_backoff_until_they_pass() -> None:
    fn, notes = Flaky(2, StoreError("connection refused")), []
    assert runner.with_storage_retry("upload of k", fn, seconds=30, on_retry=notes.append) == "ok"
    assert fn.calls == 3 and len(notes) == 2
    assert notes[0].startswith("object store unavailable during upload of k (connection refused); retry 1 in")


def test_store_errors_past_the_window_raise_the_last_error() -> None:
    fn = Flaky(1000, StoreError("down"))
    started = time.monotonic()
    with pytest.raises(StoreError, match="down"):
        runner.with_storage_retry("upload", fn, seconds=1.0)
    assert 1.0 <= time.monotonic() - started < 5 and fn.calls >= 2


def test_missing_key_is_an_answer_not_an_outage() -> None:
    fn = Flaky(1000, FileNotFoundError("k"))
    with pytest.raises(FileNotFoundError):
        runner.with_storage_retry("download", fn, seconds=30)
    assert fn.calls == 1


def test_cancel_ends_the_wait_early() -> None:
    fn = Flaky(1000, StoreError("down"))
    started = time.monotonic()
    with pytest.raises(StoreError):
        runner.with_storage_retry("upload", fn, seconds=60, should_stop=lambda: fn.calls >= 2)
    assert time.monotonic() - started < 5 and fn.calls == 2


def test_database_errors_are_retried_other_errors_are_not() -> None:
    fn = Flaky(2, OperationalError("UPDATE jobs", {}, Exception("server closed the connection")))
    assert runner.with_db_retry("finish", fn, seconds=30) == "ok" and fn.calls == 3
    bug = Flaky(1000, ValueError("a bug"))
    with pytest.raises(ValueError):
        runner.with_db_retry("finish", bug, seconds=30)
    assert bug.calls == 1


class FlakyStore(LocalStore):
    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.failures = failures

    def put_file(self, key: str, path: Path) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("S3 upload failed after retries: Could not connect to the endpoint URL")
        super().put_file(key, path)

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        raise StoreError("S3 list failed after retries: Could not connect to the endpoint URL")


def one_file_result(tmp_path: Path) -> BakeResult:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"w" * 100)
    digest = hashlib.sha256(b"w" * 100).hexdigest()
    return BakeResult(out, [ArtifactFile("model.safetensors", 100, digest)], metrics={})


def test_upload_survives_an_outage_and_reports_each_retry(tmp_path: Path) -> None:
    store, notes = FlakyStore(tmp_path / "store", failures=2), []
    stored = runner.upload_result(
        store=store,
        job_id="bj_1",
        result=one_file_result(tmp_path),
        scratch=tmp_path,
        should_stop=lambda: False,
        on_retry=notes.append,
    )
    assert [a.name for a in stored] == ["model.safetensors", "bj_1.tar"]
    assert store.size("jobs/bj_1/artifacts/model.safetensors") == 100
    assert len(notes) == 2


def test_download_of_an_s3_model_fails_as_storage_error_at_fetching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAKEHOUSE_STORAGE_RETRY_SECONDS", "0.5")
    monkeypatch.setattr(runner, "open_store", lambda url, **_: FlakyStore(tmp_path / "s", failures=0))
    settings = Settings(data_dir=tmp_path / "data")
    spec: dict[str, Any] = {"model": "s3://models/tiny/"}
    with pytest.raises(BakeError) as err:
        runner.materialise_model(spec, settings)
    assert (err.value.code, err.value.stage) == ("storage_error", "fetching")
    assert not list((tmp_path / "data" / "cache" / "s3").glob("*")), "a partial download was left in the cache"

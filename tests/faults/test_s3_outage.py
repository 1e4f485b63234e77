"""SIGKILL SeaweedFS (the S3 artifact store) in the middle of an upload.

Back within the retry window: the upload resumes with backoff and the job succeeds with every
artifact intact. Down past it: the job fails with `storage_error` at stage `uploading`, no
artifact row is published, and what the attempt had uploaded is deleted once the store is back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import get_sessionmaker
from core.store_s3 import S3Store
from models import Artifact, JobEvent
from tests.faults.conftest import (
    FAKE_APP,
    Proc,
    RedisServer,
    fake_spec,
    fault_env,
    jobs_by_id,
    report,
    submit_direct,
    tally,
    wait_terminal,
)
from tests.integration.conftest import WeedServer, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """A SeaweedFS of this module's own: the tests kill it, so it is not the session's server."""
    # A restarted master waits one raft election timeout (10 s by default) before it leads again.
    server = WeedServer(tmp_path_factory.mktemp("weed-faults"), ("-master.electionTimeout", "1s"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_weed(weed: WeedServer) -> WeedServer:
    if weed.proc is None or weed.proc.poll() is not None:
        weed.start()
    return weed


def object_keys(store: S3Store, prefix: str) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def wait_mid_upload(store: S3Store, job_id: str) -> None:
    """Until at least one artifact of the job is stored (the slowed upload is under way)."""

    def started() -> bool:
        try:
            return bool(object_keys(store, f"jobs/{job_id}/artifacts/"))
        except Exception:
            return False

    wait_until(started, 60, f"the upload of {job_id} to start", interval=0.1)


def s3_env(
    tmp_path: Path, db: str, redis: RedisServer, weed: WeedServer, retry_s: str
) -> tuple[dict[str, str], S3Store]:
    bucket = weed.server.bucket("faults")
    env = fault_env(
        tmp_path,
        db,
        redis.url,
        BAKEHOUSE_STORAGE_URL=bucket,
        BAKEHOUSE_STORAGE_RETRY_SECONDS=retry_s,
        FAULTS_PUT_DELAY_S="0.4",  # six uploads take > 2 s: room to kill the store between two of them
        **weed.server.env(),
    )
    return env, S3Store(bucket, **weed.server.options())


def test_store_back_within_retry_window_upload_resumes(
    faults_db: str,
    private_redis: RedisServer,
    live_weed: WeedServer,
    celery_worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    env, store = s3_env(tmp_path, faults_db, private_redis, live_weed, retry_s="60")
    worker = celery_worker(env, app=FAKE_APP)
    ids = submit_direct(env, fake_spec(fault_train_steps="3"), 2)
    wait_mid_upload(store, ids[0])

    live_weed.kill()
    wait_until(lambda: "object store unavailable during upload" in worker.log_path.read_text(), 30, "an upload retry")
    live_weed.start()
    wait_terminal(faults_db, ids, timeout=90)

    t = tally("SeaweedFS SIGKILL mid-upload, back within the retry window (2 jobs)", faults_db, ids, [worker])
    with get_sessionmaker(faults_db)() as s:
        retry_events = JobEvent.message.like("object store unavailable%")
        warnings = s.scalars(select(JobEvent.message).where(JobEvent.job_id == ids[0], retry_events)).all()
        artifacts = list(s.scalars(select(Artifact).where(Artifact.job_id.in_(ids))))
    t.notes.append(f"upload retries recorded as job events: {len(warnings)}")
    report(t)
    assert t.counts() == {
        "submitted": 2,
        "succeeded": 2,
        "failed": 0,
        "cancelled": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 0,
    }
    assert t.logged_successes == 2
    assert warnings and all(w.endswith("s") for w in warnings)  # "...; retry N in X.Xs"
    assert len(artifacts) == 2 * 6
    for a in artifacts:  # every published artifact is whole: size and sha256 as recorded
        digest = hashlib.sha256(b"".join(store.open_range(a.storage_key))).hexdigest()
        assert (store.size(a.storage_key), digest) == (a.size, a.sha256), a.name


def test_store_down_past_retry_window_fails_clean(
    faults_db: str,
    private_redis: RedisServer,
    live_weed: WeedServer,
    celery_worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    env, store = s3_env(tmp_path, faults_db, private_redis, live_weed, retry_s="3")
    worker = celery_worker(env, app=FAKE_APP)
    [job_id] = submit_direct(env, fake_spec(fault_train_steps="3"), 1)
    wait_mid_upload(store, job_id)

    live_weed.kill()
    # The upload gave up; the runner now retries deleting the partial upload, which needs the store.
    wait_until(lambda: f"during cleanup of jobs/{job_id}" in worker.log_path.read_text(), 60, "the cleanup retry")
    live_weed.start()
    wait_terminal(faults_db, [job_id], timeout=60)

    t = tally("SeaweedFS SIGKILL mid-upload, down past the 3 s retry window (1 job)", faults_db, [job_id], [worker])
    job = jobs_by_id(faults_db, [job_id])[job_id]
    t.notes.append(f"error {job.error}")
    report(t)
    assert t.counts() == {
        "submitted": 1,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 0,
    }
    assert job.error is not None and (job.error["code"], job.error["stage"]) == ("storage_error", "uploading")
    assert "could not store the artifacts" in job.error["message"]
    with get_sessionmaker(faults_db)() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
    assert object_keys(store, f"jobs/{job_id}/") == []

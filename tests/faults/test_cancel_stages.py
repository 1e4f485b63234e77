"""Cancel a running job in each of the nine stages, through the real path: the cancel flag on
the row, the worker's heartbeat that reads it, the check between steps, the cleanup and the
`cancelled` outcome recorded with the stage it happened in.

Each job holds still in its target stage (the fake bake's `fault_slow_stage`); `uploading` is
slowed by FAULTS_PUT_DELAY_S instead, so the cancel lands between two uploads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from baking.events import STAGES
from core.db import get_sessionmaker
from core.jobs import request_cancel
from models import Artifact, JobEvent
from tests.faults.conftest import (
    FAKE_APP,
    TENANT,
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

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]


def test_cancel_in_every_stage(
    faults_db: str, private_redis: RedisServer, celery_worker: Callable[..., Proc], tmp_path: Path
) -> None:
    env = fault_env(tmp_path, faults_db, private_redis.url, FAULTS_PUT_DELAY_S="0.5")
    workers = [celery_worker(env, name=f"worker{i}", app=FAKE_APP) for i in (1, 2)]
    quick = {"fault_stage_s": "0.05", "fault_train_steps": "2", "fault_step_s": "0.05"}
    target: dict[str, str] = {}
    for stage in STAGES:
        [job_id] = submit_direct(env, fake_spec(**quick, fault_slow_stage=stage, fault_slow_s="20"), 1)
        target[job_id] = stage
    ids = list(target)

    requested: dict[str, float] = {}
    deadline = time.monotonic() + 90
    while len(requested) < len(ids) and time.monotonic() < deadline:
        for job in jobs_by_id(faults_db, ids).values():
            if job.id not in requested and job.status == "running" and job.stage == target[job.id]:
                with get_sessionmaker(faults_db)() as s:  # what POST /v1/bake-jobs/{id}/cancel does
                    request_cancel(session=s, tenant=TENANT, job_id=job.id)
                    s.commit()
                requested[job.id] = time.monotonic()
        time.sleep(0.1)
    assert set(requested) == set(ids), f"never reached: {[target[i] for i in ids if i not in requested]}"
    wait_terminal(faults_db, ids, timeout=30)

    t = tally("cancel in each of the 9 stages (2 workers)", faults_db, ids, workers)
    rows = jobs_by_id(faults_db, ids)
    recorded: dict[str, str | None] = {}
    with get_sessionmaker(faults_db)() as s:
        for job_id in ids:
            last = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())).first()
            assert last is not None and last.message == "cancelled", job_id
            recorded[target[job_id]] = last.stage
            assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
    t.notes.append("stage recorded with the cancel: " + ", ".join(f"{k}={v}" for k, v in recorded.items()))
    report(t)
    assert t.counts() == {
        "submitted": 9,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 9,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 0,
    }
    assert recorded == {stage: stage for stage in STAGES}
    assert all(rows[i].error is None and rows[i].cancel_requested for i in ids)
    for job_id in ids:  # nothing left in the store, not even the files uploaded before the cancel
        assert not (tmp_path / "store" / "jobs" / job_id).exists(), target[job_id]

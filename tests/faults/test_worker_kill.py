"""SIGKILL a Celery worker in the middle of a job: the job is taken over after its lease runs out
(by a live worker's orphan sweeper, or by a restarted worker's start-up re-enqueue) and completes
exactly once; a job whose worker dies on every attempt fails with `worker_lost`.

Retries start from scratch (no stage checkpoints): the fake bake is re-run in full.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import get_sessionmaker
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
    wait_for_job,
    wait_terminal,
    worker_pid,
)
from tests.faults.fake_bake import ARTIFACT_FILES

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]


def test_killed_worker_job_is_taken_over_and_completes_once(
    faults_db: str, private_redis: RedisServer, celery_worker: Callable[..., Proc], tmp_path: Path
) -> None:
    env = fault_env(tmp_path, faults_db, private_redis.url)
    doomed = celery_worker(env, name="doomed", app=FAKE_APP)
    survivor = celery_worker(env, name="survivor", app=FAKE_APP)
    ids = submit_direct(env, fake_spec(fault_train_steps="15", fault_step_s="0.2"), 4)

    victim = wait_for_job(
        faults_db,
        "a job of the doomed worker in mid-training",
        lambda j: worker_pid(j) == doomed.proc.pid and j.stage == "baking_tools",
        ids,
    )
    doomed.sigkill()
    # No restart: the survivor's orphan sweeper must notice the expired lease and re-enqueue.
    wait_terminal(faults_db, ids, timeout=90)

    title = "worker SIGKILL mid-job, survivor takes over (2 workers, 4 jobs)"
    t = tally(title, faults_db, ids, [doomed, survivor])
    rows = jobs_by_id(faults_db, ids)
    t.notes.append(f"victim {victim.id}: attempts {rows[victim.id].attempts}, killed in stage baking_tools")
    report(t)
    assert t.counts() == {
        "submitted": 4,
        "succeeded": 4,
        "failed": 0,
        "cancelled": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 1,
    }
    assert t.logged_successes == 4
    assert rows[victim.id].attempts == 2 and worker_pid(rows[victim.id]) == survivor.proc.pid
    assert f"re-enqueueing job {victim.id}: its lease ran out" in survivor.log_path.read_text()
    assert all(rows[i].attempts == 1 for i in ids if i != victim.id)
    with get_sessionmaker(faults_db)() as s:
        names = s.scalars(select(Artifact.name).where(Artifact.job_id == victim.id)).all()
    assert sorted(names) == sorted([*ARTIFACT_FILES, f"{victim.id}.tar"])
    store = tmp_path / "store" / "jobs" / victim.id / "artifacts"
    assert (store / "model.safetensors").stat().st_size == 384 * 1024


def test_worker_killed_on_every_attempt_fails_worker_lost(
    faults_db: str, private_redis: RedisServer, celery_worker: Callable[..., Proc], tmp_path: Path
) -> None:
    env = fault_env(tmp_path, faults_db, private_redis.url, BAKEHOUSE_MAX_ATTEMPTS="2")
    [doomed_job] = submit_direct(env, fake_spec(fault_slow_stage="optimizing", fault_slow_s="60"), 1)
    workers = []
    for attempt in (1, 2):
        # Right after a re-claim the row still holds the last attempt's stage, so wait for an
        # "optimizing" event newer than everything the earlier attempts recorded.
        since = last_event_id(faults_db, doomed_job)
        w = celery_worker(env, name=f"doomed{attempt}", app=FAKE_APP)
        workers.append(w)
        wait_for_job(
            faults_db,
            f"attempt {attempt} in stage optimizing",
            lambda j, w=w, a=attempt, since=since: (
                worker_pid(j) == w.proc.pid and j.attempts == a and last_event_id(faults_db, j.id, "optimizing") > since
            ),
            [doomed_job],
        )
        w.sigkill()
    # A healthy job goes to the same queue: the attempt cap must not touch it.
    [healthy] = submit_direct(env, fake_spec(fault_train_steps="3"), 1)
    workers.append(celery_worker(env, name="rescuer", app=FAKE_APP))
    wait_terminal(faults_db, [doomed_job, healthy], timeout=60)

    t = tally("worker SIGKILL on every attempt (cap 2) + 1 healthy job", faults_db, [doomed_job, healthy], workers)
    job = jobs_by_id(faults_db, [doomed_job])[doomed_job]
    t.notes.append(f"capped job: {job.status}, attempts {job.attempts}, error {job.error}")
    report(t)
    assert t.counts() == {
        "submitted": 2,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 1,
    }
    assert t.logged_successes == 1
    assert job.status == "failed" and job.attempts == 2
    assert job.error is not None and job.error["code"] == "worker_lost" and job.error["stage"] == "optimizing"
    assert not (tmp_path / "store" / "jobs" / doomed_job).exists()


def last_event_id(db_url: str, job_id: str, stage: str | None = None) -> int:
    """The id of the job's newest event (in `stage`, if given); 0 when there is none."""
    with get_sessionmaker(db_url)() as s:
        query = select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id)
        if stage is not None:
            query = query.where(JobEvent.stage == stage)
        return s.scalar(query) or 0

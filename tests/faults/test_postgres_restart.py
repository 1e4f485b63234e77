"""Restart the Postgres cluster (the source of truth for jobs) while jobs run: workers ride it
out — heartbeats and progress are best effort, stage changes and outcomes are retried until the
database answers — and every job completes exactly once.

The database is the test run's own (created and dropped by the `faults_db` fixture); the cluster
is shared, so it is down for seconds only and started again at teardown whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

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
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]


def test_postgres_restarted_while_jobs_run(
    faults_db: str,
    private_redis: RedisServer,
    celery_worker: Callable[..., Proc],
    bounce_postgres: Callable[[float], float],
    tmp_path: Path,
) -> None:
    # A lease longer than the outage: no job should need a second attempt.
    env = fault_env(tmp_path, faults_db, private_redis.url, BAKEHOUSE_LEASE_SECONDS="15")
    workers = [celery_worker(env, name=f"worker{i}", app=FAKE_APP) for i in (1, 2)]
    ids = submit_direct(env, fake_spec(fault_train_steps="5", fault_step_s="0.2"), 4)
    wait_for_job(faults_db, "a job in mid-training", lambda j: j.stage == "baking_tools", ids)

    downtime = bounce_postgres(2.0)
    wait_terminal(faults_db, ids, timeout=90)

    t = tally("postgres cluster restart (stop, 2 s down, start; 2 workers, 4 jobs)", faults_db, ids, workers)
    attempts = sorted(j.attempts for j in jobs_by_id(faults_db, ids).values())
    logs = "".join(w.log_path.read_text(errors="replace") for w in workers)
    retried_writes = logs.count("database unavailable during")
    t.notes.append(f"database unreachable {downtime:.1f}s; attempts {attempts}; retried job writes {retried_writes}")
    report(t)
    assert downtime < 15, "the outage outlasted the 15 s test lease"
    assert retried_writes > 0, "no stage change or outcome fell into the outage; the retry path went untested"
    assert t.counts() == {
        "submitted": 4,
        "succeeded": 4,
        "failed": 0,
        "cancelled": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 0,
    }
    assert t.logged_successes == 4

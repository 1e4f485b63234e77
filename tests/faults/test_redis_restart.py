"""SIGKILL the broker (a private redis-server with an fsync-always AOF) while jobs run, start it
again on the same port: running jobs finish, queued ones are still delivered, a job submitted
during the outage is refused with 503 and recorded as failed (the client is told; nothing is
silently lost), and submissions after the restart run. Then the same with a Redis that keeps
nothing: the jobs it forgot are sent again by the workers' sweepers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.queue import pending_messages
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


def post(base: str, spec: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}/v1/bake-jobs", json=spec, timeout=30)


def test_redis_killed_and_restarted_while_jobs_run(
    faults_db: str,
    private_redis: RedisServer,
    api_server: Callable[[dict[str, str]], str],
    celery_worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    env = fault_env(tmp_path, faults_db, private_redis.url)
    base = api_server(env)
    workers = [celery_worker(env, name=f"worker{i}", app=FAKE_APP) for i in (1, 2)]
    spec = fake_spec(fault_train_steps="10", fault_step_s="0.2")
    before = []
    for _ in range(6):
        response = post(base, spec)
        assert response.status_code == 202, response.text
        before.append(response.json()["id"])
    wait_for_job(faults_db, "a job in mid-training", lambda j: j.stage == "baking_tools", before)

    private_redis.kill()
    down_at = time.monotonic()
    refused = post(base, spec)
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "queue_unavailable"
    outage_job = refused.json()["job_id"]
    time.sleep(max(0.0, 2.0 - (time.monotonic() - down_at)))
    private_redis.start()
    downtime = time.monotonic() - down_at

    after = []
    for _ in range(2):
        response = post(base, spec)
        assert response.status_code == 202, response.text
        after.append(response.json()["id"])
    ids = [*before, outage_job, *after]
    wait_terminal(faults_db, ids, timeout=90)

    t = tally("redis-server SIGKILL + restart (2 workers, 6 before, 1 during, 2 after)", faults_db, ids, workers)
    refused_row = jobs_by_id(faults_db, [outage_job])[outage_job]
    t.notes.append(f"broker down {downtime:.1f}s; POST during the outage: 503, job {refused_row.status}")
    report(t)
    assert t.counts() == {
        "submitted": 9,
        "succeeded": 8,
        "failed": 1,
        "cancelled": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
        "retried": 0,
    }
    assert t.logged_successes == 8
    assert refused_row.status == "failed" and refused_row.error is not None
    assert refused_row.error["code"] == "queue_unavailable"


def test_queued_jobs_outlive_a_redis_restart_that_forgets_them(
    faults_db: str, forgetful_redis: RedisServer, celery_worker: Callable[..., Proc], tmp_path: Path
) -> None:
    """A Redis without persistence comes back empty: the jobs that were queued in it have rows
    but no messages. Each worker's sweeper sends them again once the queue is empty."""
    env = fault_env(tmp_path, faults_db, forgetful_redis.url)
    worker = celery_worker(env, name="worker", app=FAKE_APP)
    ids = submit_direct(env, fake_spec(fault_train_steps="10", fault_step_s="0.3"), 4)
    wait_for_job(faults_db, "the first job in mid-training", lambda j: j.stage == "baking_tools", ids)
    queue = env["BAKEHOUSE_QUEUE_NAME"]
    assert pending_messages(broker_url=forgetful_redis.url, queue=queue) == 3  # one worker, one job at a time

    forgetful_redis.kill()
    forgetful_redis.start()
    assert pending_messages(broker_url=forgetful_redis.url, queue=queue) == 0
    wait_terminal(faults_db, ids, timeout=90)

    t = tally(
        "redis-server without persistence SIGKILL + restart (1 worker, 1 running, 3 queued)", faults_db, ids, [worker]
    )
    report(t)
    counts = t.counts()
    assert {k: counts[k] for k in ("submitted", "succeeded", "failed", "lost", "completed_twice", "stuck")} == {
        "submitted": 4,
        "succeeded": 4,
        "failed": 0,
        "lost": 0,
        "completed_twice": 0,
        "stuck": 0,
    }
    assert t.logged_successes == 4
    assert worker.log_path.read_text().count("its message is lost") >= 3

"""worker.celery_app.OrphanSweeper against a real (in-memory) kombu broker and a SQLite database:
a queued job whose message is gone is sent again, and only when the broker's queue is empty."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from core.db import get_sessionmaker, upgrade_database
from core.queue import enqueue_bake, pending_messages, producer
from core.settings import get_settings
from models import Job
from models.base import utcnow
from worker.celery_app import OrphanSweeper

BROKER = "memory://"


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"bake-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    upgrade_database(url)
    monkeypatch.setenv("BAKEHOUSE_DATABASE_URL", url)
    monkeypatch.setenv("BAKEHOUSE_BROKER_URL", BROKER)
    monkeypatch.setenv("BAKEHOUSE_QUEUE_NAME", name)
    get_settings.cache_clear()
    yield name
    purge(name)
    get_settings.cache_clear()


def purge(queue: str) -> None:
    """What a broker restarted without persistence does to the queue."""
    with producer(BROKER).connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def queued_job(queue: str, *, age_s: float) -> str:
    job_id = "bj_" + uuid.uuid4().hex
    with get_sessionmaker(get_settings().resolved_database_url)() as s:
        s.add(
            Job(
                id=job_id,
                tenant="t1",
                status="queued",
                spec={"model": "file:///m"},
                queue=queue,
                created_at=utcnow() - timedelta(seconds=age_s),
            )
        )
        s.commit()
    return job_id


def test_a_queued_job_whose_message_is_lost_is_sent_again(queue: str) -> None:
    sweeper = OrphanSweeper(lease_seconds=5)
    waiting = queued_job(queue, age_s=60)
    enqueue_bake(broker_url=BROKER, queue=queue, job_id=waiting)
    fresh = queued_job(queue, age_s=0)

    assert sweeper.sweep() == []  # its message still waits in the broker: nothing is lost
    purge(queue)
    assert sweeper.sweep() == [waiting]  # the fresh job's message may still be on its way
    assert pending_messages(broker_url=BROKER, queue=queue) == 1
    assert sweeper.sweep() == []  # sent once per resend interval, and the queue is not empty
    purge(queue)
    assert sweeper.sweep() == []  # lost again, but within the resend interval
    sweeper.resend_after = 0.0
    assert sweeper.sweep() == [waiting]
    assert fresh not in sweeper.sweep()


def test_jobs_of_other_queues_are_left_alone(queue: str) -> None:
    queued_job(f"{queue}-other", age_s=60)
    legacy = queued_job(queue, age_s=60)
    with get_sessionmaker(get_settings().resolved_database_url)() as s:
        row = s.get(Job, legacy)
        assert row is not None
        row.queue = None  # a row from before jobs.queue: never treated as this queue's waiting job
        s.commit()
    assert OrphanSweeper(lease_seconds=5).sweep() == []
    assert pending_messages(broker_url=BROKER, queue=queue) == 0

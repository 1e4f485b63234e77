"""Enqueue jobs by task name, so the API never imports worker code or torch."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

BAKE_TASK = "bakehouse.run_bake_job"


@lru_cache(maxsize=4)
def producer(broker_url: str) -> Celery:
    # A producer-only Celery app: it knows the broker, not the tasks.
    return Celery("bakehouse-producer", broker=broker_url)


def enqueue_bake(*, broker_url: str, queue: str, job_id: str) -> None:
    """Send the job id to the workers. Call only after the job row is committed."""
    producer(broker_url).send_task(BAKE_TASK, args=[job_id], queue=queue)


def pending_messages(*, broker_url: str, queue: str) -> int:
    """Messages waiting in the broker's queue, not yet delivered to a worker.

    A passive declare: it creates nothing, and kombu's Redis transport answers "no such queue"
    for an empty one (Redis drops an empty list), which is 0 here.
    """
    with producer(broker_url).connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:
            return 0

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

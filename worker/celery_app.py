"""The Celery app of the workers. Configured from Settings when first used, not at import."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

app = Celery("bakehouse", include=["worker.tasks"])


def transport_options(broker_url: str, visibility_timeout: int) -> dict[str, Any]:
    # Redis/SQS redeliver an unacked message after the visibility timeout. kombu's SQLAlchemy
    # transport passes its options to create_engine, which rejects the key.
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://", "sqs://")):
        return {"visibility_timeout": visibility_timeout}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.resolved_broker_url,
        "result_backend": None,  # job state lives in the database, not in Celery results
        "task_ignore_result": True,
        "task_default_queue": settings.queue_name,
        "task_routes": {"bakehouse.*": {"queue": settings.queue_name}},
        # One job per worker process, acknowledged only when done, so a crash redelivers it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": transport_options(
            settings.resolved_broker_url, settings.visibility_timeout_seconds
        ),
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


@worker_ready.connect
def _requeue_orphans(sender: Any = None, **_: Any) -> None:
    """Re-enqueue active jobs whose worker may have died; the claim makes duplicates no-ops."""
    from core.db import get_sessionmaker
    from core.queue import BAKE_TASK
    from core.runs import orphan_candidates

    settings = get_settings()
    try:
        with get_sessionmaker(settings.resolved_database_url)() as session:
            candidates = orphan_candidates(session=session, queue=settings.queue_name)
    except Exception:  # a missing schema or a DB hiccup must not stop the worker from serving
        log.exception("could not look for orphaned jobs")
        return
    for job_id, wait_s in candidates:
        log.info("re-enqueueing active job %s (lease free in %.0fs)", job_id, wait_s)
        app.send_task(BAKE_TASK, args=[job_id], queue=settings.queue_name, countdown=wait_s + 1.0)


class OrphanSweeper(threading.Thread):
    """Every half lease, re-enqueue this queue's jobs whose message or worker is gone.

    Two kinds: active jobs whose lease ran out (the start-up re-enqueue above only helps when a
    worker (re)starts; this covers a dead worker that is not coming back while the others keep
    running), and jobs still queued a lease after they were accepted while the broker's queue is
    empty: their message is lost (a Redis restarted without persistence, a worker that died
    holding an unclaimed one). Each (job, attempt) is sent once, and again only after
    `resend_after` seconds in case that message was lost too; a claim makes every duplicate a no-op.
    """

    def __init__(self, lease_seconds: int) -> None:
        super().__init__(name="orphan-sweeper", daemon=True)
        self.interval = max(1.0, lease_seconds / 2)
        self.resend_after = 10.0 * lease_seconds
        self.queued_grace = float(lease_seconds)
        self._sent: dict[tuple[str, int], float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # the database or broker may be restarting; try again next round
                log.exception("orphan sweep failed")

    def sweep(self) -> list[str]:
        from core.db import get_sessionmaker
        from core.queue import enqueue_bake, pending_messages
        from core.runs import stale_jobs, waiting_jobs

        settings = get_settings()
        broker, queue = settings.resolved_broker_url, settings.queue_name
        with get_sessionmaker(settings.resolved_database_url)() as session:
            stale = stale_jobs(session=session, queue=queue)
            waiting = waiting_jobs(session=session, queue=queue, older_than_s=self.queued_grace)
        # While messages wait in the broker, a waiting job's own may be among them: only an empty
        # queue says it is gone (or in a worker's hands a moment before its claim, where the copy
        # sent here is a no-op). Checked after the query, so a message sent meanwhile counts.
        lost = waiting if waiting and pending_messages(broker_url=broker, queue=queue) == 0 else []
        now = time.monotonic()
        self._sent = {k: t for k, t in self._sent.items() if now - t < self.resend_after}
        sent: list[str] = []
        for job_id, attempts, why in [
            *((j, a, "its lease ran out") for j, a in stale),
            *((j, 0, "its message is lost") for j in lost),
        ]:
            if (job_id, attempts) in self._sent:
                continue
            log.info("re-enqueueing job %s: %s (attempt %d)", job_id, why, attempts)
            enqueue_bake(broker_url=broker, queue=queue, job_id=job_id)
            self._sent[(job_id, attempts)] = now
            sent.append(job_id)
        return sent

    def stop(self) -> None:
        self._stop_event.set()


_sweeper: OrphanSweeper | None = None


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    global _sweeper
    if _sweeper is None:
        _sweeper = OrphanSweeper(get_settings().lease_seconds)
        _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(sender: Any = None, **_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()

"""Job-row operations of the worker: claim with a lease, heartbeat, record, finish.

The job row is the source of truth. Every write that depends on who runs the job is a
conditional UPDATE on `lease_owner`, so a worker that lost its lease (a zombie that was
presumed dead) cannot overwrite the outcome of the worker that took over. Each function is
one transaction: it commits before it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from models import Artifact, ComplianceReport, Job, JobEvent
from models.base import utcnow

ACTIVE = ("running", "cancelling")
FIRST_STAGE = "fetching"  # what a worker does first once it holds a job (worker.runner)
TERMINAL = ("succeeded", "failed", "cancelled")

ClaimStatus = Literal["claimed", "terminal", "leased", "missing", "exhausted"]


@dataclass(frozen=True)
class ClaimOutcome:
    """`claimed` is True only for "claimed"; everything else means: do not run this job."""

    status: ClaimStatus
    attempts: int = 0
    cancel_requested: bool = False
    spec: dict[str, Any] | None = None
    seed: int = 0
    lease_expires_at: datetime | None = None

    @property
    def claimed(self) -> bool:
        return self.status == "claimed"


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    size: int
    sha256: str
    storage_key: str


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def _stale(now: datetime) -> Any:
    # A lease that expired, or an active status without a lease (set by hand or by a crash mid-claim).
    return and_(Job.status.in_(ACTIVE), or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))


def _owned(job_id: str, worker_id: str) -> Any:
    return and_(Job.id == job_id, Job.lease_owner == worker_id, Job.status.in_(ACTIVE))


def claim_job(*, session: Session, job_id: str, worker_id: str, lease_seconds: int, max_attempts: int) -> ClaimOutcome:
    """Take the job if it is queued or its lease is stale; count the attempt; cap attempts.

    The cap is the lower of the job's own `max_attempts` (fixed when it was accepted) and the
    worker's, so a worker configured differently from the API never runs a job more often than
    it was promised. A stale lease whose attempts are spent is not run again: the job fails with
    `worker_lost` at the stage where the last worker died.
    """
    cap = case((Job.max_attempts < max_attempts, Job.max_attempts), else_=max_attempts)  # portable least()
    now = utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, or_(Job.status == "queued", _stale(now)), Job.attempts < cap)
        .values(
            status=case((Job.cancel_requested.is_(True), "cancelling"), else_="running"),
            # A running job is always at a stage (DESIGN.md §5), from the claim on: a worker lost
            # before it entered its first one failed while fetching, not at no stage. A retry keeps
            # the stage the last worker died at until the new one enters "fetching".
            stage=func.coalesce(Job.stage, FIRST_STAGE),
            lease_owner=worker_id,
            lease_expires_at=expires,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return ClaimOutcome("missing")
    if _rowcount(result) == 1:
        return ClaimOutcome(
            "claimed",
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            spec=dict(job.spec),
            seed=job.seed,
            lease_expires_at=job.lease_expires_at,
        )
    if job.status in TERMINAL:
        return ClaimOutcome("terminal", attempts=job.attempts)
    if job.status in ACTIVE and job.lease_expires_at is not None and job.lease_expires_at >= now:
        return ClaimOutcome("leased", attempts=job.attempts, lease_expires_at=job.lease_expires_at)
    # Queued or stale, but the attempts are spent.
    stage = job.stage
    spent = min(job.max_attempts, max_attempts)
    message = f"the worker running this job stopped responding and {job.attempts} of {spent} attempts are spent"
    failed = session.execute(
        update(Job)
        .where(Job.id == job_id, or_(Job.status == "queued", _stale(now)), Job.attempts >= cap)
        .values(
            status="failed",
            error={"code": "worker_lost", "message": message, "stage": stage},
            finished_at=now,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(failed) == 1:
        session.add(
            JobEvent(
                job_id=job_id,
                level="error",
                type="message",
                stage=stage,
                message=f"failed: worker_lost: {message}",
            )
        )
    session.commit()
    return ClaimOutcome("exhausted", attempts=job.attempts)


def heartbeat(*, session: Session, job_id: str, worker_id: str, lease_seconds: int) -> bool:
    """Extend the lease if this worker still owns it. Returns whether a cancel was requested.

    Raises LeaseLost when the job is no longer ours (taken over, finished or deleted): the
    caller must stop work and write nothing more.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if _rowcount(result) != 1:
        raise LeaseLost(job_id)
    cancel = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one_or_none()
    return bool(cancel)


class LeaseLost(Exception):
    """This worker no longer owns the job's lease."""


def still_owner(*, session: Session, job_id: str, worker_id: str) -> bool:
    found = session.execute(select(Job.id).where(_owned(job_id, worker_id))).first()
    session.commit()
    return found is not None


def record_event(
    *,
    session: Session,
    job_id: str,
    message: str = "",
    level: str = "info",
    type: str = "message",
    stage: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, level=level, type=type, stage=stage, message=message, data=data))
    session.commit()


def set_stage(*, session: Session, job_id: str, worker_id: str, stage: str) -> bool:
    """Enter a stage (progress resets); returns False if the lease is lost."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(
            stage=stage,
            updated_at=utcnow(),
            progress={"stage": stage, "step": 0, "total": None, "percent": 0.0, "eta_s": None},
        )
        .execution_options(synchronize_session=False)
    )
    applied = _rowcount(result) == 1
    if applied:
        session.add(JobEvent(job_id=job_id, level="info", type="message", stage=stage, message=f"stage {stage}"))
    session.commit()
    return applied


def set_progress(
    *,
    session: Session,
    job_id: str,
    worker_id: str,
    stage: str,
    step: int,
    total: int | None,
    eta_s: float | None,
) -> bool:
    percent = round(min(100.0, 100.0 * step / total), 1) if total else 0.0
    progress = {
        "stage": stage,
        "step": step,
        "total": total,
        "percent": percent,
        "eta_s": None if eta_s is None else round(eta_s, 1),
    }
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(progress=progress, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def _finish(session: Session, job_id: str, worker_id: str, status: str, **values: Any) -> bool:
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(status=status, finished_at=now, updated_at=now, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def failed_check_ids(report: dict[str, Any]) -> str:
    """ ",S1,S4," — the failed check ids in a form a portable LIKE can filter on."""
    ids = [str(c.get("id")) for c in report.get("checks", []) if c.get("status") == "fail" and c.get("id")]
    return "," + "".join(f"{i}," for i in ids)


def finish_succeeded(
    *,
    session: Session,
    job_id: str,
    worker_id: str,
    metrics: dict[str, Any],
    gate: dict[str, Any] | None,
    artifacts: list[StoredArtifact],
    report: dict[str, Any] | None,
) -> bool:
    """Publish the outcome with its artifacts and report, in one transaction, if still the owner."""
    if not _finish(session, job_id, worker_id, "succeeded", metrics=metrics, gate=gate, error=None, progress=None):
        session.rollback()
        return False
    for a in artifacts:
        session.add(Artifact(job_id=job_id, name=a.name, size=a.size, sha256=a.sha256, storage_key=a.storage_key))
    if report is not None:
        tenant = session.execute(select(Job.tenant).where(Job.id == job_id)).scalar_one()
        gate_info = gate or report.get("gate") or {}
        session.add(
            ComplianceReport(
                job_id=job_id,
                tenant=tenant,
                score=float(report.get("score", gate_info.get("score", 0.0))),
                gate_passed=bool(gate_info.get("passed", report.get("gate_passed", False))),
                failed_checks=failed_check_ids(report),
                report=report,
            )
        )
    session.add(
        JobEvent(
            job_id=job_id,
            level="info",
            type="message",
            stage=None,
            message=f"succeeded with {len(artifacts)} artifacts",
        )
    )
    session.commit()
    return True


def finish_failed(*, session: Session, job_id: str, worker_id: str, code: str, message: str, stage: str | None) -> bool:
    if not _finish(session, job_id, worker_id, "failed", error={"code": code, "message": message, "stage": stage}):
        session.rollback()
        return False
    session.add(
        JobEvent(job_id=job_id, level="error", type="message", stage=stage, message=f"failed: {code}: {message}")
    )
    session.commit()
    return True


def finish_cancelled(*, session: Session, job_id: str, worker_id: str, stage: str | None = None) -> bool:
    if not _finish(session, job_id, worker_id, "cancelled"):
        session.rollback()
        return False
    session.add(JobEvent(job_id=job_id, level="warning", type="message", stage=stage, message="cancelled"))
    session.commit()
    return True


def _in_queue(queue: str) -> Any:
    # Rows from before jobs.queue existed (None) belong to whichever worker finds them.
    return or_(Job.queue == queue, Job.queue.is_(None))


def orphan_candidates(*, session: Session, queue: str) -> list[tuple[str, float]]:
    """Active jobs and how many seconds until their lease can be taken over (0 if already stale).

    A worker re-enqueues these when it starts: a broker that loses unacknowledged messages
    when a worker is killed (kombu's SQLAlchemy transport keeps them in the dead process's
    memory) would otherwise leave the job running forever. Claims make duplicates harmless.
    """
    now = utcnow()
    rows = session.execute(select(Job.id, Job.lease_expires_at).where(Job.status.in_(ACTIVE), _in_queue(queue))).all()
    session.commit()
    return [(job_id, max(0.0, (exp - now).total_seconds()) if exp else 0.0) for job_id, exp in rows]


def stale_jobs(*, session: Session, queue: str) -> list[tuple[str, int]]:
    """(id, attempts) of active jobs whose lease ran out: their worker died or lost the database.

    Workers re-enqueue these while they run (worker.celery_app.OrphanSweeper), so a job whose
    worker was killed is taken over by a live worker after about one lease, not only when a
    worker restarts or the broker's visibility timeout (hours) redelivers the message.
    """
    rows = session.execute(select(Job.id, Job.attempts).where(_stale(utcnow()), _in_queue(queue))).all()
    session.commit()
    return [(job_id, int(attempts)) for job_id, attempts in rows]


def waiting_jobs(*, session: Session, queue: str, older_than_s: float) -> list[str]:
    """Ids of this queue's jobs that are still queued (never claimed) `older_than_s` after they
    were accepted, oldest first. If the broker's queue is empty by then, their messages are gone:
    a broker restarted without persistence, or a worker that died holding one it had not claimed.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    rows = session.scalars(
        select(Job.id)
        .where(Job.status == "queued", Job.queue == queue, Job.created_at < cutoff)
        .order_by(Job.created_at)
    ).all()
    session.commit()
    return list(rows)


class Throttle:
    """At most one write per `interval` seconds (progress); the first call always passes."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False

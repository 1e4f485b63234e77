"""Job service functions: create, read, list, cancel, and the job's events, artifacts and reports.

Every function takes the caller's Session and tenant; a row of another tenant is indistinguishable
from a missing one. Functions flush but never commit, except where the docstring says so: the
caller owns the transaction (the route commits, then enqueues).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session, selectinload

from core.spec import BakeJobSpec
from models import Artifact, ComplianceReport, Job, JobEvent
from models.base import utcnow

ACTIVE = frozenset({"queued", "running", "cancelling"})
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ACTIVE | TERMINAL


class JobError(Exception):
    """A request the job service refuses; `code` is the stable problem code the API returns."""

    code = "job_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(JobError):
    code = "not_found"


class ArtifactNotFound(JobError):
    code = "not_found"


class JobNotCancellable(JobError):
    code = "job_not_cancellable"


class ComplianceNotProduced(JobError):
    code = "compliance_not_produced"


class InvalidCursor(JobError):
    code = "invalid_cursor"


def new_job_id() -> str:
    return "bj_" + uuid.uuid4().hex


def create_job(*, session: Session, spec: BakeJobSpec, tenant: str, max_attempts: int, queue: str) -> Job:
    job = Job(
        id=new_job_id(),
        tenant=tenant,
        status="queued",
        stage=None,
        progress=None,
        spec=spec.model_dump(mode="json"),
        seed=spec.training.seed,
        job_metadata=dict(spec.metadata),
        attempts=0,
        max_attempts=max_attempts,
        queue=queue,
        cancel_requested=False,
        artifacts=[],
    )
    session.add(job)
    session.flush()
    return job


def get_job(*, session: Session, tenant: str, job_id: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant == tenant).options(selectinload(Job.artifacts))
    )


def require_job(*, session: Session, tenant: str, job_id: str) -> Job:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job is None:
        raise JobNotFound(f"bake job {job_id!r} not found")
    return job


def mark_failed(*, session: Session, job: Job, code: str, message: str, stage: str | None = None) -> Job:
    job.status = "failed"
    job.error = {"code": code, "message": message, "stage": stage}
    job.finished_at = utcnow()
    session.flush()
    return job


def _after_cursor(
    created_at: InstrumentedAttribute[datetime],
    key: InstrumentedAttribute[str],
    anchor_created: datetime,
    anchor_key: str,
) -> ColumnElement[bool]:
    # Rows strictly after the anchor in (created_at DESC, key DESC) order.
    return or_(created_at < anchor_created, and_(created_at == anchor_created, key < anchor_key))


def _page(session: Session, query: Select[Any], limit: int) -> tuple[list[Any], bool]:
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_jobs(
    *,
    session: Session,
    tenant: str,
    after: str | None,
    limit: int,
    status: str | None,
    metadata: dict[str, str],
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the id of the last job of the previous page."""
    query = (
        select(Job)
        .where(Job.tenant == tenant)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .options(selectinload(Job.artifacts))
    )
    if status is not None:
        query = query.where(Job.status == status)
    for key, value in sorted(metadata.items()):
        query = query.where(Job.job_metadata[key].as_string() == value)
    if after is not None:
        anchor = session.get(Job, after)
        if anchor is None or anchor.tenant != tenant:
            raise InvalidCursor(f"after={after!r} is not a bake job of this tenant")
        query = query.where(_after_cursor(Job.created_at, Job.id, anchor.created_at, anchor.id))
    return _page(session, query, limit)


def request_cancel(*, session: Session, tenant: str, job_id: str) -> Job:
    """queued: cancelled now. running: `cancelling`, the worker stops at the next checkpoint.

    Cancelling a cancelled or cancelling job is a no-op that returns it; a finished job cannot be
    cancelled.
    """
    job = require_job(session=session, tenant=tenant, job_id=job_id)
    if job.status == "queued":
        job.status = "cancelled"
        job.cancel_requested = True
        job.finished_at = utcnow()
    elif job.status == "running":
        job.status = "cancelling"
        job.cancel_requested = True
    elif job.status in ("succeeded", "failed"):
        raise JobNotCancellable(f"bake job {job_id!r} already {job.status}")
    session.flush()
    return job


def list_events(
    *, session: Session, tenant: str, job_id: str, after_id: int | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """Oldest first; `after_id` is the id of the last event the caller has seen."""
    require_job(session=session, tenant=tenant, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    if after_id is not None:
        query = query.where(JobEvent.id > after_id)
    return _page(session, query, limit)


def list_artifacts(*, session: Session, tenant: str, job_id: str) -> list[Artifact]:
    require_job(session=session, tenant=tenant, job_id=job_id)
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(*, session: Session, tenant: str, job_id: str, name: str) -> Artifact:
    require_job(session=session, tenant=tenant, job_id=job_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        raise ArtifactNotFound(f"bake job {job_id!r} has no artifact {name!r}")
    return artifact


def get_compliance_report(*, session: Session, tenant: str, job_id: str) -> ComplianceReport:
    job = require_job(session=session, tenant=tenant, job_id=job_id)
    report = session.get(ComplianceReport, job_id)
    if report is None:
        raise ComplianceNotProduced(f"bake job {job_id!r} has no compliance report yet (status {job.status})")
    return report


def _like_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_compliance_reports(
    *,
    session: Session,
    tenant: str,
    gate: Literal["passed", "failed"] | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    failed_check: str | None = None,
    created_after: datetime | None = None,
    after: str | None = None,
    limit: int = 20,
) -> tuple[list[ComplianceReport], bool]:
    """Newest first; `after` is the job id of the last report of the previous page."""
    query = (
        select(ComplianceReport)
        .where(ComplianceReport.tenant == tenant)
        .order_by(ComplianceReport.created_at.desc(), ComplianceReport.job_id.desc())
    )
    if gate is not None:
        query = query.where(ComplianceReport.gate_passed.is_(gate == "passed"))
    if min_score is not None:
        query = query.where(ComplianceReport.score >= min_score)
    if max_score is not None:
        query = query.where(ComplianceReport.score <= max_score)
    if failed_check is not None:
        # failed_checks is stored as ",S1,S4," so the commas anchor the id on both backends.
        query = query.where(ComplianceReport.failed_checks.like(f"%,{_like_literal(failed_check)},%", escape="\\"))
    if created_after is not None:
        query = query.where(ComplianceReport.created_at > created_after)
    if after is not None:
        anchor = session.get(ComplianceReport, after)
        if anchor is None or anchor.tenant != tenant:
            raise InvalidCursor(f"after={after!r} is not a compliance report of this tenant")
        query = query.where(
            _after_cursor(ComplianceReport.created_at, ComplianceReport.job_id, anchor.created_at, anchor.job_id)
        )
    return _page(session, query, limit)

"""What the routes call when a request needs more than one service call: job submission with
idempotency and enqueue-after-commit, and byte ranges for artifact downloads."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import Enqueue
from api.errors import ApiError, field_error, problem_body
from api.schemas import BakeJobPublic
from core import idempotency, jobs
from core.settings import Settings
from core.sources import check_model_source
from core.spec import BakeJobSpec
from models import Job

log = logging.getLogger("bakehouse.api")

# A job runs for minutes: there is no exact moment a slot frees, so clients are told to wait a while.
ACTIVE_JOBS_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class Submitted:
    status_code: int
    body: dict[str, Any]
    created: bool  # False for an idempotent replay
    replayed: bool = False


def submit_bake_job(
    *,
    session: Session,
    spec: BakeJobSpec,
    tenant: str,
    settings: Settings,
    enqueue: Enqueue,
    idempotency_key: str | None,
) -> Submitted:
    """Check the model source, create the job row, commit, then enqueue its id.

    With an Idempotency-Key the key is reserved first and its outcome commits with the job, so a
    retry replays the same 202 (also when the tenant is at its cap of active jobs by then). If the
    broker refuses the job it is marked failed (`queue_unavailable`) and the key is released, so
    the client's retry makes a new attempt.
    """
    try:
        check_model_source(spec.model, settings)
    except ValueError as exc:
        raise field_error("model", str(exc)) from exc
    payload_hash = idempotency.request_hash(spec.model_dump(mode="json", exclude_unset=True))
    if idempotency_key is not None:
        replay = idempotency.begin(session=session, tenant=tenant, key=idempotency_key, payload_hash=payload_hash)
        if replay is not None:
            return Submitted(replay.status_code, replay.body, created=False, replayed=True)
    try:
        _require_job_slot(session=session, tenant=tenant, limit=settings.max_active_jobs_per_tenant)
        job = jobs.create_job(
            session=session,
            spec=spec,
            tenant=tenant,
            max_attempts=settings.max_attempts,
            queue=settings.queue_name,
        )
        body = BakeJobPublic.from_row(job).model_dump(mode="json")
        if idempotency_key is not None:
            idempotency.complete(
                session=session,
                tenant=tenant,
                key=idempotency_key,
                status_code=202,
                response=body,
                job_id=job.id,
            )
        session.commit()
    except BaseException:
        if idempotency_key is not None:
            _release_quietly(session=session, tenant=tenant, key=idempotency_key)
        raise
    try:
        enqueue(job.id)
    except Exception as exc:
        log.exception("enqueue of %s failed", job.id)
        _fail_unqueued(session=session, job_id=job.id, tenant=tenant, idempotency_key=idempotency_key, exc=exc)
        raise ApiError(
            503,
            "queue_unavailable",
            f"the job queue is unavailable; bake job {job.id} was marked failed, retry later",
            headers={"Retry-After": "5"},
            extra={"job_id": job.id},
        ) from exc
    return Submitted(202, body, created=True)


def _require_job_slot(*, session: Session, tenant: str, limit: int) -> None:
    """429 when the tenant already has `limit` jobs queued or running.

    A soft cap: two submissions racing for the last slot can both pass. It keeps one tenant
    from filling the queue, which does not need a lock.
    """
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.status.in_(jobs.ACTIVE))
    )
    if active is not None and active >= limit:
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"tenant {tenant!r} has {active} active bake jobs (the limit is {limit}); "
            "wait for one to finish or cancel one, then retry",
            headers={"Retry-After": str(ACTIVE_JOBS_RETRY_AFTER_S)},
            extra={"active_jobs": active, "limit": limit},
        )


def _release_quietly(*, session: Session, tenant: str, key: str) -> None:
    # Best effort while another error is on its way out: that error is the one to report.
    try:
        idempotency.release(session=session, tenant=tenant, key=key)
    except Exception:
        log.exception("could not release Idempotency-Key %r; it frees itself when stale", key)


def _fail_unqueued(*, session: Session, job_id: str, tenant: str, idempotency_key: str | None, exc: Exception) -> None:
    job = jobs.require_job(session=session, tenant=tenant, job_id=job_id)
    jobs.mark_failed(
        session=session,
        job=job,
        code="queue_unavailable",
        message=f"could not enqueue the job: {type(exc).__name__}",
    )
    session.commit()
    if idempotency_key is not None:
        idempotency.release(session=session, tenant=tenant, key=idempotency_key)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One `bytes=a-b` | `a-` | `-n` range, or None for the whole body.

    Syntactically invalid or multi-range headers are ignored (RFC 9110 §14.2 allows serving
    200); a valid but unsatisfiable range raises a 416 problem.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise range_not_satisfiable(size)
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid syntax, not unsatisfiable
    if start >= size:
        raise range_not_satisfiable(size)
    return ByteRange(start, min(int(last) if last else size - 1, size - 1))


def range_not_satisfiable(size: int) -> ApiError:
    return ApiError(
        416,
        "range_not_satisfiable",
        f"range not satisfiable; the artifact has {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def not_ready_body(checks: dict[str, str]) -> dict[str, Any]:
    failed = sorted(name for name, state in checks.items() if state != "ok")
    return problem_body(503, "not_ready", "not ready: " + ", ".join(failed) + " unavailable", checks=checks)

"""/v1/bake-jobs: create, list, get, cancel, events (JSON or SSE)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from api.deps import QueueDep, RateLimited, SessionDep, SettingsDep, TenantDep
from api.events import event_stream, wants_event_stream
from api.routes import API_PREFIX, NOT_FOUND, TENANT_RESPONSES, problem
from api.schemas import (
    BakeJobCreate,
    BakeJobPublic,
    BakeJobsPublic,
    JobEventPublic,
    JobEventsPublic,
    JobStatus,
)
from api.services import submit_bake_job
from core import jobs

router = APIRouter(
    prefix=f"{API_PREFIX}/bake-jobs", tags=["bake-jobs"], dependencies=[RateLimited], responses=TENANT_RESPONSES
)

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post(
    "",
    status_code=202,
    response_model=BakeJobPublic,
    responses={
        400: problem("The body is not readable as JSON text (e.g. not UTF-8)"),
        409: problem("Idempotency-Key request in flight"),
        413: problem("Body over BAKEHOUSE_MAX_BODY_BYTES"),
        429: problem("Over the request rate, or the tenant has BAKEHOUSE_MAX_ACTIVE_JOBS_PER_TENANT active jobs"),
        503: problem("Queue down"),
    },
)
def create_bake_job(
    body: BakeJobCreate,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    enqueue: QueueDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    result = submit_bake_job(
        session=session,
        spec=body,
        tenant=tenant,
        settings=settings,
        enqueue=enqueue,
        idempotency_key=idempotency_key,
    )
    if result.created:
        request.app.state.metrics.jobs_created.inc()
    headers = {"Location": f"/v1/bake-jobs/{result.body.get('id', '')}"} if result.status_code == 202 else {}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(result.body, status_code=result.status_code, headers=headers)


@router.get("", response_model=BakeJobsPublic)
def list_bake_jobs(
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
    after: str | None = None,
    limit: Limit = 20,
    status: JobStatus | None = None,
) -> BakeJobsPublic:
    """Newest first. Filter by `status` and by metadata with `metadata.KEY=VALUE` query parameters."""
    metadata = {k.removeprefix("metadata."): v for k, v in request.query_params.items() if k.startswith("metadata.")}
    rows, has_more = jobs.list_jobs(
        session=session, tenant=tenant, after=after, limit=limit, status=status, metadata=metadata
    )
    data = [BakeJobPublic.from_row(j) for j in rows]
    return BakeJobsPublic(data=data, has_more=has_more, next_after=data[-1].id if has_more else None)


@router.get("/{job_id}", response_model=BakeJobPublic, responses=NOT_FOUND)
def get_bake_job(job_id: str, tenant: TenantDep, session: SessionDep) -> BakeJobPublic:
    return BakeJobPublic.from_row(jobs.require_job(session=session, tenant=tenant, job_id=job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=BakeJobPublic,
    responses={**NOT_FOUND, 409: problem("The job already finished")},
)
def cancel_bake_job(job_id: str, tenant: TenantDep, session: SessionDep) -> BakeJobPublic:
    job = jobs.request_cancel(session=session, tenant=tenant, job_id=job_id)
    session.commit()
    return BakeJobPublic.from_row(job)


@router.get(
    "/{job_id}/events",
    response_model=JobEventsPublic,
    responses={
        **NOT_FOUND,
        200: {"content": {"text/event-stream": {}}, "description": "JSON page, or SSE on request"},
    },
)
def list_job_events(
    job_id: str,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    after: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response | JobEventsPublic:
    """Append-only events, oldest first; `after` is the last event id seen.

    With `Accept: text/event-stream` the events stream as SSE until the job is terminal.
    """
    rows, has_more = jobs.list_events(session=session, tenant=tenant, job_id=job_id, after_id=after, limit=limit)
    if wants_event_stream(request):
        session.close()  # the stream polls with short sessions of its own; do not pin a connection
        return event_stream(
            database_url=settings.resolved_database_url,
            tenant=tenant,
            job_id=job_id,
            after_id=after,
            last_event_id=request.headers.get("last-event-id"),
        )
    return JobEventsPublic(data=[JobEventPublic.from_row(e) for e in rows], has_more=has_more)

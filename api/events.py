"""Server-sent events for a job: the events so far, then new ones as the worker writes them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.schemas import JobEventPublic
from core import jobs
from core.db import get_sessionmaker
from models import Job, JobEvent

POLL_SECONDS = 0.5
BATCH = 500


def wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _poll(database_url: str, tenant: str, job_id: str, after_id: int | None) -> tuple[list[JobEventPublic], str]:
    with get_sessionmaker(database_url)() as session:
        # Status first: every event written before the job turned terminal is then visible below.
        status = session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant == tenant)) or "cancelled"
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(BATCH)
        if after_id is not None:
            query = query.where(JobEvent.id > after_id)
        return [JobEventPublic.from_row(e) for e in session.scalars(query)], status


async def _events(
    database_url: str, tenant: str, job_id: str, after_id: int | None, poll_seconds: float
) -> AsyncIterator[ServerSentEvent]:
    last = after_id
    while True:
        events, status = await anyio.to_thread.run_sync(_poll, database_url, tenant, job_id, last)
        for event in events:
            last = event.id
            yield ServerSentEvent(data=event.model_dump_json(), event=event.type, id=str(event.id))
        if status in jobs.TERMINAL and len(events) < BATCH:
            yield ServerSentEvent(data=f'{{"status": "{status}"}}', event="end")
            return
        if len(events) < BATCH:
            await anyio.sleep(poll_seconds)


def event_stream(
    *,
    database_url: str,
    tenant: str,
    job_id: str,
    after_id: int | None,
    last_event_id: str | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> EventSourceResponse:
    if after_id is None and last_event_id is not None and last_event_id.isdigit():
        after_id = int(last_event_id)  # a reconnecting EventSource resumes where it left off
    return EventSourceResponse(_events(database_url, tenant, job_id, after_id, poll_seconds), ping=15)

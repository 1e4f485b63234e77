"""Compliance reports: one job's report (JSON, or minimal Markdown/HTML) and a query across jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from api.deps import RateLimited, SessionDep, TenantDep
from api.render import report_html, report_markdown
from api.routes import API_PREFIX, TENANT_RESPONSES, problem
from api.schemas import ComplianceReportsPublic, ComplianceReportSummary
from core import jobs

router = APIRouter(prefix=API_PREFIX, tags=["compliance"], dependencies=[RateLimited], responses=TENANT_RESPONSES)


@router.get(
    "/bake-jobs/{job_id}/compliance",
    response_model=dict[str, Any],
    responses={
        200: {"content": {"text/markdown": {}, "text/html": {}}},
        404: problem("No such job, or `compliance_not_produced` until the job writes its report"),
    },
)
def get_compliance(
    job_id: str, tenant: TenantDep, session: SessionDep, format: Literal["json", "md", "html"] = "json"
) -> Response:
    report = jobs.get_compliance_report(session=session, tenant=tenant, job_id=job_id)
    if format == "md":
        return PlainTextResponse(report_markdown(job_id, report.report), media_type="text/markdown")
    if format == "html":
        return HTMLResponse(report_html(job_id, report.report))
    return JSONResponse(report.report)


@router.get("/compliance-reports", response_model=ComplianceReportsPublic)
def list_compliance_reports(
    tenant: TenantDep,
    session: SessionDep,
    gate: Literal["passed", "failed"] | None = None,
    min_score: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    max_score: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    failed_check: Annotated[str | None, Query(pattern=r"^[A-Z]{1,3}[0-9]{1,3}$", examples=["S4"])] = None,
    created_after: datetime | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ComplianceReportsPublic:
    """Newest first. `failed_check` is a check id (e.g. S4) that must have failed."""
    rows, has_more = jobs.list_compliance_reports(
        session=session,
        tenant=tenant,
        gate=gate,
        min_score=min_score,
        max_score=max_score,
        failed_check=failed_check,
        created_after=created_after,
        after=after,
        limit=limit,
    )
    data = [ComplianceReportSummary.from_row(r) for r in rows]
    return ComplianceReportsPublic(data=data, has_more=has_more, next_after=data[-1].job_id if has_more else None)

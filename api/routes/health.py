"""Liveness, readiness and metrics: no authentication, not under /v1."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.errors import PROBLEM_JSON
from api.health import readiness
from api.routes import problem
from api.schemas import HealthPublic
from api.services import not_ready_body

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    return HealthPublic()


@router.get("/readyz", responses={503: problem("A dependency is unavailable; `checks` names each one")})
async def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    checks = await run_in_threadpool(readiness, settings, store)
    if all(state == "ok" for state in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    return JSONResponse(not_ready_body(checks), status_code=503, media_type=PROBLEM_JSON)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

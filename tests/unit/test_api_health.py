"""Liveness, readiness, metrics, error format and the import boundary of `api`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter

from api.testing import Harness, api_harness

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url, raise_server_exceptions=False) as harness:
        yield harness


def test_healthz(api: Harness) -> None:
    r = api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ok_on_embedded_defaults(api: Harness) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "store": "ok"}}


def test_readyz_names_the_failed_dependency(tmp_path: Path, sqlite_url: str) -> None:
    from core.settings import Settings

    with api_harness(data_dir=tmp_path, database_url=sqlite_url) as api:
        api.client.app.state.settings = Settings(
            data_dir=tmp_path,
            database_url=sqlite_url,  # type: ignore[attr-defined]
            broker_url="redis://127.0.0.1:1/0",
        )
        from api.deps import get_settings

        api.client.app.dependency_overrides[get_settings] = lambda: api.client.app.state.settings  # type: ignore[attr-defined]
        r = api.client.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "not_ready"
    assert body["checks"]["database"] == "ok" and body["checks"]["store"] == "ok"
    assert body["checks"]["broker"].startswith("error")
    assert "broker" in body["detail"]


def test_metrics_count_by_route_template(api: Harness) -> None:
    job_id = api.create()["id"]
    api.client.get(f"/v1/bake-jobs/{job_id}")
    api.client.get("/v1/bake-jobs/bj_missing")
    text = api.client.get("/metrics").text
    assert 'bakehouse_http_requests_total{method="GET",route="/v1/bake-jobs/{job_id}",status="200"} 1.0' in text
    assert 'bakehouse_http_requests_total{method="GET",route="/v1/bake-jobs/{job_id}",status="404"} 1.0' in text
    assert 'bakehouse_http_requests_total{method="POST",route="/v1/bake-jobs",status="202"} 1.0' in text
    assert "bakehouse_jobs_created_total 1.0" in text
    assert "bakehouse_http_request_duration_seconds_bucket" in text


def test_unknown_route_and_method_are_problems(api: Harness) -> None:
    r = api.client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not_found"
    r = api.client.delete("/v1/bake-jobs")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


def test_unhandled_error_is_500_without_trace(api: Harness) -> None:
    router = APIRouter()

    @router.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    api.client.app.include_router(router)  # type: ignore[attr-defined]
    r = api.client.get("/boom")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "type": "https://bakehouse.dev/problems/internal_error",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "internal server error",
        "code": "internal_error",
    }


def test_openapi_documents_the_spec_example() -> None:
    from api.main import create_app
    from core.settings import Settings

    schema = create_app(Settings(data_dir=ROOT / ".nonexistent")).openapi()
    assert "Problem" in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["BakeJobCreate"]["examples"][0]["model"].startswith("bakehouse://")


def test_importing_api_does_not_import_torch() -> None:
    code = (
        "import sys, api.main; bad = [m for m in ('torch', 'transformers', 'baking', 'worker') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

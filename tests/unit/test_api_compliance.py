"""Compliance report per job (404 until produced) and the query across jobs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from api.testing import Harness, api_harness
from models.base import utcnow


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url) as harness:
        yield harness


def test_report_404_until_produced_then_json_md_html(api: Harness) -> None:
    job_id = api.create()["id"]
    r = api.client.get(f"/v1/bake-jobs/{job_id}/compliance")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "compliance_not_produced"
    api.add_report(job_id, score=0.9, passed=False, failed=("S4",))
    assert api.client.get(f"/v1/bake-jobs/{job_id}/compliance").json() == {
        "score": 0.9,
        "gate": {"passed": False},
        "failed": ["S4"],
    }
    md = api.client.get(f"/v1/bake-jobs/{job_id}/compliance", params={"format": "md"})
    assert md.headers["content-type"].startswith("text/markdown")
    assert md.text.startswith(f"# Compliance report for {job_id}")
    html = api.client.get(f"/v1/bake-jobs/{job_id}/compliance", params={"format": "html"})
    assert html.headers["content-type"].startswith("text/html") and "<pre>" in html.text
    assert api.client.get("/v1/bake-jobs/bj_none/compliance").json()["code"] == "not_found"


@pytest.fixture
def reports(api: Harness) -> dict[str, str]:
    now = utcnow()
    rows = {
        "a": dict(score=0.99, passed=True, failed=(), created_at=now - timedelta(hours=3)),
        "b": dict(score=0.80, passed=False, failed=("S1", "S4"), created_at=now - timedelta(hours=2)),
        "c": dict(score=0.92, passed=False, failed=("S14",), created_at=now - timedelta(hours=1)),
        "d": dict(score=0.96, passed=True, failed=("X4",), created_at=now),
    }
    ids = {}
    for name, fields in rows.items():
        ids[name] = api.create()["id"]
        api.add_report(ids[name], **fields)  # type: ignore[arg-type]
    api.create()  # a job without a report is never listed
    return ids


def _names(api: Harness, ids: dict[str, str], **params: object) -> list[str]:
    by_id = {v: k for k, v in ids.items()}
    body = api.client.get("/v1/compliance-reports", params=params).json()
    return [by_id[r["job_id"]] for r in body["data"]]


def test_filters_return_exactly_the_expected_jobs(api: Harness, reports: dict[str, str]) -> None:
    assert _names(api, reports) == ["d", "c", "b", "a"]
    assert _names(api, reports, gate="passed") == ["d", "a"]
    assert _names(api, reports, gate="failed") == ["c", "b"]
    assert _names(api, reports, min_score=0.92) == ["d", "c", "a"]
    assert _names(api, reports, max_score=0.92) == ["c", "b"]
    assert _names(api, reports, min_score=0.9, max_score=0.97) == ["d", "c"]
    assert _names(api, reports, failed_check="S4") == ["b"]
    assert _names(api, reports, failed_check="S1") == ["b"]  # not S14
    assert _names(api, reports, failed_check="S14") == ["c"]
    assert _names(api, reports, gate="passed", failed_check="X4") == ["d"]
    since = (utcnow() - timedelta(minutes=90)).isoformat()
    assert _names(api, reports, created_after=since) == ["d", "c"]


def test_summary_shape_and_pagination(api: Harness, reports: dict[str, str]) -> None:
    page = api.client.get("/v1/compliance-reports", params={"limit": 3}).json()
    assert len(page["data"]) == 3 and page["has_more"] is True
    assert page["data"][2] == {
        "job_id": reports["b"],
        "created_at": page["data"][2]["created_at"],
        "score": 0.8,
        "gate_passed": False,
        "failed_checks": ["S1", "S4"],
    }
    rest = api.client.get("/v1/compliance-reports", params={"limit": 3, "after": page["next_after"]}).json()
    assert [r["job_id"] for r in rest["data"]] == [reports["a"]] and rest["has_more"] is False


def test_bad_filters_are_422(api: Harness) -> None:
    for params in ({"gate": "maybe"}, {"min_score": 2}, {"failed_check": "%"}):
        r = api.client.get("/v1/compliance-reports", params=params)
        assert r.status_code == 422, params
        assert r.json()["code"] == "validation_error"

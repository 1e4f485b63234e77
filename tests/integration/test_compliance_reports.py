"""The compliance-report query on real Postgres, with reports stored the way the worker stores them.

Each job is claimed with `core.runs.claim_job` and finished with `core.runs.finish_succeeded`
carrying a report shaped like `baking.assure.assess()` builds it (checks from the real check
table, score and gate from `score_and_gate`, risk register from `risk_register`). The API is
the real app (SettingsDep overridden, as the unit tests do). Every filter is asserted as an
exact, ordered list of job ids. The test runs under tenants of its own and deletes its rows at
the end, so other tests sharing the per-run database see nothing of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, update

from api.testing import Harness, api_harness
from core import runs
from core.db import get_sessionmaker
from models import ApiKey, ComplianceReport, IdempotencyKey, Job
from models.base import utcnow

pytestmark = pytest.mark.integration

WORKER = "worker-compliance-test"


def make_report(job_id: str, failed: tuple[str, ...] = (), not_applicable: tuple[str, ...] = ()) -> dict[str, Any]:
    """A report as `assess()` returns it, with the given checks failed (R2/R1 derived like assess does)."""
    from baking import assure

    profile = assure.load_profile("default")
    status: dict[str, Any] = {
        cid: "fail" if cid in failed else "not_applicable" if cid in not_applicable else "pass"
        for cid in assure.CHECK_IDS
    }
    critical = [
        cid
        for cid in assure.CHECK_IDS
        if cid not in ("R1", "R2") and status[cid] == "fail" and assure.BY_ID[cid].severity == "critical"
    ]
    status["R2"] = "fail" if critical else "pass"
    checks = [
        assure.Check(
            cid,
            status[cid],
            {"measured": cid.lower()},
            f"criterion of {cid}",
            {"note": f"evidence for {cid}"},
        ).to_dict()
        for cid in assure.CHECK_IDS
    ]
    score, gate = assure.score_and_gate(checks, profile)
    return {
        "job_id": job_id,
        "created_at": utcnow().isoformat(),
        "profile": profile.name,
        "score": score,
        "gate": gate,
        "checks": checks,
        "risk_register": assure.risk_register(checks),
        "disclaimer": assure.DISCLAIMER,
    }


# name: (failed checks, hours before now the report was created). Weights: critical 5, high 3,
# medium 1 over 16 checks (54 in all); the gate needs no critical failure and score >= 0.95.
PLAN: dict[str, tuple[tuple[str, ...], int]] = {
    "a": ((), 6),  # 1.0      passed (S5 not applicable)
    "b": (("S6",), 5),  # 0.9815   passed: a medium failure only
    "c": (("S4",), 4),  # 0.8148   failed: S4 and so R2
    "d": (("X4",), 3),  # 0.9444   failed on score alone, no critical failure
    "e": (("X1", "V3"), 2),  # 0.7963   failed: X1, V3, R2
    "f": (("S1", "S3", "S4"), 1),  # 0.6667   failed: S1, S3, S4, R2
}
EXPECTED = {
    "a": (1.0, True, []),
    "b": (0.9815, True, ["S6"]),
    "c": (0.8148, False, ["S4", "R2"]),
    "d": (0.9444, False, ["X4"]),
    "e": (0.7963, False, ["X1", "V3", "R2"]),
    "f": (0.6667, False, ["S1", "S3", "S4", "R2"]),
}


@pytest.fixture
def tenants() -> tuple[str, str]:
    return f"t{uuid.uuid4().hex[:10]}", f"o{uuid.uuid4().hex[:10]}"


@pytest.fixture
def api(tmp_path: Path, pg_url: str, tenants: tuple[str, str]) -> Iterator[Harness]:
    tenant, other = tenants
    keys = f"{tenant}:key-{tenant},{other}:key-{other}"
    try:
        with api_harness(data_dir=tmp_path, database_url=pg_url, api_keys=keys) as harness:
            harness.client.headers["Authorization"] = f"Bearer key-{tenant}"
            yield harness
    finally:
        # Only this test's rows: reports, events and artifacts go with their jobs (ON DELETE CASCADE).
        with get_sessionmaker(pg_url)() as s:
            for model in (ComplianceReport, Job, IdempotencyKey, ApiKey):
                s.execute(delete(model).where(model.tenant.in_(tenants)))
            s.commit()


@pytest.fixture
def stored(api: Harness) -> dict[str, str]:
    """Six succeeded jobs with reports stored through claim_job + finish_succeeded; one queued job without."""
    now = utcnow()
    ids: dict[str, str] = {}
    with get_sessionmaker(api.database_url)() as s:
        for name, (failed, hours) in PLAN.items():
            job_id = api.create()["id"]
            ids[name] = job_id
            claim = runs.claim_job(session=s, job_id=job_id, worker_id=WORKER, lease_seconds=60, max_attempts=3)
            assert claim.claimed, claim
            report = make_report(job_id, failed, not_applicable=("S5",) if name == "a" else ())
            assert runs.finish_succeeded(
                session=s,
                job_id=job_id,
                worker_id=WORKER,
                metrics={"tool_call_accuracy": 1.0},
                gate=report["gate"],
                artifacts=[],
                report=report,
            )
            # finish_succeeded stamps created_at = now; spread the reports over the last hours.
            s.execute(
                update(ComplianceReport)
                .where(ComplianceReport.job_id == job_id)
                .values(created_at=now - timedelta(hours=hours))
            )
            s.commit()
    api.create()  # queued, no report: never listed
    return ids


def _names(api: Harness, ids: dict[str, str], headers: dict[str, str] | None = None, **params: Any) -> list[str]:
    by_id = {v: k for k, v in ids.items()}
    r = api.client.get("/v1/compliance-reports", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return [by_id.get(row["job_id"], row["job_id"]) for row in r.json()["data"]]


def test_reports_are_stored_as_the_worker_stores_them(api: Harness, stored: dict[str, str]) -> None:
    body = api.client.get("/v1/compliance-reports", params={"limit": 100}).json()
    summaries = {row["job_id"]: row for row in body["data"]}
    for name, (score, passed, failed) in EXPECTED.items():
        row = summaries[stored[name]]
        assert (row["score"], row["gate_passed"], row["failed_checks"]) == (score, passed, failed), name
        job = api.client.get(f"/v1/bake-jobs/{stored[name]}").json()
        assert job["status"] == "succeeded" and job["gate"]["passed"] is passed, name
        report = api.client.get(f"/v1/bake-jobs/{stored[name]}/compliance").json()
        assert report["score"] == score and [c["id"] for c in report["checks"] if c["status"] == "fail"] == failed
        assert sorted(r["check"] for r in report["risk_register"]) == sorted(failed), name


def test_filters_return_exactly_the_expected_jobs(api: Harness, stored: dict[str, str]) -> None:
    assert _names(api, stored) == ["f", "e", "d", "c", "b", "a"]  # newest first
    assert _names(api, stored, gate="passed") == ["b", "a"]
    assert _names(api, stored, gate="failed") == ["f", "e", "d", "c"]
    assert _names(api, stored, min_score=0.9) == ["d", "b", "a"]
    assert _names(api, stored, min_score=0.9815) == ["b", "a"]  # inclusive
    assert _names(api, stored, max_score=0.8) == ["f", "e"]
    assert _names(api, stored, max_score=0.8148) == ["f", "e", "c"]  # inclusive
    assert _names(api, stored, min_score=0.8, max_score=0.95) == ["d", "c"]
    assert _names(api, stored, failed_check="S4") == ["f", "c"]
    assert _names(api, stored, failed_check="X1") == ["e"]
    assert _names(api, stored, failed_check="S1") == ["f"]
    assert _names(api, stored, failed_check="R2") == ["f", "e", "c"]
    assert _names(api, stored, failed_check="V1") == []
    assert _names(api, stored, gate="failed", failed_check="X4") == ["d"]
    assert _names(api, stored, gate="passed", failed_check="S4") == []
    since = (utcnow() - timedelta(minutes=150)).isoformat()
    assert _names(api, stored, created_after=since) == ["f", "e"]
    assert _names(api, stored, created_after=since, failed_check="S4") == ["f"]


def test_pagination_walks_every_report_once(api: Harness, stored: dict[str, str]) -> None:
    seen: list[str] = []
    pages: list[tuple[int, bool]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get("/v1/compliance-reports", params=params).json()
        seen += [row["job_id"] for row in page["data"]]
        pages.append((len(page["data"]), page["has_more"]))
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
        assert after == page["data"][-1]["job_id"]
    assert pages == [(2, True), (2, True), (2, False)]
    assert seen == [stored[n] for n in ("f", "e", "d", "c", "b", "a")]
    filtered = api.client.get("/v1/compliance-reports", params={"gate": "failed", "limit": 3}).json()
    assert [r["job_id"] for r in filtered["data"]] == [stored[n] for n in ("f", "e", "d")] and filtered["has_more"]
    rest = api.client.get(
        "/v1/compliance-reports", params={"gate": "failed", "limit": 3, "after": filtered["next_after"]}
    ).json()
    assert [r["job_id"] for r in rest["data"]] == [stored["c"]] and rest["has_more"] is False


def test_another_tenant_sees_none(api: Harness, stored: dict[str, str], tenants: tuple[str, str]) -> None:
    other = {"Authorization": f"Bearer key-{tenants[1]}"}
    assert _names(api, stored, headers=other) == []
    assert _names(api, stored, headers=other, gate="failed") == []
    assert _names(api, stored, headers=other, failed_check="S4") == []
    r = api.client.get(f"/v1/bake-jobs/{stored['c']}/compliance", headers=other)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    # A cursor from another tenant's report is refused, not used to leak an ordering.
    r = api.client.get("/v1/compliance-reports", params={"after": stored["c"]}, headers=other)
    assert r.status_code == 422, r.text

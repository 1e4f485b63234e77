"""The main API flows on real Postgres: create, read, list with pagination and filters, cancel,
idempotency, tenants and the compliance query. Each test has tenants of its own, so counts are exact
on the shared per-run database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from api.testing import MINIMAL_SPEC, Harness, api_harness
from models.base import utcnow

pytestmark = pytest.mark.integration


@pytest.fixture
def api(tmp_path: Path, pg_url: str) -> Iterator[Harness]:
    tenant, other = f"t{uuid.uuid4().hex[:10]}", f"o{uuid.uuid4().hex[:10]}"
    keys = f"{tenant}:key-{tenant},{other}:key-{other}"
    with api_harness(data_dir=tmp_path, database_url=pg_url, api_keys=keys) as harness:
        harness.client.headers["Authorization"] = f"Bearer key-{tenant}"
        harness.client.headers["X-Other-Tenant-Key"] = f"key-{other}"  # read by tests, ignored by the API
        yield harness


def _other(api: Harness) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.client.headers['X-Other-Tenant-Key']}"}


def test_create_get_list_paginate_and_filter(api: Harness) -> None:
    ids = [api.create({**MINIMAL_SPEC, "metadata": {"team": "adas" if i % 2 else "infra"}})["id"] for i in range(5)]
    assert api.queue.job_ids == ids
    assert api.queue.statuses_at_enqueue == ["queued"] * 5
    assert api.client.get(f"/v1/bake-jobs/{ids[0]}").json()["id"] == ids[0]

    seen, sizes, after = [], [], None
    while True:
        page = api.client.get("/v1/bake-jobs", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        sizes.append(len(page["data"]))
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert sizes == [2, 2, 1]
    assert seen == list(reversed(ids))

    adas = api.client.get("/v1/bake-jobs", params={"metadata.team": "adas"}).json()["data"]
    assert [j["id"] for j in adas] == [ids[3], ids[1]]
    api.set_job(ids[1], status="running")
    running = api.client.get("/v1/bake-jobs", params={"status": "running", "metadata.team": "adas"}).json()
    assert [j["id"] for j in running["data"]] == [ids[1]]


def test_cancel_and_tenant_isolation(api: Harness) -> None:
    job_id = api.create()["id"]
    assert api.client.get(f"/v1/bake-jobs/{job_id}", headers=_other(api)).status_code == 404
    assert api.client.get("/v1/bake-jobs", headers=_other(api)).json()["data"] == []
    assert api.client.post(f"/v1/bake-jobs/{job_id}/cancel", headers=_other(api)).status_code == 404
    r = api.client.post(f"/v1/bake-jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert api.client.get("/v1/bake-jobs", params={"status": "cancelled"}).json()["data"][0]["id"] == job_id


def test_idempotency_on_postgres(api: Harness) -> None:
    headers = {"Idempotency-Key": "k1"}
    first = api.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers)
    replay = api.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers)
    assert first.status_code == replay.status_code == 202
    assert replay.json() == first.json()
    reused = api.client.post("/v1/bake-jobs", json={**MINIMAL_SPEC, "profile": "quick"}, headers=headers)
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    other = api.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers={**headers, **_other(api)})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert len(api.queue.job_ids) == 2


def test_compliance_query_on_postgres(api: Harness) -> None:
    tenant = api.client.headers["Authorization"].removeprefix("Bearer key-")
    now = utcnow()
    a, b, c = (api.create()["id"] for _ in range(3))
    api.add_report(a, tenant=tenant, score=0.99, passed=True, created_at=now - timedelta(minutes=2))
    api.add_report(
        b, tenant=tenant, score=0.7, passed=False, failed=("S1", "S4"), created_at=now - timedelta(minutes=1)
    )
    api.add_report(c, tenant=tenant, score=0.9, passed=False, failed=("S14",), created_at=now)

    def ids(**params: object) -> list[str]:
        return [r["job_id"] for r in api.client.get("/v1/compliance-reports", params=params).json()["data"]]

    assert ids() == [c, b, a]
    assert ids(gate="passed") == [a]
    assert ids(failed_check="S1") == [b]
    assert ids(min_score=0.8, gate="failed") == [c]
    assert ids(limit=1, after=b) == [a]
    assert api.client.get(f"/v1/bake-jobs/{a}/compliance").json()["score"] == 0.99

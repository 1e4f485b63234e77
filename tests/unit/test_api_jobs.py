"""/v1/bake-jobs over HTTP on SQLite: create, validation, read, list, cancel, idempotency, tenants, events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from api.testing import MINIMAL_SPEC, Harness, api_harness
from models import IdempotencyKey, Job
from models.base import utcnow

PROBLEM = "application/problem+json"


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url) as harness:
        yield harness


def spec(**overrides: object) -> dict[str, object]:
    return {**MINIMAL_SPEC, **overrides}


# --- create -------------------------------------------------------------------------------


def test_create_returns_202_queued_and_enqueues_once_after_commit(api: Harness) -> None:
    r = api.client.post("/v1/bake-jobs", json=spec(metadata={"team": "adas"}, training={"seed": 7}))
    assert r.status_code == 202
    job = r.json()
    assert job["id"].startswith("bj_") and len(job["id"]) == 35
    assert job["object"] == "bake_job"
    assert job["status"] == "queued"
    assert job["seed"] == 7
    assert job["metadata"] == {"team": "adas"}
    assert job["spec"]["model"] == MINIMAL_SPEC["model"]
    assert job["spec"]["training"]["seed"] == 7
    assert job["progress"] == {"stage": None, "step": None, "total": None, "percent": 0.0, "eta_s": None}
    assert job["attempts"] == 0 and job["max_attempts"] == 3
    assert job["error"] is None and job["gate"] is None and job["artifacts"] == []
    assert r.headers["location"] == f"/v1/bake-jobs/{job['id']}"
    assert api.queue.job_ids == [job["id"]]
    # The enqueue saw the committed row, as a worker on another connection would.
    assert api.queue.statuses_at_enqueue == ["queued"]


def test_unknown_field_is_422_naming_the_field(api: Harness) -> None:
    r = api.client.post("/v1/bake-jobs", json=spec(colour="blue"))
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "validation_error"
    assert body["errors"][0]["field"] == "colour"
    assert body["detail"].startswith("colour:")
    assert api.queue.job_ids == []


def test_nested_field_path_is_dotted(api: Harness) -> None:
    tool = {"name": "bad name", "description": "d", "parameters": {"type": "object", "properties": {}}}
    body = api.client.post("/v1/bake-jobs", json=spec(tools=[tool])).json()
    assert body["errors"][0]["field"] == "tools.0.name"
    assert "must match" in body["errors"][0]["message"]


def test_bad_model_url_is_422_naming_model(api: Harness) -> None:
    r = api.client.post("/v1/bake-jobs", json=spec(model="http://example.com/model"))
    assert r.status_code == 422
    body = r.json()
    assert [e["field"] for e in body["errors"]] == ["model"]
    assert body["detail"].startswith("model:")


def test_negative_distill_top_k_is_422_naming_it(api: Harness) -> None:
    r = api.client.post("/v1/bake-jobs", json=spec(training={"distill_top_k": -1}))
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == ["training.distill_top_k"]
    assert api.queue.job_ids == []


def test_missing_model_is_422(api: Harness) -> None:
    body = api.client.post("/v1/bake-jobs", json={}).json()
    assert body["errors"] == [{"field": "model", "message": "Field required"}]


def test_malformed_json_is_422_invalid_json(api: Harness) -> None:
    r = api.client.post("/v1/bake-jobs", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "invalid_json"


def test_body_over_limit_is_413(tmp_path: Path, sqlite_url: str) -> None:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url, max_body_bytes=2048) as api:
        big = spec(irrelevant_examples=["x" * 100] * 50)
        r = api.client.post("/v1/bake-jobs", json=big)
        assert r.status_code == 413
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the byte count must catch it
            yield json.dumps(big).encode()

        r = api.client.post("/v1/bake-jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["code"] == "payload_too_large"
        assert api.queue.job_ids == []


def test_enqueue_failure_marks_job_failed_and_returns_503(api: Harness) -> None:
    api.queue.fail = True
    r = api.client.post("/v1/bake-jobs", json=spec())
    assert r.status_code == 503
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "queue_unavailable"
    job = api.client.get(f"/v1/bake-jobs/{body['job_id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "queue_unavailable"
    assert job["error"]["stage"] is None
    assert job["finished_at"] is not None


# --- read and list ------------------------------------------------------------------------


def test_get_and_unknown_job(api: Harness) -> None:
    job = api.create()
    assert api.client.get(f"/v1/bake-jobs/{job['id']}").json() == job
    r = api.client.get("/v1/bake-jobs/bj_nope")
    assert r.status_code == 404
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "not_found"


def test_list_paginates_newest_first_with_exact_counts(api: Harness) -> None:
    ids = [api.create()["id"] for _ in range(5)]
    seen: list[str] = []
    pages = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get("/v1/bake-jobs", params=params).json()
        pages.append((len(page["data"]), page["has_more"]))
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
        assert after == page["data"][-1]["id"]
    assert pages == [(2, True), (2, True), (1, False)]
    assert seen == list(reversed(ids))
    default = api.client.get("/v1/bake-jobs").json()
    assert len(default["data"]) == 5 and default["has_more"] is False


def test_list_limit_bounds_and_bad_cursor(api: Harness) -> None:
    assert api.client.get("/v1/bake-jobs", params={"limit": 0}).status_code == 422
    r = api.client.get("/v1/bake-jobs", params={"limit": 101})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "limit"
    r = api.client.get("/v1/bake-jobs", params={"after": "bj_missing"})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_cursor"


def test_list_filters_by_status_and_metadata(api: Harness) -> None:
    a = api.create(spec(metadata={"team": "adas", "env": "prod"}))["id"]
    b = api.create(spec(metadata={"team": "adas", "env": "dev"}))["id"]
    c = api.create(spec(metadata={"team": "infotainment"}))["id"]
    api.set_job(b, status="running")

    def ids(**params: str) -> list[str]:
        return [j["id"] for j in api.client.get("/v1/bake-jobs", params=params).json()["data"]]

    assert ids(status="queued") == [c, a]
    assert ids(status="running") == [b]
    assert ids(**{"metadata.team": "adas"}) == [b, a]
    assert ids(**{"metadata.team": "adas", "metadata.env": "prod"}) == [a]
    assert ids(**{"metadata.team": "adas"}, status="queued") == [a]
    assert ids(**{"metadata.team": "nobody"}) == []
    assert api.client.get("/v1/bake-jobs", params={"status": "exploded"}).status_code == 422


# --- cancel -------------------------------------------------------------------------------


def test_cancel_queued_is_immediate_and_idempotent(api: Harness) -> None:
    job_id = api.create()["id"]
    r = api.client.post(f"/v1/bake-jobs/{job_id}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    again = api.client.post(f"/v1/bake-jobs/{job_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_running_asks_the_worker(api: Harness) -> None:
    job_id = api.create()["id"]
    api.set_job(job_id, status="running", stage="baking_tools", started_at=utcnow())
    r = api.client.post(f"/v1/bake-jobs/{job_id}/cancel")
    assert r.json()["status"] == "cancelling"
    assert r.json()["finished_at"] is None
    with api.session() as s:
        assert s.get(Job, job_id).cancel_requested is True  # type: ignore[union-attr]


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_cancel_finished_job_is_409(api: Harness, status: str) -> None:
    job_id = api.create()["id"]
    api.set_job(job_id, status=status, finished_at=utcnow())
    r = api.client.post(f"/v1/bake-jobs/{job_id}/cancel")
    assert r.status_code == 409
    assert r.json()["code"] == "job_not_cancellable"
    assert api.client.get(f"/v1/bake-jobs/{job_id}").json()["status"] == status


# --- idempotency --------------------------------------------------------------------------


def test_idempotent_replay_returns_the_same_job_and_enqueues_once(api: Harness) -> None:
    headers = {"Idempotency-Key": "req-1"}
    first = api.client.post("/v1/bake-jobs", json=spec(metadata={"a": "1"}), headers=headers)
    # Same body, keys in another order: the canonical hash is the same.
    second = api.client.post("/v1/bake-jobs", json={"metadata": {"a": "1"}, **MINIMAL_SPEC}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert api.queue.job_ids == [first.json()["id"]]
    assert len(api.client.get("/v1/bake-jobs").json()["data"]) == 1


def test_idempotency_key_reused_with_other_body_is_422(api: Harness) -> None:
    headers = {"Idempotency-Key": "req-2"}
    api.create(headers=headers)
    r = api.client.post("/v1/bake-jobs", json=spec(profile="quick"), headers=headers)
    assert r.status_code == 422
    assert r.json()["code"] == "idempotency_key_reused"
    assert len(api.queue.job_ids) == 1


def test_idempotency_key_in_flight_is_409(api: Harness) -> None:
    from core.idempotency import request_hash
    from core.spec import BakeJobSpec

    payload_hash = request_hash(BakeJobSpec.model_validate(MINIMAL_SPEC).model_dump(mode="json", exclude_unset=True))
    with api.session() as s:
        s.add(
            IdempotencyKey(
                tenant="default",
                key="req-3",
                request_hash=payload_hash,
                status_code=None,
                created_at=utcnow(),
                expires_at=utcnow() + timedelta(hours=24),
            )
        )
    r = api.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers={"Idempotency-Key": "req-3"})
    assert r.status_code == 409
    assert r.json()["code"] == "idempotency_request_in_flight"
    assert api.queue.job_ids == []


def test_expired_idempotency_key_is_replaced(api: Harness) -> None:
    first = api.create(headers={"Idempotency-Key": "req-4"})
    with api.session() as s:
        row = s.get(IdempotencyKey, ("default", "req-4"))
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    second = api.create(spec(profile="quick"), headers={"Idempotency-Key": "req-4"})
    assert second["id"] != first["id"]
    assert len(api.queue.job_ids) == 2


def test_idempotency_keys_are_per_tenant(tmp_path: Path, sqlite_url: str) -> None:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url, api_keys="acme:ka,globex:kb") as api:
        a = api.create(headers={"Authorization": "Bearer ka", "Idempotency-Key": "same"})
        b = api.create(spec(profile="quick"), headers={"Authorization": "Bearer kb", "Idempotency-Key": "same"})
        assert a["id"] != b["id"]


def test_queue_failure_releases_the_idempotency_key(api: Harness) -> None:
    api.queue.fail = True
    headers = {"Idempotency-Key": "req-5"}
    assert api.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers).status_code == 503
    api.queue.fail = False
    retry = api.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers)
    assert retry.status_code == 202
    assert api.queue.job_ids == [retry.json()["id"]]


# --- auth and tenants ---------------------------------------------------------------------


def test_tenants_are_isolated(tmp_path: Path, sqlite_url: str) -> None:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url, api_keys="acme:key-a") as api:
        api.add_api_key("globex", "key-b")
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        job_a = api.create(headers=a)["id"]
        job_b = api.create(headers=b)["id"]
        assert [j["id"] for j in api.client.get("/v1/bake-jobs", headers=a).json()["data"]] == [job_a]
        assert [j["id"] for j in api.client.get("/v1/bake-jobs", headers=b).json()["data"]] == [job_b]
        for path in ("", "/events", "/artifacts", "/compliance"):
            r = api.client.get(f"/v1/bake-jobs/{job_a}{path}", headers=b)
            assert r.status_code == 404, path
            assert r.json()["code"] == "not_found"
        assert api.client.post(f"/v1/bake-jobs/{job_a}/cancel", headers=b).status_code == 404
        # another tenant's job id is not a usable cursor either
        assert api.client.get("/v1/bake-jobs", params={"after": job_a}, headers=b).status_code == 422


def test_auth_required_once_keys_exist(tmp_path: Path, sqlite_url: str) -> None:
    with api_harness(data_dir=tmp_path, database_url=sqlite_url) as api:
        assert api.client.get("/v1/bake-jobs").status_code == 200  # no keys at all: open, tenant "default"
        api.add_api_key("acme", "secret", revoked=True)
        r = api.client.get("/v1/bake-jobs")
        assert r.status_code == 401
        assert r.headers["content-type"] == PROBLEM
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["code"] == "unauthorized"
        assert api.client.get("/v1/bake-jobs", headers={"Authorization": "Bearer secret"}).status_code == 401
        assert api.client.get("/v1/bake-jobs", headers={"Authorization": "Basic eDp5"}).status_code == 401
        api.add_api_key("acme", "live")
        assert api.client.get("/v1/bake-jobs", headers={"Authorization": "Bearer live"}).status_code == 200
        for path in ("/healthz", "/metrics"):
            assert api.client.get(path).status_code == 200


# --- events -------------------------------------------------------------------------------


def test_events_json_pages_with_after(api: Harness) -> None:
    job_id = api.create()["id"]
    ids = [api.add_event(job_id, f"m{i}", stage="fetching") for i in range(3)]
    page = api.client.get(f"/v1/bake-jobs/{job_id}/events", params={"limit": 2}).json()
    assert [e["id"] for e in page["data"]] == ids[:2] and page["has_more"] is True
    assert set(page["data"][0]) == {"id", "created_at", "level", "type", "stage", "message", "data"}
    rest = api.client.get(f"/v1/bake-jobs/{job_id}/events", params={"after": ids[1]}).json()
    assert [e["message"] for e in rest["data"]] == ["m2"] and rest["has_more"] is False


def test_events_stream_as_sse_until_terminal(api: Harness) -> None:
    job_id = api.create()["id"]
    first = api.add_event(job_id, "fetching model", stage="fetching")
    api.add_event(job_id, "loss", type="metrics", data={"loss": 1.5})
    api.set_job(job_id, status="succeeded", finished_at=utcnow())
    headers = {"Accept": "text/event-stream"}
    with api.client.stream("GET", f"/v1/bake-jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip() and not b.startswith(":")]
    assert [line for b in blocks for line in b.splitlines() if line.startswith("event:")] == [
        "event: message",
        "event: metrics",
        "event: end",
    ]
    assert json.loads(blocks[1].split("data: ", 1)[1])["data"] == {"loss": 1.5}
    with api.client.stream("GET", f"/v1/bake-jobs/{job_id}/events", params={"after": first}, headers=headers) as r:
        assert "fetching model" not in "".join(r.iter_text())

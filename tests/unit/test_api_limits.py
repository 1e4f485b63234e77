"""Per-tenant request rate and active-job cap, model source checks at submission, JSON depth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.limits import RateLimiter, json_depth_exceeds
from api.testing import MINIMAL_SPEC, Harness, api_harness

PROBLEM = "application/problem+json"


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    with api_harness(
        data_dir=tmp_path, database_url=sqlite_url, api_keys="acme:ka,globex:kb", rate_limit="3/minute"
    ) as harness:
        yield harness


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- request rate ---------------------------------------------------------------------------


def test_over_the_rate_is_429_with_retry_after_per_tenant(api: Harness) -> None:
    for _ in range(3):
        assert api.client.get("/v1/bake-jobs", headers=as_("ka")).status_code == 200
    r = api.client.get("/v1/bake-jobs", headers=as_("ka"))
    assert r.status_code == 429
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "rate_limited" and "3/minute" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # Another tenant has a window of its own.
    assert api.client.get("/v1/bake-jobs", headers=as_("kb")).status_code == 200


def test_health_and_metrics_are_not_limited(api: Harness) -> None:
    for _ in range(5):
        assert api.client.get("/v1/bake-jobs", headers=as_("ka")).status_code in (200, 429)
    for path in ("/healthz", "/readyz", "/metrics"):
        for _ in range(5):
            assert api.client.get(path).status_code == 200, path


def test_unauthenticated_requests_are_401_not_counted(api: Harness) -> None:
    for _ in range(5):
        assert api.client.get("/v1/bake-jobs").status_code == 401
    assert api.client.get("/v1/bake-jobs", headers=as_("ka")).status_code == 200


def test_limiter_fails_open_when_its_store_is_down() -> None:
    limiter = RateLimiter("1/minute", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert limiter.retry_after("t") is None
    assert limiter.retry_after("t") is None


@pytest.mark.integration
def test_limiter_shares_counts_through_redis(redis_url: str) -> None:
    one, two = RateLimiter("2/minute", redis_url), RateLimiter("2/minute", redis_url)  # two API replicas
    assert one.retry_after("acme") is None
    assert two.retry_after("acme") is None
    wait = one.retry_after("acme")
    assert wait is not None and 1 <= wait <= 60


def test_storage_defaults_to_the_broker_redis_or_memory(tmp_path: Path) -> None:
    from core.settings import Settings

    assert Settings(data_dir=tmp_path).resolved_rate_limit_storage_url == "memory://"
    redis = Settings(data_dir=tmp_path, broker_url="redis://r:6379/0")
    assert redis.resolved_rate_limit_storage_url == "redis://r:6379/0"
    explicit = Settings(data_dir=tmp_path, broker_url="redis://r/0", rate_limit_storage_url="memory://")
    assert explicit.resolved_rate_limit_storage_url == "memory://"


def test_bad_rate_limit_fails_at_start(tmp_path: Path) -> None:
    from core.settings import Settings

    with pytest.raises(ValueError, match="BAKEHOUSE_RATE_LIMIT"):
        Settings(data_dir=tmp_path, rate_limit="lots")


# --- active jobs per tenant -----------------------------------------------------------------


@pytest.fixture
def capped(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    with api_harness(
        data_dir=tmp_path, database_url=sqlite_url, api_keys="acme:ka,globex:kb", max_active_jobs_per_tenant=2
    ) as harness:
        yield harness


def test_job_over_the_active_cap_is_429(capped: Harness) -> None:
    first = capped.create(headers=as_("ka"))
    capped.create(headers=as_("ka"))
    r = capped.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=as_("ka"))
    assert r.status_code == 429
    assert r.headers["content-type"] == PROBLEM and int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["code"] == "too_many_active_jobs"
    assert "2 active bake jobs" in body["detail"] and body["limit"] == 2
    assert len(capped.queue.job_ids) == 2
    # Other tenants are not affected; a finished job frees a slot.
    assert capped.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=as_("kb")).status_code == 202
    capped.set_job(first["id"], status="succeeded")
    assert capped.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=as_("ka")).status_code == 202


def test_idempotent_replay_at_the_cap_is_a_replay(capped: Harness) -> None:
    headers = {**as_("ka"), "Idempotency-Key": "k-1"}
    job = capped.create(headers=headers)
    capped.create(headers=as_("ka"))
    replay = capped.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers)
    assert replay.status_code == 202 and replay.json()["id"] == job["id"]
    assert replay.headers["idempotent-replayed"] == "true"


def test_refused_for_the_cap_releases_the_idempotency_key(capped: Harness) -> None:
    a, _ = capped.create(headers=as_("ka")), capped.create(headers=as_("ka"))
    headers = {**as_("ka"), "Idempotency-Key": "k-2"}
    assert capped.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers).status_code == 429
    capped.set_job(a["id"], status="cancelled")
    retry = capped.client.post("/v1/bake-jobs", json=MINIMAL_SPEC, headers=headers)
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers


# --- model sources at submission ------------------------------------------------------------


def spec(**overrides: Any) -> dict[str, Any]:
    return {**MINIMAL_SPEC, **overrides}


@pytest.fixture
def plain(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    roots = tmp_path / "models"
    (roots / "tiny").mkdir(parents=True)
    with api_harness(
        data_dir=tmp_path / "data", database_url=sqlite_url, model_roots=str(roots), model_buckets="models"
    ) as harness:
        yield harness


def test_allowed_sources_are_accepted(plain: Harness, tmp_path: Path) -> None:
    plain.create(spec(model=f"file://{tmp_path / 'models' / 'tiny'}"))
    plain.create(spec(model="s3://models/tiny/"))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("file:///etc", "outside the allowed model roots"),
        ("s3://someone-else/tiny/", "bucket 'someone-else' is not allowed"),
        ("http://example.com/model", "must be bakehouse://NAME"),
    ],
)
def test_refused_sources_are_422_naming_model(plain: Harness, model: str, message: str) -> None:
    r = plain.client.post("/v1/bake-jobs", json=spec(model=model))
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "validation_error"
    assert [e["field"] for e in body["errors"]] == ["model"]
    assert body["detail"].startswith("model: ") and message in body["detail"]
    assert plain.queue.job_ids == []


# --- JSON depth -----------------------------------------------------------------------------


def test_json_depth_scan() -> None:
    assert not json_depth_exceeds(b'{"a": [1, {"b": []}]}', 4)
    assert json_depth_exceeds(b'{"a": [1, {"b": [[]]}]}', 4)
    assert not json_depth_exceeds(b'{"a": "[[[[[[[[ \\" {{{{"}', 1)  # brackets inside strings do not count
    assert json_depth_exceeds(b"[" * 1_000_000, 32)


def test_deep_free_form_value_is_422(plain: Harness) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        deep = {"type": "array", "items": deep}
    tool = {"name": "t", "description": "d", "parameters": {"type": "object", "properties": {"x": deep}}}
    r = plain.client.post("/v1/bake-jobs", json=spec(tools=[tool]))
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "tools.0.parameters"
    assert "nests deeper than 16 levels" in r.json()["errors"][0]["message"]

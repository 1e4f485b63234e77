"""core.runs: claim, lease, heartbeat, attempt cap; a zombie worker cannot overwrite the outcome."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import runs
from core.db import get_engine, get_sessionmaker
from models import Artifact, Base, ComplianceReport, Job, JobEvent
from models.base import utcnow

ROOT = Path(__file__).resolve().parents[2]


def make_schema(url: str) -> None:
    # Real migrations once they exist; the ORM metadata until then.
    if (ROOT / "migrations" / "env.py").is_file():
        from core.db import upgrade_database

        upgrade_database(url)
    else:
        Base.metadata.create_all(get_engine(url))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
        make_schema(url)
        return url
    if (ROOT / "migrations" / "env.py").is_file():
        return str(request.getfixturevalue("pg_url"))
    return str(request.getfixturevalue("pg_metadata_url"))


@pytest.fixture(scope="session")
def pg_metadata_url() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_ADMIN_URL, port_open, service_missing

    if not port_open("127.0.0.1", 5432):
        service_missing("PostgreSQL (127.0.0.1:5432)", "port closed")
    name = f"bakehouse_runs_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    Base.metadata.create_all(get_engine(url))
    yield url
    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def new_job(url: str, **values: object) -> str:
    job_id = "bj_" + uuid.uuid4().hex
    with get_sessionmaker(url)() as s:
        s.add(Job(id=job_id, tenant="t1", status="queued", spec={"model": "file:///m"}, seed=0, **values))
        s.commit()
    return job_id


def session(url: str) -> Session:
    return get_sessionmaker(url)()


def job(url: str, job_id: str) -> Job:
    with session(url) as s:
        found = s.get(Job, job_id)
        assert found is not None
        return found


def expire_lease(url: str, job_id: str) -> None:
    with session(url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()


def claim(url: str, job_id: str, worker: str, max_attempts: int = 3) -> runs.ClaimOutcome:
    with session(url) as s:
        return runs.claim_job(session=s, job_id=job_id, worker_id=worker, lease_seconds=30, max_attempts=max_attempts)


def test_claim_queued_job_takes_lease_and_counts_attempt(db_url: str) -> None:
    job_id = new_job(db_url)
    outcome = claim(db_url, job_id, "w1")
    assert outcome.claimed and outcome.attempts == 1 and outcome.spec == {"model": "file:///m"}
    row = job(db_url, job_id)
    assert (row.status, row.lease_owner, row.attempts) == ("running", "w1", 1)
    assert row.started_at is not None and row.lease_expires_at is not None
    assert row.lease_expires_at > utcnow() + timedelta(seconds=25)


def test_live_lease_and_terminal_and_missing_are_skipped(db_url: str) -> None:
    job_id = new_job(db_url)
    assert claim(db_url, job_id, "w1").claimed
    assert claim(db_url, job_id, "w2").status == "leased"
    assert job(db_url, job_id).attempts == 1
    with session(db_url) as s:
        assert runs.finish_cancelled(session=s, job_id=job_id, worker_id="w1")
    assert claim(db_url, job_id, "w2").status == "terminal"
    assert claim(db_url, "bj_" + "0" * 32, "w2").status == "missing"


def test_stale_lease_is_taken_over_and_zombie_cannot_write(db_url: str) -> None:
    job_id = new_job(db_url)
    assert claim(db_url, job_id, "zombie").claimed
    started = job(db_url, job_id).started_at
    expire_lease(db_url, job_id)
    outcome = claim(db_url, job_id, "w2")
    assert outcome.claimed and outcome.attempts == 2
    assert job(db_url, job_id).started_at == started
    with session(db_url) as s, pytest.raises(runs.LeaseLost):
        runs.heartbeat(session=s, job_id=job_id, worker_id="zombie", lease_seconds=30)
    with session(db_url) as s:
        assert not runs.set_stage(session=s, job_id=job_id, worker_id="zombie", stage="optimizing")
        assert not runs.finish_failed(session=s, job_id=job_id, worker_id="zombie", code="x", message="m", stage=None)
        assert not runs.finish_succeeded(
            session=s,
            job_id=job_id,
            worker_id="zombie",
            metrics={},
            gate=None,
            artifacts=[runs.StoredArtifact("a", 1, "0" * 64, "k")],
            report=None,
        )
        assert runs.finish_succeeded(
            session=s, job_id=job_id, worker_id="w2", metrics={"m": 1}, gate=None, artifacts=[], report=None
        )
        assert not runs.finish_cancelled(session=s, job_id=job_id, worker_id="zombie")
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
    row = job(db_url, job_id)
    assert (row.status, row.metrics, row.error, row.attempts) == ("succeeded", {"m": 1}, None, 2)


def test_the_jobs_own_attempt_cap_wins_over_a_more_generous_worker(db_url: str) -> None:
    job_id = new_job(db_url, max_attempts=1)
    assert claim(db_url, job_id, "w1", max_attempts=5).claimed
    expire_lease(db_url, job_id)
    assert claim(db_url, job_id, "w2", max_attempts=5).status == "exhausted"
    row = job(db_url, job_id)
    assert row.status == "failed" and row.attempts == 1
    assert row.error is not None and "1 of 1 attempts" in row.error["message"]


def test_attempt_cap_fails_with_worker_lost_at_last_stage(db_url: str) -> None:
    job_id = new_job(db_url)
    for attempt, worker in enumerate(["w1", "w2"], start=1):
        outcome = claim(db_url, job_id, worker, max_attempts=2)
        assert outcome.claimed and outcome.attempts == attempt
        with session(db_url) as s:
            assert runs.set_stage(session=s, job_id=job_id, worker_id=worker, stage="baking_tools")
        expire_lease(db_url, job_id)
    assert claim(db_url, job_id, "w3", max_attempts=2).status == "exhausted"
    row = job(db_url, job_id)
    assert row.status == "failed" and row.attempts == 2 and row.finished_at is not None
    assert row.error is not None
    assert (row.error["code"], row.error["stage"]) == ("worker_lost", "baking_tools")
    assert claim(db_url, job_id, "w4", max_attempts=2).status == "terminal"


def test_heartbeat_extends_lease_and_reports_cancel(db_url: str) -> None:
    job_id = new_job(db_url)
    assert claim(db_url, job_id, "w1").claimed
    before = job(db_url, job_id).lease_expires_at
    assert before is not None
    with session(db_url) as s:
        assert runs.heartbeat(session=s, job_id=job_id, worker_id="w1", lease_seconds=300) is False
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True, status="cancelling"))
        s.commit()
        assert runs.heartbeat(session=s, job_id=job_id, worker_id="w1", lease_seconds=300) is True
    after = job(db_url, job_id).lease_expires_at
    assert after is not None and after > before + timedelta(seconds=200)


def test_cancel_requested_before_claim_keeps_cancelling(db_url: str) -> None:
    job_id = new_job(db_url, cancel_requested=True)
    outcome = claim(db_url, job_id, "w1")
    assert outcome.claimed and outcome.cancel_requested
    assert job(db_url, job_id).status == "cancelling"


def test_progress_events_and_report(db_url: str) -> None:
    job_id = new_job(db_url)
    assert claim(db_url, job_id, "w1").claimed
    report = {
        "score": 0.8,
        "checks": [
            {"id": "S1", "status": "fail"},
            {"id": "S2", "status": "pass"},
            {"id": "S4", "status": "fail"},
            {"id": "X1", "status": "not_applicable"},
        ],
    }
    with session(db_url) as s:
        assert runs.set_stage(session=s, job_id=job_id, worker_id="w1", stage="baking_tools")
        assert runs.set_progress(
            session=s, job_id=job_id, worker_id="w1", stage="baking_tools", step=5, total=20, eta_s=12.345
        )
        runs.record_event(session=s, job_id=job_id, type="metrics", stage="baking_tools", data={"loss": 1.5})
    assert job(db_url, job_id).progress == {
        "stage": "baking_tools",
        "step": 5,
        "total": 20,
        "percent": 25.0,
        "eta_s": 12.3,
    }
    with session(db_url) as s:
        assert runs.finish_succeeded(
            session=s,
            job_id=job_id,
            worker_id="w1",
            metrics={"speedup": 3.1},
            gate={"passed": False, "score": 0.8},
            artifacts=[runs.StoredArtifact("model.safetensors", 10, "a" * 64, f"jobs/{job_id}/artifacts/m")],
            report=report,
        )
        rep = s.get(ComplianceReport, job_id)
        assert rep is not None
        assert (rep.failed_checks, rep.gate_passed, rep.score, rep.tenant) == (",S1,S4,", False, 0.8, "t1")
        names = s.scalars(select(Artifact.name).where(Artifact.job_id == job_id)).all()
        assert names == ["model.safetensors"]
        types = s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        assert types == ["message", "metrics", "message"]
    row = job(db_url, job_id)
    assert row.status == "succeeded" and row.lease_expires_at is None and row.finished_at is not None


def test_orphan_candidates_lists_active_jobs_with_wait(db_url: str) -> None:
    live, stale, queued = new_job(db_url), new_job(db_url), new_job(db_url)
    assert claim(db_url, live, "w1").claimed and claim(db_url, stale, "w1").claimed
    expire_lease(db_url, stale)
    with session(db_url) as s:
        found = dict(runs.orphan_candidates(session=s, queue="bake"))
    assert queued not in found
    assert found[stale] == 0.0 and 20 < found[live] <= 30


def test_sweeper_queries_see_only_their_own_queue(db_url: str) -> None:
    mine, theirs = f"q-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    long_ago = utcnow() - timedelta(minutes=5)
    old_mine, old_theirs = (
        new_job(db_url, queue=mine, created_at=long_ago),
        new_job(db_url, queue=theirs, created_at=long_ago),
    )
    fresh_mine = new_job(db_url, queue=mine)
    stale_mine, stale_theirs = new_job(db_url, queue=mine), new_job(db_url, queue=theirs)
    for job_id in (stale_mine, stale_theirs):
        assert claim(db_url, job_id, "w1").claimed
        expire_lease(db_url, job_id)
    with session(db_url) as s:
        # Queued a lease ago or more, in this queue only: a fresh job's message may be on its way.
        assert runs.waiting_jobs(session=s, queue=mine, older_than_s=60) == [old_mine]
        assert runs.waiting_jobs(session=s, queue=theirs, older_than_s=60) == [old_theirs]
        stale = [job_id for job_id, _ in runs.stale_jobs(session=s, queue=mine)]
        candidates = dict(runs.orphan_candidates(session=s, queue=mine))
    assert stale_mine in stale and stale_theirs not in stale
    assert stale_mine in candidates and stale_theirs not in candidates
    assert fresh_mine not in candidates  # queued jobs are not orphans: nobody claimed them


def test_a_claimed_job_is_fetching_and_a_worker_lost_before_any_stage_names_it(db_url: str) -> None:
    job_id = new_job(db_url)
    assert job(db_url, job_id).stage is None
    assert claim(db_url, job_id, "w1", max_attempts=1).claimed
    assert (job(db_url, job_id).status, job(db_url, job_id).stage) == ("running", runs.FIRST_STAGE)
    expire_lease(db_url, job_id)  # w1 died before it entered a stage of its own
    assert claim(db_url, job_id, "w2", max_attempts=1).status == "exhausted"
    row = job(db_url, job_id)
    assert row.error is not None and (row.error["code"], row.error["stage"]) == ("worker_lost", "fetching")

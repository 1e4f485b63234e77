"""Fault injection against real processes: Celery workers (SIGKILL), a private redis-server,
the shared Postgres cluster (a brief restart) and SeaweedFS, while fake-bake jobs run.

Every test counts its own jobs from the database and the worker logs, prints a table
(submitted / succeeded / failed / cancelled / lost / completed twice / stuck / retried) and
asserts on it. The tables are repeated in pytest's terminal summary.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.pool import NullPool

from core.db import get_sessionmaker
from core.runs import TERMINAL
from models import Artifact, Job, JobEvent
from tests.conftest import PG_ADMIN_URL, free_port, port_open, service_missing
from tests.integration.conftest import (  # noqa: F401 - fixtures and the report hook, re-exported
    Proc,
    api_server,
    celery_worker,
    processes,
    pytest_runtest_makereport,
    wait_until,
)

FAKE_APP = "tests.faults.fake_worker"
TENANT = "faults"
TABLES: list[str] = []


# ---- a private Redis --------------------------------------------------------------------------


class RedisServer:
    """redis-server on a free port with an fsync-always AOF: a Redis broker should be configured
    durable, or a crash loses queued messages (the job rows survive, not the deliveries, and the
    workers' sweepers must re-send them). `persistent=False` is that crash-prone set-up."""

    def __init__(self, data: Path, *, persistent: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server", "the binary is not installed (apt-get install redis-server)")
            raise AssertionError("unreachable")
        self.binary, self.data, self.port = binary, data, free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data)]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        args += ["--save", "", "--protected-mode", "no"]
        with open(self.data / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open("127.0.0.1", self.port, 0.2), 20, f"redis-server on {self.port}", 0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    yield from _redis(tmp_path, persistent=True)


@pytest.fixture
def forgetful_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with no persistence at all: a restart loses every queued message."""
    yield from _redis(tmp_path, persistent=False)


def _redis(tmp_path: Path, *, persistent: bool) -> Iterator[RedisServer]:
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- the shared Postgres cluster --------------------------------------------------------------

PG_STOP_CMD = os.environ.get("BAKEHOUSE_TEST_PG_STOP_CMD", "pg_ctlcluster 15 main stop --mode fast")
PG_START_CMD = os.environ.get("BAKEHOUSE_TEST_PG_START_CMD", "pg_ctlcluster 15 main start")


def _admin_engine() -> Any:
    from sqlalchemy import create_engine

    # No pool: a pooled admin connection would be dead after the restart this suite causes.
    return create_engine(
        PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 2}
    )


def _pg_answers() -> bool:
    from sqlalchemy import text

    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def faults_db() -> Iterator[str]:
    """A database of this run's own on the shared cluster, migrated, dropped at the end."""
    from sqlalchemy import text

    from core.db import get_engine, upgrade_database

    if not port_open("127.0.0.1", 5432):
        service_missing("PostgreSQL (127.0.0.1:5432)", "port closed")
    name = f"bakehouse_faults_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade_database(url)
        yield url
    finally:
        get_engine(url).dispose()
        if not _pg_answers():  # a failed restart test: bring the cluster back before dropping
            subprocess.run(shlex.split(PG_START_CMD), timeout=60, capture_output=True)
            wait_until(_pg_answers, 30, "PostgreSQL to answer", interval=0.2)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def bounce_postgres() -> Iterator[Callable[[float], float]]:
    """Stop the cluster (fast mode: sessions are cut), keep it down `hold_s`, start it; returns
    the seconds it did not answer. Whatever happens in the test, the cluster is started again at
    teardown: other work on this machine shares it."""
    stop_cmd, start_cmd = shlex.split(PG_STOP_CMD), shlex.split(PG_START_CMD)
    if shutil.which(stop_cmd[0]) is None or shutil.which(start_cmd[0]) is None:
        why = f"{stop_cmd[0]!r} is not on PATH (set BAKEHOUSE_TEST_PG_STOP_CMD and BAKEHOUSE_TEST_PG_START_CMD)"
        service_missing("PostgreSQL restart", why)

    def bounce(hold_s: float) -> float:
        started = time.monotonic()
        try:
            subprocess.run(stop_cmd, check=True, timeout=60, capture_output=True)
            time.sleep(hold_s)
        finally:
            subprocess.run(start_cmd, check=True, timeout=60, capture_output=True)
        wait_until(_pg_answers, 30, "PostgreSQL to answer after the restart", interval=0.1)
        return time.monotonic() - started

    try:
        yield bounce
    finally:
        if not _pg_answers():
            subprocess.run(start_cmd, timeout=60, capture_output=True)
            wait_until(_pg_answers, 30, "PostgreSQL to answer after the teardown start", interval=0.2)


# ---- jobs -----------------------------------------------------------------------------------


def fake_spec(**metadata: str) -> dict[str, Any]:
    """A valid job spec; the fake bake reads only `metadata` (its timing)."""
    return {"model": "bakehouse://smollm2-135m-instruct", "profile": "quick", "device": "cpu", "metadata": metadata}


def submit_direct(env: dict[str, str], spec: dict[str, Any], n: int) -> list[str]:
    """What POST /v1/bake-jobs does, without the API: commit the row, then enqueue its id."""
    from core.jobs import create_job
    from core.queue import enqueue_bake
    from core.spec import BakeJobSpec

    ids = []
    with get_sessionmaker(env["BAKEHOUSE_DATABASE_URL"])() as s:
        for _ in range(n):
            job = create_job(
                session=s,
                spec=BakeJobSpec.model_validate(spec),
                tenant=TENANT,
                max_attempts=3,
                queue=env["BAKEHOUSE_QUEUE_NAME"],
            )
            s.commit()
            ids.append(job.id)
    for job_id in ids:
        enqueue_bake(broker_url=env["BAKEHOUSE_BROKER_URL"], queue=env["BAKEHOUSE_QUEUE_NAME"], job_id=job_id)
    return ids


def fault_env(tmp_path: Path, db_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """A deployment of its own (data dir, queue), a local artifact store unless overridden."""
    from tests.integration.conftest import service_env

    overrides = {
        "BAKEHOUSE_DATABASE_URL": db_url,
        "BAKEHOUSE_BROKER_URL": broker_url,
        "BAKEHOUSE_STORAGE_URL": f"file://{tmp_path / 'store'}",
        "FAULTS_LEDGER": str(tmp_path / "ledger"),
    }
    return service_env(tmp_path, **{**overrides, **extra})


def jobs_by_id(db_url: str, ids: list[str]) -> dict[str, Job]:
    with get_sessionmaker(db_url)() as s:
        return {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def wait_for_job(db_url: str, what: str, check: Callable[[Job], bool], ids: list[str], timeout: float = 60) -> Job:
    """The first of `ids` whose row satisfies `check`."""
    found: list[Job] = []

    def any_matches() -> bool:
        found[:] = [j for j in jobs_by_id(db_url, ids).values() if check(j)]
        return bool(found)

    wait_until(any_matches, timeout, what, interval=0.1)
    return found[0]


def wait_terminal(db_url: str, ids: list[str], timeout: float) -> None:
    """Until every job is terminal or `timeout` passes; a database that is briefly away is waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = jobs_by_id(db_url, ids)
            if len(rows) == len(ids) and all(j.status in TERMINAL for j in rows.values()):
                return
        except Exception:  # the database restarting under the fault test
            pass
        time.sleep(0.3)


def worker_pid(job: Job) -> int | None:
    # worker ids are "<host>:<pid>:<nonce>" (worker.runner.default_worker_id)
    parts = (job.lease_owner or "").split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


# ---- counting -------------------------------------------------------------------------------


@dataclass
class Tally:
    title: str
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: int = 0  # submitted, but no row
    completed_twice: int = 0  # more than one recorded success, or duplicated artifact rows
    stuck: int = 0  # not terminal when the test stopped waiting
    retried: int = 0  # attempts > 1
    # "finished succeeded" lines across all worker logs: must equal `succeeded`, which also
    # proves the logs were read (a zero here would make the log half of completed_twice vacuous).
    logged_successes: int = 0
    notes: list[str] = field(default_factory=list)

    COLUMNS = ("submitted", "succeeded", "failed", "cancelled", "lost", "completed_twice", "stuck", "retried")

    def table(self) -> str:
        widths = [max(len(c), 4) for c in self.COLUMNS]
        head = "  ".join(c.rjust(w) for c, w in zip(self.COLUMNS, widths, strict=True))
        row = "  ".join(str(getattr(self, c)).rjust(w) for c, w in zip(self.COLUMNS, widths, strict=True))
        lines = [f"[faults] {self.title}", head, row, *(f"  {n}" for n in self.notes)]
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in self.COLUMNS}


def tally(title: str, db_url: str, ids: list[str], workers: list[Proc]) -> Tally:
    """Count outcomes from the rows, the events and every worker's full log."""
    logs = "".join(p.log_path.read_text(errors="replace") for p in workers if p.log_path.exists())
    t = Tally(title, submitted=len(ids))
    with get_sessionmaker(db_url)() as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        for job_id in ids:
            job = rows.get(job_id)
            if job is None:
                t.lost += 1
                continue
            t.succeeded += job.status == "succeeded"
            t.failed += job.status == "failed"
            t.cancelled += job.status == "cancelled"
            t.stuck += job.status not in TERMINAL
            t.retried += job.attempts > 1
            successes = s.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.message.like("succeeded%"))
            ).all()
            names = s.scalars(select(Artifact.name).where(Artifact.job_id == job_id)).all()
            runs_logged = logs.count(f"job {job_id}: finished succeeded")
            t.logged_successes += runs_logged
            if len(successes) > 1 or runs_logged > 1 or len(names) != len(set(names)):
                t.completed_twice += 1
    return t


def report(t: Tally) -> None:
    text = t.table()
    print("\n" + text)
    TABLES.append(text)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TABLES:
        terminalreporter.section("fault injection: job outcomes")
        for text in TABLES:
            terminalreporter.write_line(text)

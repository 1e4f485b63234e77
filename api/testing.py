"""Helpers for tests of the HTTP API: an app on a given database with a recording queue."""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.deps import get_enqueue, get_settings
from api.main import create_app
from core.db import get_sessionmaker
from core.settings import Settings
from core.store import LocalStore, sha256_file
from models import ApiKey, Artifact, ComplianceReport, Job, JobEvent

MINIMAL_SPEC: dict[str, Any] = {"model": "bakehouse://smollm2-135m-instruct"}


@dataclass
class RecordingQueue:
    """Stands in for QueueDep; `fail` makes it raise as a down broker would."""

    job_ids: list[str] = field(default_factory=list)
    fail: bool = False
    database_url: str | None = None
    statuses_at_enqueue: list[str | None] = field(default_factory=list)

    def __call__(self, job_id: str) -> None:
        if self.database_url is not None:  # what a worker would see: the row must already be committed
            with get_sessionmaker(self.database_url)() as s:
                job = s.get(Job, job_id)
                self.statuses_at_enqueue.append(job.status if job else None)
        if self.fail:
            raise ConnectionError("broker down")
        self.job_ids.append(job_id)


@dataclass
class Harness:
    settings: Settings
    client: TestClient
    queue: RecordingQueue

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    @contextmanager
    def session(self) -> Iterator[Session]:
        with get_sessionmaker(self.database_url)() as s:
            yield s
            s.commit()

    @property
    def store(self) -> LocalStore:
        return LocalStore(Path(self.settings.resolved_storage_url.removeprefix("file://")))

    def create(self, spec: dict[str, Any] | None = None, *, headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = self.client.post("/v1/bake-jobs", json=spec or MINIMAL_SPEC, headers=headers)
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    def add_api_key(self, tenant: str, key: str, *, revoked: bool = False) -> None:
        with self.session() as s:
            s.add(
                ApiKey(
                    id="ak_" + uuid.uuid4().hex,
                    tenant=tenant,
                    revoked=revoked,
                    key_hash=hashlib.sha256(key.encode()).hexdigest(),
                )
            )

    def set_job(self, job_id: str, **fields: Any) -> None:
        with self.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            for name, value in fields.items():
                setattr(job, name, value)

    def add_event(self, job_id: str, message: str, **fields: Any) -> int:
        with self.session() as s:
            event = JobEvent(job_id=job_id, message=message, **fields)
            s.add(event)
            s.flush()
            return int(event.id)

    def add_artifact(self, job_id: str, name: str, content: bytes, tmp: Path) -> str:
        src = tmp / uuid.uuid4().hex
        src.write_bytes(content)
        key = f"jobs/{job_id}/{name}"
        self.store.put_file(key, src)
        digest = sha256_file(src)
        with self.session() as s:
            s.add(Artifact(job_id=job_id, name=name, size=len(content), sha256=digest, storage_key=key))
        return digest

    def add_report(
        self,
        job_id: str,
        *,
        tenant: str = "default",
        score: float,
        passed: bool,
        failed: tuple[str, ...] = (),
        **fields: Any,
    ) -> None:
        with self.session() as s:
            s.add(
                ComplianceReport(
                    job_id=job_id,
                    tenant=tenant,
                    score=score,
                    gate_passed=passed,
                    failed_checks="," + "".join(f"{c}," for c in failed),
                    report={"score": score, "gate": {"passed": passed}, "failed": list(failed)},
                    **fields,
                )
            )


@contextmanager
def api_harness(
    *,
    data_dir: Path,
    database_url: str,
    api_keys: str = "",
    max_body_bytes: int | None = None,
    raise_server_exceptions: bool = True,
    **overrides: Any,
) -> Iterator[Harness]:
    """`overrides` are further Settings fields. file:// models are allowed under `data_dir` and
    the system temp dir (where pytest puts its tmp paths) unless `model_roots` is given."""
    extra: dict[str, Any] = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
    overrides.setdefault("model_roots", f"{data_dir},{tempfile.gettempdir()}")
    settings = Settings(data_dir=data_dir, database_url=database_url, api_keys=api_keys, **extra, **overrides)
    app = create_app(settings)
    queue = RecordingQueue(database_url=database_url)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_enqueue] = lambda: queue
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield Harness(settings=settings, client=client, queue=queue)

"""worker.runner.run_job with a fake bake, on SQLite and a local store."""

from __future__ import annotations

import hashlib
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from baking.events import ArtifactFile, BakeCancelled, BakeError, BakeEvent, BakeResult
from core.db import get_sessionmaker
from core.settings import Settings
from core.store import LocalStore
from models import Artifact, ComplianceReport, Job, JobEvent
from tests.unit.test_worker_runs import make_schema
from worker import runner


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    make_schema(url)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        storage_url=f"file://{tmp_path / 'store'}",
        heartbeat_seconds=1,
        lease_seconds=10,
        max_attempts=3,
        model_roots="/m",  # the fake jobs' model
    )


def new_job(settings: Settings) -> str:
    job_id = "bj_" + uuid.uuid4().hex
    with get_sessionmaker(settings.resolved_database_url)() as s:
        s.add(Job(id=job_id, tenant="t1", status="queued", spec={"model": "file:///m"}, seed=0))
        s.commit()
    return job_id


def load(settings: Settings, job_id: str) -> tuple[Job, list[Artifact], list[JobEvent]]:
    with get_sessionmaker(settings.resolved_database_url)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        arts = list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        return job, arts, events


def write_artifacts(workdir: Path) -> BakeResult:
    out = workdir / "artifact"
    (out / "merged").mkdir(parents=True)
    files = []
    for name, data in [
        ("model.safetensors", b"\x00" * 3000),
        ("config.json", b"{}"),
        ("merged/config.json", b'{"a": 1}'),
    ]:
        (out / name).write_bytes(data)
        files.append(ArtifactFile(name, len(data), hashlib.sha256(data).hexdigest()))
    return BakeResult(
        artifact_dir=out,
        files=files,
        metrics={"speedup": 2.0},
        gate={"passed": True, "score": 1.0},
        report={"score": 1.0, "checks": [{"id": "S1", "status": "pass"}]},
    )


class FakeBake:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls = 0
        self.fail = fail
        self.seen_spec: dict[str, Any] | None = None

    def __call__(
        self, spec: dict[str, Any], workdir: Path, *, models_dir: Path, on_event: Any, should_cancel: Any, **_: Any
    ) -> BakeResult:
        self.calls += 1
        self.seen_spec = spec
        workdir.mkdir(parents=True)
        on_event(BakeEvent("stage", "preparing"))
        on_event(BakeEvent("stage", "baking_tools"))
        for step in range(1, 51):
            on_event(BakeEvent("progress", "baking_tools", step=step, total=50))
        on_event(BakeEvent("metrics", "baking_tools", data={"loss": 0.5}))
        on_event(BakeEvent("message", "baking_tools", message="hello", level="warning"))
        if self.fail is not None:
            raise self.fail
        on_event(BakeEvent("stage", "exporting"))
        return write_artifacts(workdir)


def test_success_records_events_progress_artifacts_and_uploads(settings: Settings) -> None:
    job_id = new_job(settings)
    bake = FakeBake()
    assert runner.run_job(job_id, settings, bake=bake) == "succeeded"
    job, arts, events = load(settings, job_id)
    assert (job.status, job.error, job.metrics, job.attempts) == ("succeeded", None, {"speedup": 2.0}, 1)
    assert job.gate == {"passed": True, "score": 1.0}
    assert [a.name for a in arts] == sorted(["model.safetensors", "config.json", "merged/config.json", f"{job_id}.tar"])
    store = LocalStore(settings.data_dir.parent / "store")
    for a in arts:
        assert a.storage_key == f"jobs/{job_id}/artifacts/{a.name}"
        data = b"".join(store.open_range(a.storage_key))
        assert (len(data), hashlib.sha256(data).hexdigest()) == (a.size, a.sha256)
    with tarfile.open(store.root / f"jobs/{job_id}/artifacts/{job_id}.tar") as tar:
        assert sorted(tar.getnames()) == [
            f"{job_id}/config.json",
            f"{job_id}/merged/config.json",
            f"{job_id}/model.safetensors",
        ]
    stages = [e.stage for e in events if e.message.startswith("stage ")]
    assert stages == ["fetching", "preparing", "baking_tools", "exporting", "uploading"]
    assert [e.data for e in events if e.type == "metrics"] == [{"loss": 0.5}]
    assert any(e.level == "warning" and e.message == "hello" for e in events)
    with get_sessionmaker(settings.resolved_database_url)() as s:
        assert s.get(ComplianceReport, job_id) is not None
    assert not (settings.work_dir / job_id).exists()


def test_progress_writes_are_throttled_but_last_step_lands(settings: Settings) -> None:
    job_id = new_job(settings)
    writes: list[int] = []
    orig = runner.runs.set_progress

    def spy(**kw: Any) -> bool:
        writes.append(kw["step"])
        return orig(**kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.runs, "set_progress", spy)
        assert runner.run_job(job_id, settings, bake=FakeBake()) == "succeeded"
    assert writes == [1, 50]  # 50 events within a second: the first and the final one


def test_training_progress_with_numbers_becomes_throttled_events(settings: Settings) -> None:
    job_id = new_job(settings)

    def bake(spec: dict[str, Any], workdir: Path, *, on_event: Any, **_: Any) -> BakeResult:
        workdir.mkdir(parents=True)
        on_event(BakeEvent("stage", "baking_tools"))
        for step in range(1, 51):
            loss = 2.0 / step
            on_event(BakeEvent("progress", "baking_tools", f"step {step}", step=step, total=50, data={"loss": loss}))
        return write_artifacts(workdir)

    assert runner.run_job(job_id, settings, bake=bake) == "succeeded"
    _, _, events = load(settings, job_id)
    progress = [e for e in events if e.type == "progress"]
    # 50 steps within a second: the first and the final one, each with its loss
    assert [(e.stage, e.data) for e in progress] == [
        ("baking_tools", {"step": 1, "total": 50, "loss": 2.0}),
        ("baking_tools", {"step": 50, "total": 50, "loss": 0.04}),
    ]


def test_bake_error_fails_with_code_and_stage_and_leaves_nothing(settings: Settings) -> None:
    job_id = new_job(settings)
    bake = FakeBake(BakeError("unsafe_format", "pickle checkpoints are refused", "preparing"))
    assert runner.run_job(job_id, settings, bake=bake) == "failed"
    job, arts, events = load(settings, job_id)
    assert job.status == "failed" and arts == []
    assert job.error == {"code": "unsafe_format", "message": "pickle checkpoints are refused", "stage": "preparing"}
    assert events[-1].level == "error"
    assert not (settings.data_dir.parent / "store" / "jobs" / job_id).exists()


def test_manifest_mismatch_midway_deletes_what_was_uploaded(settings: Settings) -> None:
    job_id = new_job(settings)

    def bake(spec: dict[str, Any], workdir: Path, **_: Any) -> BakeResult:
        result = write_artifacts(workdir)
        bad = result.files[-1]
        result.files[-1] = ArtifactFile(bad.name, bad.size, "0" * 64)
        return result

    assert runner.run_job(job_id, settings, bake=bake) == "failed"
    job, arts, _ = load(settings, job_id)
    assert job.error is not None and (job.error["code"], job.error["stage"]) == ("artifact_mismatch", "uploading")
    assert arts == [] and not (settings.data_dir.parent / "store" / "jobs" / job_id).exists()


@pytest.mark.parametrize(
    ("exc", "code"), [(MemoryError(), "out_of_memory"), (RuntimeError("boom\nTraceback"), "internal_error")]
)
def test_unexpected_errors_are_classified_without_stack_trace(settings: Settings, exc: Exception, code: str) -> None:
    job_id = new_job(settings)
    assert runner.run_job(job_id, settings, bake=FakeBake(exc)) == "failed"
    job, _, _ = load(settings, job_id)
    assert job.error is not None
    assert (job.error["code"], job.error["stage"]) == (code, "baking_tools")
    assert "Traceback" not in job.error["message"] and "boom" not in job.error["message"]


def test_torch_style_oom_detected_by_class_name(settings: Settings) -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    job_id = new_job(settings)
    assert runner.run_job(job_id, settings, bake=FakeBake(OutOfMemoryError("CUDA out of memory"))) == "failed"
    job, _, _ = load(settings, job_id)
    assert job.error is not None and job.error["code"] == "out_of_memory"
    assert "batch_size" in job.error["message"]


def test_cancel_is_honoured_between_steps(settings: Settings) -> None:
    job_id = new_job(settings)

    def bake(spec: dict[str, Any], workdir: Path, *, should_cancel: Any, on_event: Any, **_: Any) -> BakeResult:
        on_event(BakeEvent("stage", "baking_persona"))
        with get_sessionmaker(settings.resolved_database_url)() as s:  # what POST /cancel does
            s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True, status="cancelling"))
            s.commit()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if should_cancel():
                raise BakeCancelled()
            time.sleep(0.05)
        raise AssertionError("cancel never reached the pipeline")

    assert runner.run_job(job_id, settings, bake=bake) == "cancelled"
    job, arts, events = load(settings, job_id)
    assert (job.status, job.error, arts) == ("cancelled", None, [])
    assert events[-1].message == "cancelled" and events[-1].stage == "baking_persona"


def test_cancel_requested_before_start_never_bakes(settings: Settings) -> None:
    job_id = new_job(settings)
    with get_sessionmaker(settings.resolved_database_url)() as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        s.commit()
    bake = FakeBake()
    assert runner.run_job(job_id, settings, bake=bake) == "cancelled"
    assert bake.calls == 0


def test_redelivered_message_is_a_noop(settings: Settings) -> None:
    job_id = new_job(settings)
    bake = FakeBake()
    assert runner.run_job(job_id, settings, bake=bake) == "succeeded"
    first = load(settings, job_id)
    assert runner.run_job(job_id, settings, bake=bake) == "terminal"
    again = load(settings, job_id)
    assert bake.calls == 1
    assert (again[0].attempts, len(again[1]), len(again[2])) == (1, len(first[1]), len(first[2]))


def test_module_level_baking_bake_is_used_by_default(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import baking

    bake = FakeBake()
    monkeypatch.setitem(vars(baking), "bake", bake)  # setattr would import the real pipeline
    job_id = new_job(settings)
    assert runner.run_job(job_id, settings) == "succeeded" and bake.calls == 1
    assert bake.seen_spec == {"model": "file:///m"}


def test_stage_delay_test_hook(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAKEHOUSE_TEST_STAGE_DELAY_S", "0.2")
    job_id = new_job(settings)
    started = time.monotonic()
    assert runner.run_job(job_id, settings, bake=FakeBake()) == "succeeded"
    assert time.monotonic() - started >= 5 * 0.2


def test_worker_refuses_a_model_outside_the_roots_even_if_queued(settings: Settings) -> None:
    """The API refuses such a job; a message put in the queue some other way is refused again."""
    bake = FakeBake()
    job_id = new_job(settings)
    with get_sessionmaker(settings.resolved_database_url)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.spec = {"model": "file:///etc"}
        s.commit()
    assert runner.run_job(job_id, settings, bake=bake) == "failed"
    job, artifacts, _ = load(settings, job_id)
    assert bake.calls == 0 and artifacts == []
    assert job.error is not None and (job.error["code"], job.error["stage"]) == ("model_not_allowed", "fetching")

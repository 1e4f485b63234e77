"""Run one bake job: claim, heartbeat, fetch inputs, bake, upload, record.

The job row decides everything: a message for a job that is finished, or leased by a live
worker, does nothing. Outcomes are written only while this worker owns the lease, and a
failed job leaves nothing under its prefix in the store.

Outages: an object store that stops answering is retried with exponential backoff for
BAKEHOUSE_STORAGE_RETRY_SECONDS (default 120) before the job fails with `storage_error` at the
stage it was in; a database that restarts is retried for the writes that decide the job (stage
changes, the outcome, the ownership check before a cleanup), while progress and events are
best effort. Artifacts are published by the database commit that lists them: an object in the
store without an artifact row is never served, and a failed attempt deletes what it uploaded.

Test hook: when BAKEHOUSE_TEST_STAGE_DELAY_S is set (seconds, float), the runner sleeps that
long after entering each stage, so tests can kill a worker in the middle of a job. It is
read only here and has no effect when unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)
from tenacity.stop import stop_base

from baking.events import BakeCancelled, BakeError, BakeEvent, BakeResult
from core import runs
from core.db import get_sessionmaker
from core.settings import Settings
from core.sources import check_model_source
from core.store import ObjectStore, StoreError, open_store, s3_options, sha256_file, store_from_settings

log = logging.getLogger(__name__)

OOM_HINT = (
    "try profile: quick, a smaller training.batch_size, optimize.quantization int8/int4, "
    "or a worker with more (GPU) memory"
)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def artifact_key(job_id: str, name: str) -> str:
    return f"{job_prefix(job_id)}/artifacts/{name}"


def jsonable(value: Any) -> Any:
    """What the pipeline reports may hold dtypes, paths or numpy scalars; the JSON columns cannot."""
    return json.loads(json.dumps(value, default=str, allow_nan=True))


T = TypeVar("T")

# How long the writes that decide a job keep retrying a database that went away (a restart or a
# failover takes seconds); longer than that, the job is left to lease expiry and a retry.
DB_RETRY_SECONDS = 60.0


def _stage_delay() -> float:
    raw = os.environ.get("BAKEHOUSE_TEST_STAGE_DELAY_S")
    return float(raw) if raw else 0.0


def storage_retry_seconds() -> float:
    """How long an upload or download keeps retrying an unreachable object store
    (BAKEHOUSE_STORAGE_RETRY_SECONDS, read fresh so tests may change it per call)."""
    return Settings().storage_retry_seconds


class StorageFailed(Exception):
    pass


def _never() -> bool:
    return False


class stop_when(stop_base):  # noqa: N801 - named like tenacity's own stop conditions
    """Stop retrying once `predicate()` is true (a cancel or a lost lease)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


def with_storage_retry(
    what: str,
    fn: Callable[[], T],
    *,
    seconds: float | None = None,
    should_stop: Callable[[], bool] = _never,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Call `fn`, retrying StoreError/StorageFailed with exponential backoff for `seconds`.

    Botocore already retries a single request a few times; this outlasts an object store that is
    down for a restart. A missing key (FileNotFoundError) is an answer, not an outage: no retry.
    A cancel or a lost lease ends the wait early; the last error is raised.
    """
    limit = storage_retry_seconds() if seconds is None else seconds

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        message = f"object store unavailable during {what} ({exc}); retry {state.attempt_number} in {wait:.1f}s"
        log.warning(message)
        if on_retry is not None:
            on_retry(message)

    retrying = Retrying(
        retry=retry_if_exception_type((StoreError, StorageFailed)),
        wait=wait_exponential(multiplier=0.5, min=0.5, max=10),
        stop=stop_after_delay(limit) | stop_when(should_stop),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)


def _transient_db_error(exc: BaseException) -> bool:
    # OperationalError covers "connection refused" and "server closed the connection"; a
    # connection that died mid-statement is flagged as invalidated on any DBAPIError.
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
    )


def with_db_retry(what: str, fn: Callable[[], T], *, seconds: float = DB_RETRY_SECONDS) -> T:
    """Call `fn` (one whole transaction), retrying while the database is unreachable.

    Safe because each `core.runs` write is one transaction guarded by the lease owner: a retry
    after a commit that did land finds the row already changed and reports so.
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("database unavailable during %s (%s); retry %d", what, type(exc).__name__, state.attempt_number)

    retrying = Retrying(
        retry=retry_if_exception(_transient_db_error),
        wait=wait_exponential(multiplier=0.2, min=0.2, max=5),
        stop=stop_after_delay(seconds),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)


# ---- lease keeping ---------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Extends the lease every `interval` seconds; raises the cancel/lost flags it learns about."""

    def __init__(
        self, maker: sessionmaker[Session], job_id: str, worker_id: str, lease_seconds: int, interval: float
    ) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.maker, self.job_id, self.worker_id = maker, job_id, worker_id
        self.lease_seconds, self.interval = lease_seconds, interval
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                with self.maker() as session:
                    if runs.heartbeat(
                        session=session,
                        job_id=self.job_id,
                        worker_id=self.worker_id,
                        lease_seconds=self.lease_seconds,
                    ):
                        self.cancel.set()
            except runs.LeaseLost:
                log.warning("job %s: lease lost; stopping work", self.job_id)
                self.lost.set()
                return
            except Exception:  # the DB may come back before the lease runs out
                log.exception("job %s: heartbeat failed", self.job_id)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 5)


# ---- events -> rows --------------------------------------------------------------------------


@dataclass
class EventRecorder:
    """Translates BakeEvents into job events, stage and throttled progress writes."""

    maker: sessionmaker[Session]
    job_id: str
    worker_id: str
    lost: threading.Event
    stage: str | None = None
    progress_interval: float = 1.0
    # Progress that carries numbers (training loss) also becomes an event, so the loss curve can
    # be read back from /events; rarer than the progress column, so a long job stays a short list.
    progress_event_interval: float = 10.0
    _stage_started: float = field(default_factory=time.monotonic)
    _throttle: runs.Throttle = field(default_factory=runs.Throttle)
    _event_throttle: runs.Throttle = field(default_factory=runs.Throttle)

    def __post_init__(self) -> None:
        self._throttle = runs.Throttle(self.progress_interval)
        self._event_throttle = runs.Throttle(self.progress_event_interval)

    def enter(self, stage: str) -> None:
        if stage == self.stage:
            return
        self.stage = stage
        self._stage_started = time.monotonic()
        self._throttle = runs.Throttle(self.progress_interval)
        self._event_throttle = runs.Throttle(self.progress_event_interval)

        def set_stage() -> bool:
            with self.maker() as s:
                return runs.set_stage(session=s, job_id=self.job_id, worker_id=self.worker_id, stage=stage)

        if not with_db_retry(f"entering stage {stage}", set_stage):
            self.lost.set()
        delay = _stage_delay()
        if delay:
            time.sleep(delay)

    def __call__(self, event: BakeEvent) -> None:
        try:
            self._handle(event)
        except Exception:  # progress reporting must never kill the bake
            log.exception("job %s: could not record event %s", self.job_id, event.kind)

    def _handle(self, event: BakeEvent) -> None:
        if event.kind == "stage":
            self.enter(event.stage)
            if event.message:
                self._event(event, "message")
        elif event.kind == "progress":
            if event.stage != self.stage:
                self.enter(event.stage)
            done = event.total is not None and event.step is not None and event.step >= event.total
            if self._throttle.ready() or done:
                self._progress(event)
            if event.data and (self._event_throttle.ready() or done):
                self._progress_event(event)
        elif event.kind == "metrics":
            self._event(event, "metrics")
        else:
            self._event(event, "message")

    def _event(self, event: BakeEvent, type_: str) -> None:
        with self.maker() as s:
            runs.record_event(
                session=s,
                job_id=self.job_id,
                level=event.level,
                type=type_,
                stage=event.stage or self.stage,
                message=event.message,
                data=jsonable(event.data) if event.data else None,
            )

    def _progress_event(self, event: BakeEvent) -> None:
        with self.maker() as s:
            runs.record_event(
                session=s,
                job_id=self.job_id,
                level=event.level,
                type="progress",
                stage=event.stage,
                message=event.message,
                data=jsonable({"step": event.step, "total": event.total, **event.data}),
            )

    def _progress(self, event: BakeEvent) -> None:
        step = event.step or 0
        eta = None
        if event.total and step > 0:
            elapsed = time.monotonic() - self._stage_started
            eta = elapsed / step * max(0, event.total - step)
        with self.maker() as s:
            if not runs.set_progress(
                session=s,
                job_id=self.job_id,
                worker_id=self.worker_id,
                stage=event.stage,
                step=step,
                total=event.total,
                eta_s=eta,
            ):
                self.lost.set()


# ---- inputs ----------------------------------------------------------------------------------


def materialise_model(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Download an s3:// model into DATA_DIR/cache and point the spec at the local copy."""
    model = str(spec.get("model", ""))
    if not model.startswith("s3://"):
        return spec
    parsed = urlparse(model)
    prefix = parsed.path.strip("/")
    cache = settings.data_dir / "cache" / "s3" / hashlib.sha256(model.encode()).hexdigest()[:24]
    if not (cache / ".complete").is_file():
        store = open_store(f"s3://{parsed.netloc}", **s3_options(settings))
        tmp = cache.with_name(f"{cache.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            files = with_storage_retry(f"download of {model}", lambda: store.download_prefix(prefix, tmp))
            if not files:
                raise BakeError("model_not_found", f"no objects under {model}", "fetching")
            (tmp / ".complete").write_text(model)
            if cache.exists():
                shutil.rmtree(cache)
            tmp.rename(cache)
        except FileNotFoundError as exc:
            raise BakeError("model_not_found", f"could not fetch {model}: {exc}", "fetching") from exc
        except StoreError as exc:
            # Retried with backoff and still failing: the store is down or refuses us, not a missing model.
            raise BakeError("storage_error", f"could not fetch {model}: {str(exc)[:300]}", "fetching") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**spec, "model": f"file://{cache}"}


# ---- outputs ---------------------------------------------------------------------------------


def _bundle(artifact_dir: Path, out: Path, root_name: str) -> None:
    def reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(out, "w") as tar:
        for path in sorted(artifact_dir.rglob("*")):
            if path.is_file():
                tar.add(
                    path,
                    arcname=f"{root_name}/{path.relative_to(artifact_dir).as_posix()}",
                    filter=reset,
                    recursive=False,
                )


def _stored_sha256(store: ObjectStore, key: str) -> str:
    h = hashlib.sha256()
    for chunk in store.open_range(key):
        h.update(chunk)
    return h.hexdigest()


def _upload_one(store: ObjectStore, key: str, path: Path, size: int, sha256: str) -> None:
    store.put_file(key, path)
    stored_size = store.size(key)
    if stored_size != size or _stored_sha256(store, key) != sha256:
        raise StorageFailed(f"stored object {key} does not match the uploaded file")


def _upload_retrying(
    store: ObjectStore,
    key: str,
    path: Path,
    size: int,
    sha256: str,
    should_stop: Callable[[], bool],
    on_retry: Callable[[str], None] | None,
) -> None:
    try:
        with_storage_retry(
            f"upload of {key}",
            lambda: _upload_one(store, key, path, size, sha256),
            should_stop=should_stop,
            on_retry=on_retry,
        )
    except (StoreError, StorageFailed):
        if should_stop():  # the retry ended because of a cancel or a lost lease, not the outage
            raise BakeCancelled() from None
        raise


def upload_result(
    *,
    store: ObjectStore,
    job_id: str,
    result: BakeResult,
    scratch: Path,
    should_stop: Callable[[], bool],
    on_retry: Callable[[str], None] | None = None,
) -> list[runs.StoredArtifact]:
    """Upload each artifact file (verified by size and sha256) and a `<job_id>.tar` bundle.

    An unreachable store is retried with backoff (`with_storage_retry`); nothing is published
    here: the caller's database commit is what makes the uploaded keys visible.
    """
    stored: list[runs.StoredArtifact] = []
    for f in result.files:
        if should_stop():
            raise BakeCancelled()
        path = result.artifact_dir / f.name
        if not path.is_file() or path.stat().st_size != f.size or sha256_file(path) != f.sha256:
            raise BakeError("artifact_mismatch", f"artifact file {f.name} does not match its manifest", "uploading")
        key = artifact_key(job_id, f.name)
        _upload_retrying(store, key, path, f.size, f.sha256, should_stop, on_retry)
        stored.append(runs.StoredArtifact(f.name, f.size, f.sha256, key))
    bundle_name = f"{job_id}.tar"
    bundle = scratch / bundle_name
    _bundle(result.artifact_dir, bundle, job_id)
    size, digest = bundle.stat().st_size, sha256_file(bundle)
    key = artifact_key(job_id, bundle_name)
    _upload_retrying(store, key, bundle, size, digest, should_stop, on_retry)
    stored.append(runs.StoredArtifact(bundle_name, size, digest, key))
    bundle.unlink()
    return stored


# ---- the job ---------------------------------------------------------------------------------


def _classify(exc: BaseException, stage: str | None) -> tuple[str, str]:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in names:
        return "out_of_memory", f"ran out of memory in stage {stage or 'unknown'}; {OOM_HINT}"
    if isinstance(exc, StoreError | StorageFailed):
        return "storage_error", f"could not store the artifacts: {str(exc)[:300]}"
    return "internal_error", (f"unexpected {type(exc).__name__} in stage {stage or 'unknown'}; see the worker log")


def run_job(
    job_id: str,
    settings: Settings,
    *,
    worker_id: str | None = None,
    bake: Callable[..., BakeResult] | None = None,
) -> str:
    """Run the job if this worker can claim it. Returns the outcome for logs and tests:
    "succeeded", "failed", "cancelled", "lost" (lease taken over), or the claim status
    ("terminal", "leased", "missing", "exhausted") when it did not run.
    """
    worker_id = worker_id or default_worker_id()
    maker = get_sessionmaker(settings.resolved_database_url)
    with maker() as s:
        claim = runs.claim_job(
            session=s,
            job_id=job_id,
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )
    if not claim.claimed:
        log.info("job %s: not run (%s)", job_id, claim.status)
        if claim.status == "exhausted":
            # The dead attempts may have uploaded part of the artifacts; no row will ever list them.
            _delete_quietly(store_from_settings(settings), job_id)
        return claim.status
    log.info("job %s: claimed by %s (attempt %d)", job_id, worker_id, claim.attempts)

    beat = Heartbeat(maker, job_id, worker_id, settings.lease_seconds, settings.heartbeat_seconds)
    recorder = EventRecorder(maker, job_id, worker_id, beat.lost)
    if claim.cancel_requested:
        beat.cancel.set()
    workdir = settings.work_dir / job_id
    shutil.rmtree(workdir, ignore_errors=True)  # leftovers of an attempt that died on this host
    workdir.mkdir(parents=True, exist_ok=True)
    store = store_from_settings(settings)
    beat.start()
    try:
        outcome = _run(job_id, worker_id, claim, settings, maker, recorder, beat, store, workdir, bake)
        # One line per attempt that ran, so the fault tests can count outcomes per job in worker logs.
        log.info("job %s: finished %s (attempt %d, worker %s)", job_id, outcome, claim.attempts, worker_id)
        return outcome
    finally:
        beat.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    job_id: str,
    worker_id: str,
    claim: runs.ClaimOutcome,
    settings: Settings,
    maker: sessionmaker[Session],
    recorder: EventRecorder,
    beat: Heartbeat,
    store: ObjectStore,
    workdir: Path,
    bake: Callable[..., BakeResult] | None,
) -> str:
    def should_stop() -> bool:
        return beat.cancel.is_set() or beat.lost.is_set()

    def finish(fn: Callable[..., bool], **kw: Any) -> bool:
        def write() -> bool:
            with maker() as s:
                return fn(session=s, job_id=job_id, worker_id=worker_id, **kw)

        return with_db_retry(f"recording the outcome of {job_id}", write)

    def warn(message: str) -> None:
        try:
            with maker() as s:
                runs.record_event(session=s, job_id=job_id, level="warning", stage=recorder.stage, message=message)
        except Exception:  # the event is for people; the retry goes on without it
            log.exception("job %s: could not record a retry event", job_id)

    try:
        if should_stop():
            raise BakeCancelled()
        recorder.enter(runs.FIRST_STAGE)
        try:  # the API checked it too; the worker does not trust what is in the queue
            check_model_source(str((claim.spec or {}).get("model", "")), settings)
        except ValueError as exc:
            raise BakeError("model_not_allowed", str(exc), "fetching") from exc
        spec = materialise_model(claim.spec or {}, settings)
        if bake is None:
            from baking import bake as bake_fn  # torch loads here, in the worker, never in the API
        else:
            bake_fn = bake
        result = bake_fn(
            spec,
            workdir / "bake",
            models_dir=settings.models_dir,
            on_event=recorder,
            should_cancel=should_stop,
            job_id=job_id,
        )
        if should_stop():
            raise BakeCancelled()
        recorder.enter("uploading")
        stored = upload_result(
            store=store, job_id=job_id, result=result, scratch=workdir, should_stop=should_stop, on_retry=warn
        )
        if finish(
            runs.finish_succeeded,
            metrics=jsonable(result.metrics),
            gate=jsonable(result.gate),
            artifacts=stored,
            report=jsonable(result.report),
        ):
            return "succeeded"
        return "lost"
    except BakeCancelled:
        _discard(store, maker, job_id, worker_id)
        if beat.lost.is_set():
            return "lost"
        return "cancelled" if finish(runs.finish_cancelled, stage=recorder.stage) else "lost"
    except BakeError as exc:
        log.info("job %s failed: %s (%s)", job_id, exc.code, exc.message)
        _discard(store, maker, job_id, worker_id)
        ok = finish(runs.finish_failed, code=exc.code, message=exc.message, stage=exc.stage or recorder.stage)
        return "failed" if ok else "lost"
    except Exception as exc:
        log.exception("job %s: %s in stage %s", job_id, type(exc).__name__, recorder.stage)
        code, message = _classify(exc, recorder.stage)
        _discard(store, maker, job_id, worker_id)
        ok = finish(runs.finish_failed, code=code, message=message, stage=recorder.stage)
        return "failed" if ok else "lost"


def _discard(store: ObjectStore, maker: sessionmaker[Session], job_id: str, worker_id: str) -> None:
    """Delete what this attempt uploaded — only while we own the job, so a zombie cannot erase
    the artifacts of the worker that took over.

    Runs before the failure is recorded, and retries a store that is down for at least 30 s, so
    a job that failed because the store went away still leaves nothing behind once it is back.
    """

    def owner() -> bool:
        with maker() as s:
            return runs.still_owner(session=s, job_id=job_id, worker_id=worker_id)

    try:
        if not with_db_retry(f"checking ownership of {job_id}", owner):
            return
        with_storage_retry(
            f"cleanup of {job_prefix(job_id)}",
            lambda: store.delete_prefix(job_prefix(job_id)),
            seconds=max(30.0, storage_retry_seconds()),
        )
    except Exception:
        log.exception("job %s: could not delete partial uploads", job_id)


def _delete_quietly(store: ObjectStore, job_id: str) -> None:
    try:
        store.delete_prefix(job_prefix(job_id))
    except Exception:
        log.exception("job %s: could not delete the uploads of its dead attempts", job_id)

"""Celery app for the fault tests: the real worker (tasks, runner, claims, sweeper) with the
fast fake bake in place of the torch pipeline, so a job takes seconds and a worker starts fast.

    celery -A tests.faults.fake_worker worker ...

FAULTS_PUT_DELAY_S (seconds) slows each object upload, so a test can act mid-upload.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import baking
from core.store import LocalStore
from core.store_s3 import S3Store
from tests.faults.fake_bake import fake_bake
from worker.celery_app import app

__all__ = ["app"]

baking.bake = fake_bake  # type: ignore[attr-defined]  # the runner resolves `baking.bake` per job

_PUT_DELAY = float(os.environ.get("FAULTS_PUT_DELAY_S") or 0)
if _PUT_DELAY:
    _s3_put, _local_put = S3Store.put_file, LocalStore.put_file

    def _slow_s3_put(self: S3Store, key: str, path: Path) -> None:
        _s3_put(self, key, path)
        time.sleep(_PUT_DELAY)

    def _slow_local_put(self: LocalStore, key: str, path: Path) -> None:
        _local_put(self, key, path)
        time.sleep(_PUT_DELAY)

    S3Store.put_file = _slow_s3_put  # type: ignore[method-assign]
    LocalStore.put_file = _slow_local_put  # type: ignore[method-assign]

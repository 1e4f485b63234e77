"""The API, a Celery worker process and the stores, for real: both deployment shapes, worker
death mid-job, and a bad input that must fail cleanly.

Jobs are "package and verify" bakes of a tiny random model (no tools, no persona, no
quantization), so each takes seconds on CPU.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.client import TERMINAL, BakehouseClient
from core.db import upgrade_database
from core.store import LocalStore
from core.store_s3 import S3Store
from tests.integration.conftest import Proc, Seaweed, require_baking, service_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOB_TIMEOUT = 180.0


def package_spec(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "optimize": {"quantization": "none", "pruning": {"method": "none", "sparsity": 0.0}, "distill": False},
        "targets": {"speedup": None, "compression": None},
        "profile": "quick",
        "device": "cpu",
        "metadata": {"test": "integration"},
    }


def submit(base: str, spec: dict[str, Any]) -> str:
    response = httpx.post(f"{base}/v1/bake-jobs", json=spec, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_terminal(
    base: str, job_id: str, timeout: float = JOB_TIMEOUT, until: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    done = until or (lambda j: j["status"] in TERMINAL)
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{base}/v1/bake-jobs/{job_id}", timeout=10)
        assert response.status_code == 200, response.text
        job = response.json()
        if done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done after {timeout:.0f}s: {job}")


def assert_downloads_match(base: str, job: dict[str, Any], dest: Path) -> None:
    with BakehouseClient(base) as client:
        listed = client.artifacts(job["id"])
        assert {a["name"] for a in listed} == {a["name"] for a in job["artifacts"]}
        names = {a["name"] for a in listed}
        assert {"model.safetensors", "config.json", f"{job['id']}.tar"} <= names
        for artifact in listed:
            path = client.download(job["id"], artifact, dest)  # verifies size and sha256 itself
            assert path.stat().st_size == artifact["size"]


def migrate_embedded(tmp_path: Path) -> None:
    upgrade_database(f"sqlite:///{tmp_path / 'data' / 'bakehouse.db'}")


def pickle_only_model(src: Path, dest: Path) -> Path:
    """The tiny model's config and tokenizer, but weights only as a pickle checkpoint."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    (dest / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle; it must never be loaded
    return dest


def test_scaled_out_postgres_redis_seaweed(
    pg_url: str,
    redis_url: str,
    seaweed: Seaweed,
    tiny_model_dir: Path,
    api_server: Callable[[dict[str, str]], str],
    celery_worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    require_baking()
    models = S3Store(seaweed.bucket("models"), **seaweed.options())
    for f in tiny_model_dir.iterdir():
        models.put_file(f"tiny/{f.name}", f)
    artifacts_url = seaweed.bucket("artifacts")
    env = service_env(
        tmp_path,
        BAKEHOUSE_DATABASE_URL=pg_url,
        BAKEHOUSE_BROKER_URL=redis_url,
        BAKEHOUSE_STORAGE_URL=artifacts_url,
        **seaweed.env(),
    )
    base = api_server(env)
    celery_worker(env)

    job_id = submit(base, package_spec(f"{models.url}/tiny/"))
    job = wait_terminal(base, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None
    # the compiled decoding step was timed inside a real Celery worker process (optimize.compile)
    assert "baked_compiled" in job["metrics"]["latency_ms"], job["metrics"]["decoding"]
    assert_downloads_match(base, job, tmp_path / "download")
    store = S3Store(artifacts_url, **seaweed.options())
    assert store.exists(f"jobs/{job_id}/artifacts/{job_id}.tar")


def test_embedded_sqlite_success_and_pickle_input_failure(
    tiny_model_dir: Path,
    tmp_path: Path,
    api_server: Callable[[dict[str, str]], str],
    celery_worker: Callable[..., Proc],
) -> None:
    require_baking()
    bad_model = pickle_only_model(tiny_model_dir, tmp_path / "models" / "pickled")
    good_model = shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    env = service_env(tmp_path, BAKEHOUSE_MODEL_ROOTS=str(tmp_path / "models"))
    migrate_embedded(tmp_path)
    base = api_server(env)
    celery_worker(env)

    good = submit(base, package_spec(f"file://{good_model}"))
    bad = submit(base, package_spec(f"file://{bad_model}"))
    job = wait_terminal(base, good)
    assert job["status"] == "succeeded", job
    assert_downloads_match(base, job, tmp_path / "download")

    failed = wait_terminal(base, bad)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] and failed["error"]["stage"], failed["error"]
    assert failed["artifacts"] == []
    store = LocalStore(tmp_path / "data" / "artifacts")
    assert store.download_prefix(f"jobs/{bad}", tmp_path / "nothing") == []


def test_worker_killed_mid_job_is_taken_over_exactly_once(
    tiny_model_dir: Path,
    tmp_path: Path,
    api_server: Callable[[dict[str, str]], str],
    celery_worker: Callable[..., Proc],
) -> None:
    """Embedded broker: kombu's SQL transport loses the unacked message with the killed worker,
    so this also proves the next worker's start-up re-enqueue of orphaned jobs."""
    require_baking()
    env = service_env(tmp_path, BAKEHOUSE_MODEL_ROOTS=str(tiny_model_dir.parent))
    migrate_embedded(tmp_path)
    base = api_server(env)
    slow = celery_worker({**env, "BAKEHOUSE_TEST_STAGE_DELAY_S": "3"}, name="doomed")

    job_id = submit(base, package_spec(f"file://{tiny_model_dir}"))
    wait_terminal(base, job_id, timeout=60, until=lambda j: j["status"] == "running" and j["stage"] == "preparing")
    slow.sigkill()
    running = httpx.get(f"{base}/v1/bake-jobs/{job_id}", timeout=10).json()
    assert running["status"] == "running" and running["attempts"] == 1

    celery_worker(env, name="rescuer")
    job = wait_terminal(base, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    events = httpx.get(f"{base}/v1/bake-jobs/{job_id}/events", timeout=10).json()
    messages = [e.get("message", "") for e in (events["data"] if isinstance(events, dict) else events)]
    assert sum(m.startswith("succeeded") for m in messages) == 1
    names = [a["name"] for a in job["artifacts"]]
    assert len(names) == len(set(names))
    assert_downloads_match(base, job, tmp_path / "download")


def test_attempts_spent_fails_with_worker_lost(
    tiny_model_dir: Path,
    tmp_path: Path,
    api_server: Callable[[dict[str, str]], str],
    celery_worker: Callable[..., Proc],
) -> None:
    require_baking()
    env = service_env(tmp_path, BAKEHOUSE_MODEL_ROOTS=str(tiny_model_dir.parent), BAKEHOUSE_MAX_ATTEMPTS="1")
    migrate_embedded(tmp_path)
    base = api_server(env)
    slow = celery_worker({**env, "BAKEHOUSE_TEST_STAGE_DELAY_S": "3"}, name="doomed")
    job_id = submit(base, package_spec(f"file://{tiny_model_dir}"))
    wait_terminal(base, job_id, timeout=60, until=lambda j: j["status"] == "running")
    slow.sigkill()
    celery_worker(env, name="rescuer")
    job = wait_terminal(base, job_id, timeout=60)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "worker_lost" and job["error"]["stage"], job["error"]

"""Import boundaries (DESIGN §1-2): api never reaches torch, baking or the worker; baking stays pure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_api_does_not_import_torch_baking_or_worker() -> None:
    if not (ROOT / "api" / "main.py").is_file():
        pytest.skip("api/main.py is not written yet")
    mods = imported_after("import api.main\napi.main.create_app")
    forbidden = {"torch", "transformers", "peft", "safetensors", "baking", "worker"} & roots(mods)
    assert not forbidden, f"api imports {sorted(forbidden)}"
    # celery itself is fine (core.queue sends by task name); the worker machinery is not.
    assert not {m for m in mods if m.startswith(("celery.worker", "celery.apps.worker", "celery.bin"))}


@pytest.mark.parametrize("code", ["import baking", "import baking.events", "import baking, baking.events"])
def test_baking_is_free_of_web_db_queue_and_cloud(code: str) -> None:
    forbidden = {
        "sqlalchemy",
        "celery",
        "fastapi",
        "starlette",
        "boto3",
        "botocore",
        "kombu",
        "redis",
        "api",
        "core",
        "worker",
        "models",
        "cli",
    } & roots(imported_after(code))
    assert not forbidden, f"{code!r} imports {sorted(forbidden)}"


def test_core_and_models_never_import_entry_points_or_torch() -> None:
    mods = imported_after("import core.settings, core.db, core.store, core.store_s3, core.queue, core.runs, models")
    assert not {"torch", "api", "worker", "cli", "baking"} & roots(mods)


def test_worker_imports_torch_only_when_a_job_runs() -> None:
    mods = imported_after("import worker.celery_app, worker.tasks, worker.runner")
    assert not {"torch", "transformers", "api", "fastapi"} & roots(mods)

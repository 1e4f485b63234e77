"""Property-based tests of the HTTP API against its own OpenAPI document (schemathesis).

In process over ASGI, on an embedded SQLite database with API-key auth and a recording queue:
every generated request must get a non-5xx answer whose status code, content type and body
the OpenAPI document declares. Bounded to a few examples per operation so it stays quick.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.deps import get_enqueue
from api.main import create_app
from api.testing import RecordingQueue
from core.db import upgrade_database
from core.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AUTH = {"Authorization": "Bearer schemathesis-key"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# schemathesis' fixture-based loader does not work with pytest 9, so the app is built at import
# (which touches no disk: the data dir is created and migrated by the fixture below).
DATA_DIR = Path(tempfile.gettempdir()) / f"bakehouse-schemathesis-{uuid.uuid4().hex[:12]}"
CONFIG = Settings(
    data_dir=DATA_DIR,
    api_keys="acme:schemathesis-key",
    model_roots=str(DATA_DIR / "models"),
    rate_limit="1000000/minute",  # the generator is not a tenant to throttle
    max_active_jobs_per_tenant=1_000_000,
)
APP = create_app(CONFIG)
APP.dependency_overrides[get_enqueue] = lambda: RecordingQueue()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def database() -> Iterator[None]:
    upgrade_database(CONFIG.resolved_database_url)
    yield
    shutil.rmtree(DATA_DIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=AUTH, checks=CHECKS)

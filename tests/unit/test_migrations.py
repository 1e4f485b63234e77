"""The one Alembic history builds the schema of models/ on both backends, with no drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from core.db import upgrade_database
from models import Base

ROOT = Path(__file__).resolve().parents[2]


def _drift(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def _assert_head(url: str) -> None:
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_single_head_is_the_latest_revision() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config(str(ROOT / "alembic.ini"))
    assert ScriptDirectory.from_config(cfg).get_heads() == ["0002_job_queue"]


def test_sqlite_upgrade_has_no_drift(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade_database(url)
    upgrade_database(url)  # idempotent: a second upgrade at head does nothing
    _assert_head(url)
    assert _drift(url) == []


def test_sqlite_upgrade_creates_the_missing_directory(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'data' / 'bakehouse.db'}"
    upgrade_database(url)
    _assert_head(url)


@pytest.mark.integration
def test_postgres_upgrade_has_no_drift(pg_url: str) -> None:
    _assert_head(pg_url)
    assert _drift(pg_url) == []

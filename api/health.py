"""Readiness checks: the database, the broker and the object store, each with a short timeout."""

from __future__ import annotations

import logging
from collections.abc import Callable

from kombu import Connection
from sqlalchemy import text

from core.db import get_engine
from core.settings import Settings
from core.store import ObjectStore

log = logging.getLogger("bakehouse.api")
BROKER_TIMEOUT_S = 2.0


def _database(settings: Settings) -> None:
    with get_engine(settings.resolved_database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


def _broker(settings: Settings) -> None:
    with Connection(settings.resolved_broker_url, connect_timeout=BROKER_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=BROKER_TIMEOUT_S)


def readiness(settings: Settings, store: ObjectStore) -> dict[str, str]:
    """ "ok" or "error: <type>" per dependency; details go to the log, not to the caller."""
    checks: dict[str, Callable[[], None]] = {
        "database": lambda: _database(settings),
        "broker": lambda: _broker(settings),
        "store": store.ping,
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc)
            results[name] = f"error: {type(exc).__name__}"
    return results

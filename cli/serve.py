"""Launchers: the API server, a Celery worker, and both together (`bakehouse serve`)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from core.settings import Settings


def worker_argv(settings: Settings, *, concurrency: int = 1, pool: str = "solo", loglevel: str = "INFO") -> list[str]:
    # solo: one job at a time in the worker process itself, so SIGKILL leaves no orphaned child baking.
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        settings.queue_name,
        "-c",
        str(concurrency),
        f"--pool={pool}",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]


def api_argv(host: str, port: int, *, log_level: str = "info") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.main:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        log_level,
    ]


class UnsafeBind(Exception):
    """Listening where others can reach the API while it has no API keys, so no authentication."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address


def has_api_keys(settings: Settings) -> bool:
    """Keys in BAKEHOUSE_API_KEYS or stored with `bakehouse keys create` (revoked ones count too:
    the API then refuses every request rather than opening up)."""
    if settings.api_key_map:
        return True
    from sqlalchemy import exists, select
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import get_sessionmaker
    from models import ApiKey

    try:
        with get_sessionmaker(settings.resolved_database_url)() as session:
            return bool(session.scalar(select(exists().where(ApiKey.id.is_not(None)))))
    except SQLAlchemyError as exc:
        raise UnsafeBind(f"could not read the stored API keys ({type(exc).__name__}); run migrations first") from exc


def require_keys_unless_loopback(settings: Settings, host: str) -> None:
    """Without API keys every request is the "default" tenant: fine on 127.0.0.1, not on a network."""
    if is_loopback(host) or has_api_keys(settings):
        return
    raise UnsafeBind(
        f"refusing to listen on {host!r} with no API keys: anyone who can reach it could submit and "
        "download bake jobs. Set BAKEHOUSE_API_KEYS=tenant:key, or run `bakehouse keys create --tenant NAME`, "
        "or listen on 127.0.0.1."
    )


def migrate(settings: Settings) -> None:
    from core.db import upgrade_database

    # upgrade_database makes a SQLite database's directory; the default SQLite broker and the
    # work dir live here too, also when the database is Postgres.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.resolved_database_url)


def run_together(settings: Settings, host: str, port: int, *, stop_timeout: float = 20.0) -> int:
    """Run the API and one worker as child processes until either exits or we get SIGINT/SIGTERM.

    Both children are stopped on the way out (SIGTERM, then SIGKILL after `stop_timeout`):
    the worker's warm shutdown lets it finish writing; an unfinished job is taken over later.
    """
    migrate(settings)
    env = dict(os.environ)
    env.setdefault("BAKEHOUSE_DATA_DIR", str(settings.data_dir))
    children = [
        subprocess.Popen(api_argv(host, port), env=env),
        subprocess.Popen(worker_argv(settings), env=env),
    ]
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout
        for c in children:
            try:
                c.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        return 0
    return next((c.returncode for c in children if c.returncode), 1)

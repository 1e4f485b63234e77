"""Load test of the HTTP API on loopback: POST /v1/bake-jobs and GET /v1/bake-jobs/{id}.

By default it creates a throwaway Postgres database, migrates it, starts `uvicorn --factory
api.main:create_app` on a free 127.0.0.1 port with the real Redis broker (db 12), drives it with
N concurrent httpx clients for a bounded time or number of requests per endpoint, prints p50/p99
latency and throughput, then stops the server, drops the database and empties the Redis db.
With --url it measures an API that is already running instead (and touches nothing else).

    .venv/bin/python benchmarks/api_load.py                  # 50 clients, <=10 s per endpoint
    .venv/bin/python benchmarks/api_load.py --clients 20 --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC = {"model": "bakehouse://smollm2-135m-instruct", "profile": "quick", "metadata": {"bench": "api_load"}}


@dataclass
class Result:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[int | str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text

    from core.db import upgrade_database

    name = f"bakehouse_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade_database(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def api_server(database_url: str, broker_url: str, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """uvicorn on a free loopback port; `extra_env` (BAKEHOUSE_* settings) wins over the defaults."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bakehouse-bench-") as data_dir:
        env = {
            **os.environ,
            "BAKEHOUSE_DATABASE_URL": database_url,
            "BAKEHOUSE_BROKER_URL": broker_url,
            "BAKEHOUSE_DATA_DIR": data_dir,
            "BAKEHOUSE_API_KEYS": "",
            **(extra_env or {}),
        }
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"uvicorn exited with {proc.returncode}")
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("API did not become ready in 30 s")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def drive(
    name: str,
    clients: int,
    duration_s: float,
    max_requests: int,
    call: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
    base: str,
    headers: dict[str, str],
    expect: int,
) -> tuple[Result, list[httpx.Response]]:
    result = Result(name)
    responses: list[httpx.Response] = []
    budget = max_requests
    stop_at = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal budget
            while budget > 0 and time.perf_counter() < stop_at:
                budget -= 1
                t0 = time.perf_counter()
                try:
                    response = await call(client)
                except httpx.TransportError as exc:
                    result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
                    continue
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                if response.status_code != expect:
                    result.errors[response.status_code] = result.errors.get(response.status_code, 0) + 1
                else:
                    responses.append(response)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        result.seconds = time.perf_counter() - t0
    return result, responses


async def run(base: str, clients: int, duration_s: float, max_requests: int, api_key: str | None) -> list[Result]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    post, created = await drive(
        "POST /v1/bake-jobs",
        clients,
        duration_s,
        max_requests,
        lambda c: c.post("/v1/bake-jobs", json=SPEC),
        base,
        headers,
        202,
    )
    ids = [r.json()["id"] for r in created]
    if not ids:
        return [post]
    get, _ = await drive(
        "GET /v1/bake-jobs/{id}",
        clients,
        duration_s,
        max_requests,
        lambda c: c.get(f"/v1/bake-jobs/{random.choice(ids)}"),
        base,
        headers,
        200,
    )
    return [post, get]


def print_table(results: list[Result], clients: int, where: str) -> None:
    rows = []
    for r in results:
        ok = len(r.latencies_ms) - sum(v for k, v in r.errors.items() if isinstance(k, int))
        rows.append(
            (
                r.name,
                str(len(r.latencies_ms)),
                f"{len(r.latencies_ms) / r.seconds:.1f}",
                f"{r.percentile(50):.1f}",
                f"{r.percentile(99):.1f}",
                f"{statistics.fmean(r.latencies_ms):.1f}" if r.latencies_ms else "nan",
                str(ok),
                ", ".join(f"{k}:{v}" for k, v in r.errors.items()) or "-",
            )
        )
    header = ("endpoint", "requests", "req/s", "p50 ms", "p99 ms", "mean ms", "ok", "errors")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(f"\nBakehouse API load: {clients} concurrent clients, {where}")
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this running API instead of starting one (loopback only)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per endpoint (max 60)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per endpoint at most")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("BAKEHOUSE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()
    clients, duration = max(1, min(args.clients, 200)), max(1.0, min(args.duration, 60.0))

    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address")
        results = asyncio.run(run(args.url.rstrip("/"), clients, duration, args.requests, args.api_key))
        print_table(results, clients, f"running API at {args.url}")
        return

    with throwaway_database(args.pg_admin_url) as db_url, api_server(db_url, args.broker_url) as base:
        try:
            results = asyncio.run(run(base, clients, duration, args.requests, None))
        finally:
            import redis

            redis.Redis.from_url(args.broker_url).flushdb()  # the bench's undelivered job messages
    print_table(
        results,
        clients,
        f"uvicorn (1 process) + Postgres + Redis broker on 127.0.0.1, "
        f"<= {duration:g} s / {args.requests} requests per endpoint",
    )


if __name__ == "__main__":
    main()

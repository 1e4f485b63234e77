"""Multi-tenant load on the HTTP API, loopback only and bounded: N concurrent clients for T
seconds across 3 tenants, a realistic mix of requests, and two invariants checked on every reply.

It creates a throwaway Postgres database, starts a private `redis-server` as the broker (or uses
--broker-url), serves `uvicorn --factory api.main:create_app` on a free 127.0.0.1 port with an
API key per tenant and the per-tenant rate limit and active-job cap set high (so the load is
measured, not the limits; a 429 is counted apart and is not an error), and drives it. No worker
runs: created jobs stay queued. At the end it stops everything it started and drops the database.

Mix per client (each client is one tenant): POST /v1/bake-jobs with an Idempotency-Key (one in
ten reuses an earlier key of the tenant and must replay the same job), GET its job, list its jobs
(a second page by cursor now and then), read a job's events, and probe another tenant's job ids
(GET job / events / artifacts), which must answer 404.

Reports total requests, req/s, p50/p99 latency (overall and per operation), 5xx (must be 0),
cross-tenant reads that did not 404 (must be 0), idempotent replays that returned another job
(must be 0), 429s and transport errors; prints a table and writes JSON to benchmarks/results/.
Exits 1 when an invariant is broken.

    .venv/bin/python benchmarks/load.py                          # 200 clients, 60 s
    .venv/bin/python benchmarks/load.py --clients 6 --duration 5  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.api_load import api_server, free_port, throwaway_database  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TENANTS = ("acme", "globex", "initech")
MAX_CLIENTS, MAX_DURATION_S = 200, 60.0
SEED_JOBS_PER_TENANT = 5
# Operation weights: what a dashboard-heavy multi-tenant API sees, writes a minority.
MIX = {"post": 20, "get": 30, "list": 20, "events": 15, "cross": 15}
EXPECTED = {"post": 202, "get": 200, "list": 200, "events": 200, "cross": 404}


def spec(tag: str) -> dict[str, Any]:
    return {"model": "bakehouse://smollm2-135m-instruct", "profile": "quick", "metadata": {"bench": "load", "k": tag}}


def key_of(tenant: str) -> str:
    return f"bench-key-{tenant}"


@dataclass
class Stats:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in MIX})
    statuses: dict[str, dict[int, int]] = field(default_factory=lambda: {op: {} for op in MIX})
    transport_errors: dict[str, int] = field(default_factory=dict)
    cross_tenant_leaks: list[str] = field(default_factory=list)
    replay_mismatches: int = 0
    replays: int = 0

    def record(self, op: str, status: int, ms: float) -> None:
        self.latencies_ms[op].append(ms)
        self.statuses[op][status] = self.statuses[op].get(status, 0) + 1

    def count(self, predicate: Any, ops: tuple[str, ...] | None = None) -> int:
        return sum(
            n for op, by in self.statuses.items() if ops is None or op in ops for s, n in by.items() if predicate(s)
        )


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Tenant:
    name: str
    job_ids: list[str] = field(default_factory=list)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # Idempotency-Key -> (spec tag, job id)


class Load:
    def __init__(self, base: str, clients: int, duration_s: float, seed: int) -> None:
        self.base, self.clients, self.duration_s = base, clients, duration_s
        self.tenants = {name: Tenant(name) for name in TENANTS}
        self.stats = Stats()
        self.rng = random.Random(seed)
        self.seconds = 0.0

    def other_job(self, tenant: str) -> str:
        others = [t for t in TENANTS if t != tenant and self.tenants[t].job_ids]
        return self.rng.choice(self.tenants[self.rng.choice(others)].job_ids)

    async def seed(self, client: httpx.AsyncClient) -> None:
        for name, tenant in self.tenants.items():
            for i in range(SEED_JOBS_PER_TENANT):
                key, tag = f"seed-{i}", f"seed-{i}"
                r = await client.post("/v1/bake-jobs", json=spec(tag), headers=self.auth(name, key))
                if r.status_code != 202:
                    raise RuntimeError(f"seeding {name}: {r.status_code} {r.text[:300]}")
                tenant.job_ids.append(r.json()["id"])
                tenant.keys[key] = (tag, r.json()["id"])

    def auth(self, tenant: str, idempotency_key: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {key_of(tenant)}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    async def one(self, client: httpx.AsyncClient, tenant: Tenant, op: str) -> None:
        started = time.perf_counter()
        if op == "post":
            await self.post(client, tenant, started)
            return
        if op == "get":
            r = await client.get(f"/v1/bake-jobs/{self.rng.choice(tenant.job_ids)}", headers=self.auth(tenant.name))
        elif op == "list":
            params: dict[str, Any] = {"limit": 20}
            if self.rng.random() < 0.25:  # a later page by cursor
                params["after"] = self.rng.choice(tenant.job_ids)
            r = await client.get("/v1/bake-jobs", params=params, headers=self.auth(tenant.name))
        elif op == "events":
            job_id = self.rng.choice(tenant.job_ids)
            r = await client.get(f"/v1/bake-jobs/{job_id}/events", headers=self.auth(tenant.name))
        else:
            path = self.rng.choice(["", "/events", "/artifacts"])
            r = await client.get(f"/v1/bake-jobs/{self.other_job(tenant.name)}{path}", headers=self.auth(tenant.name))
            if r.status_code not in (404, 429):
                self.stats.cross_tenant_leaks.append(f"{r.request.url.path} -> {r.status_code}")
        self.stats.record(op, r.status_code, (time.perf_counter() - started) * 1000)

    async def post(self, client: httpx.AsyncClient, tenant: Tenant, started: float) -> None:
        """A new job with a fresh Idempotency-Key, or (one in ten) a retry of an earlier one."""
        replay = self.rng.random() < 0.1
        if replay:
            key = self.rng.choice(list(tenant.keys))
            tag, first_id = tenant.keys[key]
        else:
            key, tag, first_id = uuid.uuid4().hex, uuid.uuid4().hex[:8], ""
        r = await client.post("/v1/bake-jobs", json=spec(tag), headers=self.auth(tenant.name, key))
        self.stats.record("post", r.status_code, (time.perf_counter() - started) * 1000)
        if r.status_code != 202:
            return
        job_id = r.json()["id"]
        if replay:
            self.stats.replays += 1
            self.stats.replay_mismatches += job_id != first_id
        else:
            tenant.keys[key] = (tag, job_id)
            tenant.job_ids.append(job_id)

    async def client_loop(self, client: httpx.AsyncClient, tenant: Tenant, stop_at: float) -> None:
        ops, weights = list(MIX), list(MIX.values())
        while time.perf_counter() < stop_at:
            op = self.rng.choices(ops, weights)[0]
            try:
                await self.one(client, tenant, op)
            except httpx.TransportError as exc:
                name = type(exc).__name__
                self.stats.transport_errors[name] = self.stats.transport_errors.get(name, 0) + 1

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.base, limits=limits, timeout=30) as client:
            await self.seed(client)
            started = time.perf_counter()
            stop_at = started + self.duration_s
            await asyncio.gather(
                *(
                    self.client_loop(client, self.tenants[TENANTS[i % len(TENANTS)]], stop_at)
                    for i in range(self.clients)
                )
            )
            self.seconds = time.perf_counter() - started


def summary(load: Load, where: str) -> dict[str, Any]:
    s = load.stats
    everything = [ms for values in s.latencies_ms.values() for ms in values]
    total = len(everything)
    per_op = {}
    for op in MIX:
        values = s.latencies_ms[op]
        per_op[op] = {
            "requests": len(values),
            "p50_ms": round(percentile(values, 50), 1),
            "p99_ms": round(percentile(values, 99), 1),
            "statuses": {str(k): v for k, v in sorted(s.statuses[op].items())},
            "expected_status": EXPECTED[op],
        }
    unexpected = {
        op: {str(k): v for k, v in by.items() if k not in (EXPECTED[op], 429) and k < 500}
        for op, by in s.statuses.items()
    }
    return {
        "where": where,
        "clients": load.clients,
        "tenants": list(TENANTS),
        "duration_s": round(load.seconds, 2),
        "total_requests": total,
        "req_per_s": round(total / load.seconds, 1) if load.seconds else 0.0,
        "p50_ms": round(percentile(everything, 50), 1),
        "p99_ms": round(percentile(everything, 99), 1),
        "status_5xx": s.count(lambda code: code >= 500),
        "status_429": s.count(lambda code: code == 429),
        "cross_tenant_not_404": len(s.cross_tenant_leaks),
        "cross_tenant_examples": s.cross_tenant_leaks[:5],
        "idempotent_replays": s.replays,
        "idempotent_replay_mismatches": s.replay_mismatches,
        "unexpected_4xx": {op: v for op, v in unexpected.items() if v},
        "transport_errors": s.transport_errors,
        "per_operation": per_op,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nBakehouse API multi-tenant load: {result['clients']} clients, {len(result['tenants'])} tenants, "
        f"{result['duration_s']} s — {result['where']}"
    )
    header = ("operation", "requests", "p50 ms", "p99 ms", "statuses")
    rows = [
        (
            op,
            str(v["requests"]),
            f"{v['p50_ms']:.1f}",
            f"{v['p99_ms']:.1f}",
            " ".join(f"{k}:{n}" for k, n in v["statuses"].items()),
        )
        for op, v in result["per_operation"].items()
    ]
    rows.append(("all", str(result["total_requests"]), f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}", ""))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    for label, key in [
        ("total requests", "total_requests"),
        ("req/s", "req_per_s"),
        ("p50 latency ms", "p50_ms"),
        ("p99 latency ms", "p99_ms"),
        ("5xx (must be 0)", "status_5xx"),
        ("cross-tenant reads not 404 (must be 0)", "cross_tenant_not_404"),
        ("idempotent replays / returning another job (must be 0)", "idempotent_replays"),
        ("429 rate/cap limited (not errors)", "status_429"),
        ("transport errors", "transport_errors"),
        ("unexpected 4xx", "unexpected_4xx"),
    ]:
        value = result[key]
        if key == "idempotent_replays":
            value = f"{result['idempotent_replays']} / {result['idempotent_replay_mismatches']}"
        print(f"  {label:<56} {value}")


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of the benchmark's own (no persistence): the shared 6379 stays untouched."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --broker-url redis://127.0.0.1:6379/12")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bakehouse-bench-redis-") as data:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.1)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def given_redis(url: str) -> Iterator[str]:
    try:
        yield url
    finally:
        import redis

        redis.Redis.from_url(url).flushdb()  # the benchmark's undelivered job messages


def server_env() -> dict[str, str]:
    return {
        "BAKEHOUSE_API_KEYS": ",".join(f"{t}:{key_of(t)}" for t in TENANTS),
        # High enough that the load is measured, not the limits; 429s are still counted.
        "BAKEHOUSE_RATE_LIMIT": "10000000/minute",
        "BAKEHOUSE_MAX_ACTIVE_JOBS_PER_TENANT": "10000000",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=MAX_CLIENTS, help=f"concurrent clients (max {MAX_CLIENTS})")
    parser.add_argument("--duration", type=float, default=MAX_DURATION_S, help=f"seconds (max {MAX_DURATION_S:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("BAKEHOUSE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--broker-url", help="use this Redis instead of a private redis-server (its db is flushed)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/)")
    args = parser.parse_args()
    clients = max(len(TENANTS), min(args.clients, MAX_CLIENTS))
    duration = max(1.0, min(args.duration, MAX_DURATION_S))

    with throwaway_database(args.pg_admin_url) as db_url:
        broker = private_redis() if args.broker_url is None else given_redis(args.broker_url)
        with broker as broker_url, api_server(db_url, broker_url, server_env()) as base:
            load = Load(base, clients, duration, args.seed)
            asyncio.run(load.run())
    where = "uvicorn (1 process) + Postgres + Redis broker on 127.0.0.1, no worker (jobs stay queued)"
    result = summary(load, where)
    print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n  written to {out}")
    broken = result["status_5xx"] or result["cross_tenant_not_404"] or result["idempotent_replay_mismatches"]
    if broken:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

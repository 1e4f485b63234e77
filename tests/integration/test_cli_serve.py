"""`bakehouse serve`: migrates, runs the API and a worker, and stops both on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.integration.conftest import service_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_serve_starts_api_and_worker_and_stops_cleanly(tmp_path: Path) -> None:
    if not (ROOT / "api" / "main.py").is_file():
        pytest.skip("api.main is not written yet")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        env=service_env(tmp_path),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "bakehouse serve to answer")
        wait_until(lambda: " ready." in (tmp_path / "serve.log").read_text(errors="replace"), 60, "its worker")
        assert (tmp_path / "data" / "bakehouse.db").is_file()
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=40) == 0
        assert time.monotonic() - started < 40
        children = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children == [], f"left running: {children}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

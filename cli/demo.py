"""`make demo`: start the embedded service, bake examples/package-verify.yaml, show the result.

Uses the default DATA_DIR (so the model `bakehouse models pull` cached is found) unless
BAKEHOUSE_DATA_DIR says otherwise, and a free port. The server is stopped on the way out.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.client import BakehouseClient
from cli.main import err, load_spec, out, print_job, wait_for

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "package-verify.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, server: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server did not answer within {timeout:.0f}s")


def main() -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    err.print(f"starting bakehouse serve on {base}")
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], cwd=ROOT)
    try:
        wait_healthy(base, server)
        with BakehouseClient(base) as client:
            job = client.submit(load_spec(SPEC))
            out.print(f"submitted {job['id']} ({SPEC.relative_to(ROOT)})")
            job = wait_for(client, job, timeout=3600)
        print_job(job)
        return 0 if job["status"] == "succeeded" else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())

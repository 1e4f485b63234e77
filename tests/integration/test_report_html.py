"""The HTML compliance report as a browser shows it: headless Debian Chromium renders the page
`api.render.report_html` writes for a realistic report (every check, failures, a risk register,
latency and loss charts), takes a screenshot and dumps the DOM it built.

Chromium is a CI dependency (`.ci/run` installs it when missing): missing, this fails in CI and
skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from api.render import report_html
from tests.conftest import service_missing
from tests.integration.test_compliance_reports import make_report

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
JOB_ID = "bj_0123456789abcdef"


def _chromium() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found is None:
        service_missing("chromium", f"{CHROMIUM} is missing (apt-get install -y chromium)")
        raise AssertionError("unreachable")
    return found


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish within 120 s: {' '.join(cmd)}\n{exc.stderr!r}")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    r = make_report(JOB_ID, failed=("S1", "S4", "X4", "V3"), not_applicable=("S5",))
    r["latency_ms"] = {
        "baseline": {"p50": 41.2, "p95": 63.0, "p99": 88.4},
        "baked": {"p50": 23.7, "p95": 35.1, "p99": 52.9},
    }
    r["training_loss"] = [2.9 * 0.93**i + 0.05 * (i % 3) for i in range(60)]
    return r


def test_report_page_renders_in_chromium(tmp_path: Path, report: dict[str, Any]) -> None:
    binary = _chromium()
    page = tmp_path / "report.html"
    page.write_text(report_html(JOB_ID, report), encoding="utf-8")
    url = page.resolve().as_uri()

    png = tmp_path / "report.png"
    shot = _run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={png}", "--window-size=1280,2000", url)
    assert png.is_file(), f"no screenshot (rc {shot.returncode}):\n{shot.stderr[-3000:]}"
    assert png.stat().st_size > 10_000, f"screenshot is only {png.stat().st_size} bytes"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    dump = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dump.returncode == 0, dump.stderr[-3000:]
    dom = dump.stdout
    assert f"Compliance report for {JOB_ID}" in dom
    assert f"<strong>{report['score']}</strong>" in dom and report["score"] == 0.6275  # 32 of 51 (S5 n/a)
    assert "gate failed" in dom and "critical check S1 failed" in dom
    for check_id in ("S1", "S4", "X4", "V3", "R2"):
        assert f"<td>{check_id}</td>" in dom, check_id
    assert "<h2>Risk register</h2>" in dom
    assert 'aria-label="pass share per area"' in dom and 'aria-label="latency percentiles in milliseconds"' in dom
    assert 'aria-label="training loss per step"' in dom
    assert "it is not a certification, an audit, or independent verification and validation." in dom
    assert report["disclaimer"] in dom

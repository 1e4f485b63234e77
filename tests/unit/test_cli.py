"""The CLI and its HTTP client, against a fake API (httpx.MockTransport)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import cli.main
from cli.client import ApiError, BakehouseClient

DATA = b"weights" * 1000
ART = {"name": "merged/model.safetensors", "size": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
JOB = {
    "id": "bj_1",
    "status": "succeeded",
    "stage": None,
    "attempts": 1,
    "artifacts": [ART],
    "progress": {"percent": 100.0},
    "error": None,
    "gate": {"passed": True, "score": 1.0},
}


def fake_api(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if request.headers.get("authorization") == "Bearer wrong":
        return httpx.Response(
            401,
            json={"code": "unauthorized", "detail": "invalid or revoked API key"},
            headers={"content-type": "application/problem+json"},
        )
    if path == "/v1/bake-jobs" and request.method == "POST":
        spec = json.loads(request.content)
        if "model" not in spec:
            return httpx.Response(
                422,
                json={
                    "code": "validation_error",
                    "detail": "invalid job spec",
                    "errors": [{"field": "model", "message": "field required"}],
                },
            )
        return httpx.Response(202, json={**JOB, "status": "queued"})
    if path == "/v1/bake-jobs/bj_1":
        return httpx.Response(200, json=JOB)
    if path == "/v1/bake-jobs/bj_1/artifacts":
        return httpx.Response(200, json={"object": "list", "data": [ART]})
    if path == "/v1/bake-jobs/bj_1/artifacts/merged/model.safetensors":
        return httpx.Response(200, content=DATA)
    return httpx.Response(404, json={"code": "not_found", "detail": f"no {path}"})


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    def client(url: str, api_key: str | None) -> BakehouseClient:
        return BakehouseClient(url, api_key, transport=httpx.MockTransport(fake_api))

    monkeypatch.setattr(cli.main, "client", client)
    return CliRunner()


def test_submit_wait_prints_job_and_artifacts(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("model: bakehouse://smollm2-135m-instruct\n")
    result = runner.invoke(cli.main.app, ["submit", str(spec), "--wait"])
    assert result.exit_code == 0, result.output
    assert "submitted bj_1" in result.output and "merged/model.safetensors" in result.output


def test_problem_json_is_printed_without_traceback(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text('{"tools": []}')
    result = runner.invoke(cli.main.app, ["submit", str(spec)])
    assert result.exit_code == 1
    assert "validation_error" in result.output and "model: field required" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(cli.main.app, ["status", "bj_1", "--api-key", "wrong"])
    assert result.exit_code == 1 and "unauthorized: invalid or revoked API key" in result.output


def test_bad_spec_file_is_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("- just\n- a list\n")
    result = runner.invoke(cli.main.app, ["submit", str(bad)])
    assert result.exit_code == 1 and "must hold a mapping" in result.output
    result = runner.invoke(cli.main.app, ["submit", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "cannot read" in result.output


def test_download_verifies_checksums(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.main.app, ["download", "bj_1", "--out", str(tmp_path / "dl")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dl" / "merged" / "model.safetensors").read_bytes() == DATA


def test_client_rejects_mismatch_and_traversal(tmp_path: Path) -> None:
    client = BakehouseClient("http://x", transport=httpx.MockTransport(fake_api))
    with pytest.raises(ApiError, match="checksum_mismatch|expected"):
        client.download("bj_1", {**ART, "sha256": "0" * 64}, tmp_path)
    assert list(tmp_path.rglob("*.safetensors")) == [] and not list(tmp_path.rglob("*.part"))
    with pytest.raises(ApiError, match="outside"):
        client.download("bj_1", {**ART, "name": "../evil"}, tmp_path / "out")


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main.app, ["status", "bj_1", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach" in result.output and "Traceback" not in result.output


def test_keys_create_stores_only_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import select

    from core.db import get_sessionmaker
    from core.settings import get_settings
    from models import ApiKey

    monkeypatch.setenv("BAKEHOUSE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main.app, ["keys", "create", "--tenant", "acme"])
        assert result.exit_code == 0, result.output
        key = next(line for line in result.output.splitlines() if line.startswith("bk_"))
        url = get_settings().resolved_database_url
        with get_sessionmaker(url)() as s:
            rows = s.execute(select(ApiKey.tenant, ApiKey.key_hash)).all()
        assert rows == [("acme", hashlib.sha256(key.encode()).hexdigest())]
    finally:
        get_settings.cache_clear()


def test_models_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("BAKEHOUSE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main.app, ["models", "list"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0 and "smollm2-135m-instruct" in result.output


def test_job_submit_payload_spec(tmp_path: Path) -> None:
    spec: dict[str, Any] = cli.main.load_spec(Path(__file__).resolve().parents[2] / "examples/package-verify.yaml")
    from core.spec import BakeJobSpec

    BakeJobSpec.model_validate(spec)  # the example is a valid job as it is


# --- refusing an open bind without keys ----------------------------------------------------


@pytest.fixture
def no_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh data dir with no keys; the launchers are replaced so nothing really binds."""
    from core.settings import get_settings

    monkeypatch.setenv("BAKEHOUSE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BAKEHOUSE_API_KEYS", raising=False)
    started: list[str] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: started.append("api"))
    monkeypatch.setattr("cli.serve.run_together", lambda *a, **kw: started.append("serve") or 0)
    get_settings.cache_clear()
    yield started
    get_settings.cache_clear()


@pytest.mark.parametrize("command", ["api", "serve"])
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "bakehouse.internal"])
def test_open_bind_without_keys_is_refused(no_keys: list[str], command: str, host: str) -> None:
    result = CliRunner().invoke(cli.main.app, [command, "--host", host])
    assert result.exit_code == 1
    assert "refusing to listen on" in result.output and "BAKEHOUSE_API_KEYS" in result.output
    assert no_keys == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_without_keys_is_allowed(no_keys: list[str], host: str) -> None:
    result = CliRunner().invoke(cli.main.app, ["api", "--host", host])
    assert result.exit_code == 0, result.output
    assert no_keys == ["api"]


def test_open_bind_with_keys_is_allowed(no_keys: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    assert CliRunner().invoke(cli.main.app, ["keys", "create", "--tenant", "acme"]).exit_code == 0
    assert CliRunner().invoke(cli.main.app, ["serve", "--host", "0.0.0.0"]).exit_code == 0
    monkeypatch.setenv("BAKEHOUSE_API_KEYS", "acme:k")
    get_settings.cache_clear()
    assert CliRunner().invoke(cli.main.app, ["api", "--host", "0.0.0.0", "--no-migrate"]).exit_code == 0
    assert no_keys == ["serve", "api"]

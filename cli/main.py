"""`bakehouse`: run the service (serve/api/worker) and use it (submit, status, download, ...)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from cli.client import TERMINAL, ApiError, BakehouseClient

app = typer.Typer(
    help="Bake tool use and a persona into a small language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The local model cache (bakehouse://NAME).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")

out = Console()
err = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="BAKEHOUSE_URL", help="API base URL.")]
Key = Annotated[str | None, typer.Option("--api-key", envvar="BAKEHOUSE_API_KEY", help="Bearer key.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def client(url: str, api_key: str | None) -> BakehouseClient:
    return BakehouseClient(url, api_key)


def settings() -> Any:
    from core.settings import get_settings

    try:
        return get_settings()
    except ValueError as exc:
        fail(f"bad BAKEHOUSE_* settings: {exc}")


# ---- running the service ---------------------------------------------------------------------


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Embedded mode: migrate, then run the API and one worker until Ctrl-C."""
    from cli.serve import UnsafeBind, migrate, require_keys_unless_loopback, run_together

    s = settings()
    try:
        migrate(s)  # the stored keys are read from the database
        require_keys_unless_loopback(s, host)
    except UnsafeBind as exc:
        fail(str(exc))
    out.print(f"bakehouse on http://{host}:{port}  data: {s.data_dir}  (Ctrl-C stops)")
    raise typer.Exit(run_together(s, host, port))


@app.command()
def api(
    host: str = "127.0.0.1",
    port: int = 8000,
    migrate: Annotated[bool, typer.Option(help="Run database migrations first.")] = True,
) -> None:
    """Run only the HTTP API."""
    import uvicorn

    from cli.serve import UnsafeBind, require_keys_unless_loopback
    from cli.serve import migrate as run_migrations

    s = settings()
    if migrate:
        run_migrations(s)
    try:
        require_keys_unless_loopback(s, host)
    except UnsafeBind as exc:
        fail(str(exc))
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port)


@app.command()
def worker(
    migrate: Annotated[bool, typer.Option(help="Run database migrations first.")] = False,
    loglevel: str = "INFO",
) -> None:
    """Run one Celery worker that bakes one job at a time."""
    from cli.serve import migrate as run_migrations
    from cli.serve import worker_argv

    s = settings()
    if migrate:
        run_migrations(s)
    argv = worker_argv(s, loglevel=loglevel)
    os.execv(argv[0], argv)


# ---- using the service -----------------------------------------------------------------------


def _call(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except ApiError as exc:
        fail(f"{exc.code}: {exc.detail}" if exc.code else exc.detail)


def load_spec(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        fail(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(spec, dict):
        fail(f"{path} must hold a mapping (a job spec), not {type(spec).__name__}")
    return spec


def wait_for(
    c: BakehouseClient, job: dict[str, Any], *, interval: float = 1.0, timeout: float | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(job["id"], total=100.0, eta="")
        while job["status"] not in TERMINAL:
            if timeout is not None and time.monotonic() - started > timeout:
                fail(f"job {job['id']} still {job['status']} after {timeout:.0f}s")
            time.sleep(interval)
            job = _call(c.get, job["id"])
            progress = job.get("progress") or {}
            eta = progress.get("eta_s")
            bar.update(
                task,
                completed=float(progress.get("percent") or 0.0),
                description=f"{job['status']:<10} {job.get('stage') or '':<15}",
                eta=f"eta {eta:.0f}s" if eta else "",
            )
        bar.update(
            task,
            completed=100.0 if job["status"] == "succeeded" else None,
            description=f"{job['status']:<10} {job.get('stage') or '':<15}",
            eta="",
        )
    return job


def print_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("id", "status", "stage", "attempts", "created_at", "started_at", "finished_at"):
        table.add_row(key, str(job.get(key)))
    if job.get("error"):
        e = job["error"]
        table.add_row("error", f"[red]{e.get('code')}[/red] at {e.get('stage')}: {e.get('message')}")
    if job.get("gate"):
        table.add_row("gate", f"passed={job['gate'].get('passed')} score={job['gate'].get('score')}")
    out.print(table)
    if job.get("artifacts"):
        print_artifacts(job["artifacts"])


def print_artifacts(artifacts: list[dict[str, Any]]) -> None:
    table = Table("artifact", "bytes", "sha256")
    for a in artifacts:
        table.add_row(a["name"], f"{a['size']:,}", a["sha256"][:16] + "…")
    out.print(table)


@app.command()
def submit(
    file: Path,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and show progress.")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submit key.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after seconds.")] = None,
) -> None:
    """Submit a job spec (YAML or JSON)."""
    spec = load_spec(file)
    with client(url, api_key) as c:
        job = _call(c.submit, spec, idempotency_key=idempotency_key or str(uuid.uuid4()))
        out.print(f"submitted {job['id']} ({job['status']})")
        if not wait:
            return
        job = wait_for(c, job, timeout=timeout)
        print_job(job)
        if job["status"] != "succeeded":
            raise typer.Exit(1)


@app.command()
def status(
    job_id: str,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one job."""
    with client(url, api_key) as c:
        job = _call(c.get, job_id)
    if as_json:
        out.print_json(data=job)
    else:
        print_job(job)


@app.command("list")
def list_jobs(url: Url = DEFAULT_URL, api_key: Key = None, status: str | None = None, limit: int = 20) -> None:
    """List recent jobs."""
    with client(url, api_key) as c:
        page = _call(c.list_jobs, status=status, limit=limit)
    table = Table("id", "status", "stage", "created", "gate")
    for j in page.get("data", []):
        gate = j.get("gate") or {}
        table.add_row(
            j["id"],
            j["status"],
            j.get("stage") or "",
            str(j.get("created_at", ""))[:19],
            "" if not gate else ("pass" if gate.get("passed") else "fail"),
        )
    out.print(table)
    if page.get("has_more"):
        out.print(f"more: --after {page.get('next_after')}")


@app.command()
def cancel(job_id: str, url: Url = DEFAULT_URL, api_key: Key = None) -> None:
    """Ask a job to stop."""
    with client(url, api_key) as c:
        job = _call(c.cancel, job_id)
    out.print(f"{job['id']}: {job['status']}")


@app.command()
def download(
    job_id: str,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Directory (default ./ID).")] = None,
) -> None:
    """Download every artifact of a job, verifying size and sha256."""
    target = out_dir or Path(job_id)
    with client(url, api_key) as c:
        artifacts = _call(c.artifacts, job_id)
        if not artifacts:
            fail(f"job {job_id} has no artifacts")
        for a in artifacts:
            path = _call(c.download, job_id, a, target)
            out.print(f"{a['size']:>14,}  {a['sha256'][:12]}  {path}")
    out.print(f"{len(artifacts)} files verified in {target}")


@app.command()
def report(
    job_id: str,
    url: Url = DEFAULT_URL,
    api_key: Key = None,
    fmt: Annotated[str, typer.Option("--format", help="md, html or json")] = "md",
) -> None:
    """Print a job's compliance report."""
    if fmt not in ("md", "html", "json"):
        fail("--format must be md, html or json")
    with client(url, api_key) as c:
        text = _call(c.compliance, job_id, fmt)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


# ---- local administration --------------------------------------------------------------------


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Fetch and convert a known model into the cache."""
    from cli import model_cache

    try:
        path = model_cache.pull(settings().models_dir, name)
    except KeyError as exc:
        fail(str(exc.args[0]))
    except Exception as exc:
        fail(f"could not pull {name}: {exc}")
    out.print(f"bakehouse://{name} -> {path}")


@models_app.command("list")
def models_list() -> None:
    """Known models and whether they are cached."""
    from cli import model_cache

    table = Table(Column("name", no_wrap=True), "pulled", "license", "upstream", "path")
    for row in model_cache.list_models(settings().models_dir):
        table.add_row(
            str(row["name"]),
            "yes" if row["pulled"] else "no",
            str(row["license"]),
            str(row["upstream"]),
            str(row["path"]),
        )
    out.print(table)


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")]) -> None:
    """Create an API key; it is printed once, only its sha256 is stored."""
    from core.db import session_scope
    from models import ApiKey

    if not tenant or len(tenant) > 64:
        fail("--tenant must be 1 to 64 characters")
    from cli.serve import migrate

    s = settings()
    key = "bk_" + secrets.token_urlsafe(32)
    key_id = "key_" + uuid.uuid4().hex
    try:
        migrate(s)
        with session_scope(s.resolved_database_url) as session:
            session.add(ApiKey(id=key_id, tenant=tenant, key_hash=hashlib.sha256(key.encode()).hexdigest()))
    except Exception as exc:  # a person reads this: one line, no stack trace
        fail(f"could not store the key in {s.resolved_database_url}: {type(exc).__name__}: {exc}")
    err.print(f"created {key_id} for tenant {tenant!r}; store this key now, it is not shown again:")
    print(key)


if __name__ == "__main__":
    app()

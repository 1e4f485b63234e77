"""`make demo`: start the embedded service, bake examples/fleet-assistant.yaml, show what it did.

Runs `bakehouse serve` on a free loopback port with the default DATA_DIR (or BAKEHOUSE_DATA_DIR),
so the model `bakehouse models pull smollm2-135m-instruct` cached is found; submits the job over
HTTP with `profile` set to quick (BAKEHOUSE_DEMO_PROFILE or --profile to change it), shows the
job's progress, then prints the job, its metrics beside the baseline and its artifacts, and
downloads every artifact into ./out/<job id>/ checking sha256. The server is stopped on the way
out, Ctrl-C included (a running job is cancelled first). Exit status: 0 when the job succeeded.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from cli.client import TERMINAL, ApiError, BakehouseClient
from cli.main import err, load_spec, out

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "fleet-assistant.yaml"
MODEL = "smollm2-135m-instruct"
PROFILES = ("quick", "standard", "thorough")
STOP_TIMEOUT_S = 40.0  # serve gives its children 20 s, then kills them


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the server ------------------------------------------------------------------------------


@contextmanager
def embedded_server(log_path: Path) -> Iterator[str]:
    """`bakehouse serve` in its own session (so Ctrl-C reaches only us); yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    err.print(f"starting bakehouse serve on {base} (log: {log_path})")
    try:
        wait_healthy(base, server, log_path)
        yield base
    finally:
        stop_server(server)


def wait_healthy(base: str, server: subprocess.Popen[bytes], log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoError(f"the server exited with {server.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DemoError(f"the server did not become ready within {timeout:.0f}s:\n{tail(log_path)}")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    err.print("stopping the server…")
    server.send_signal(signal.SIGTERM)  # serve stops its API and worker, then exits
    try:
        server.wait(timeout=STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: do not wait any longer
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class DemoError(Exception):
    pass


# ---- waiting ---------------------------------------------------------------------------------


def wait_with_progress(client: BakehouseClient, job: dict[str, Any], *, interval: float = 1.0) -> dict[str, Any]:
    """Poll the job until it ends, drawing its progress; the loss comes from its progress events."""
    last_event: int | None = None
    loss = ""
    with Progress(
        TextColumn("{task.fields[stage]:<15}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[step]:>9}"),
        TextColumn("{task.fields[eta]:>10}"),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("bake", total=100.0, stage=job["status"], step="", eta="", loss="")
        while job["status"] not in TERMINAL:
            time.sleep(interval)
            job = client.get(job["id"])
            for event in client.events(job["id"], after=last_event, limit=1000):
                last_event = event["id"]
                data = event.get("data") or {}
                if event["type"] == "progress" and isinstance(data.get("loss"), int | float):
                    loss = f"loss {data['loss']:.4f}"
            p = job.get("progress") or {}
            step, total, eta = p.get("step"), p.get("total"), p.get("eta_s")
            bar.update(
                task,
                completed=float(p.get("percent") or 0.0),
                stage=job.get("stage") or job["status"],
                step=f"{step}/{total}" if total else "",
                eta=f"eta {format_seconds(eta)}" if eta else "",
                loss=loss if job.get("stage") == "baking_tools" else "",
            )
        bar.update(task, completed=100.0 if job["status"] == "succeeded" else None, stage=job["status"], eta="")
    return job


# ---- printing --------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _span(start: str | None, end: str | None) -> float | None:
    a, b = _when(start), _when(end)
    return (b - a).total_seconds() if a and b else None


def stage_times(events: list[dict[str, Any]], finished_at: str | None) -> list[tuple[str, float | None]]:
    starts: list[tuple[str, str]] = []
    for e in events:  # the worker writes "stage X" on entering X (a pipeline message may repeat it)
        if (
            e["type"] == "message"
            and e["message"] == f"stage {e['stage']}"
            and (not starts or starts[-1][0] != e["stage"])
        ):
            starts.append((e["stage"], e["created_at"]))
    ends = [at for _, at in starts[1:]] + [finished_at]
    return [(stage, _span(at, end)) for (stage, at), end in zip(starts, ends, strict=True)]


def all_events(client: BakehouseClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        page = client.events(job_id, after=events[-1]["id"] if events else None, limit=1000)
        events += page
        if len(page) < 1000:
            return events


def print_job(job: dict[str, Any], events: list[dict[str, Any]]) -> None:
    table = Table(Column(no_wrap=True), Column(), title="job", show_header=False, title_justify="left")
    colour = "green" if job["status"] == "succeeded" else "red"
    table.add_row("id", job["id"])
    table.add_row("status", f"[{colour}]{job['status']}[/{colour}]")
    table.add_row("profile", str(job["spec"].get("profile")))
    table.add_row("attempts", f"{job['attempts']} of {job.get('max_attempts', '?')}")
    table.add_row("queued", format_seconds(_span(job["created_at"], job.get("started_at"))))
    table.add_row("ran", format_seconds(_span(job.get("started_at"), job.get("finished_at"))))
    table.add_row(
        "stages", ", ".join(f"{stage} {format_seconds(s)}" for stage, s in stage_times(events, job.get("finished_at")))
    )
    if job.get("gate"):
        gate = job["gate"]
        table.add_row("gate", f"passed={gate.get('passed')} score={_num(gate.get('score'))}")
    if job.get("error"):
        e = job["error"]
        table.add_row("error", f"[red]{e.get('code')}[/red] at {e.get('stage')}: {e.get('message')}")
    out.print(table)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int | float):
        return "nan" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _mib(n: Any) -> str:
    return f"{n / 2**20:.1f} MiB" if isinstance(n, int | float) else "-"


def print_metrics(metrics: dict[str, Any]) -> None:
    m = metrics
    table = Table(
        Column("metric", no_wrap=True),
        Column("baked\nno prompt", justify="right", no_wrap=True),
        Column("original\n+ prompt", justify="right", no_wrap=True),
        Column("what it is"),
        title="metrics (held-out cases, measured in the job)",
        title_justify="left",
    )
    for key, base, meaning in [
        ("tool_call_accuracy", "tool_call_accuracy_baseline", "right tool call, right arguments"),
        ("irrelevance_accuracy", "irrelevance_accuracy_baseline", "chit-chat answered with no call"),
        ("persona_kl", None, f"KL(prompted ‖ baked)/token; unbaked {_num(m.get('persona_kl_unbaked'))}"),
        ("persona_top1", None, f"top-1 vs prompted original; unbaked {_num(m.get('persona_top1_unbaked'))}"),
        ("guideline_pass_rate", "guideline_pass_rate_baseline", "persona guideline probes passed"),
    ]:
        table.add_row(key, _num(m.get(key)), _num(m.get(base)) if base else "", meaning)
    latency = m.get("latency_ms") or {}
    baked, baseline = latency.get("baked") or {}, latency.get("baseline") or {}
    table.add_row(
        "latency p50 (ms)",
        _num(baked.get("p50"), 0),
        _num(baseline.get("p50"), 0),
        f"speedup {_num(m.get('speedup'), 2)}x",
    )
    size = m.get("size_bytes") or {}
    table.add_row(
        "weights",
        _mib(size.get("final")),
        _mib(size.get("original")),
        f"compression {_num(m.get('compression'))}, vs fp32 {_num(m.get('compression_vs_fp32'))}",
    )
    table.add_row("accuracy_retention", _num(m.get("accuracy_retention")), "", "compressed / uncompressed baked")
    table.add_row(
        "ppl_delta",
        _num(m.get("ppl_delta"), 4),
        "",
        f"vs uncompressed baked on held-out text; top-1 {_num(m.get('top1_agreement'))}, KL {_num(m.get('kl'), 4)}",
    )
    out.print(table)


def download_all(client: BakehouseClient, job: dict[str, Any], dest: Path) -> None:
    table = Table("artifact", "bytes", "sha256", title=f"artifacts → {dest}", title_justify="left")
    for artifact in client.artifacts(job["id"]):
        client.download(job["id"], artifact, dest)  # streams, checks size and sha256, then renames
        table.add_row(artifact["name"], f"{artifact['size']:,}", artifact["sha256"][:16] + "…")
    out.print(table)
    out.print(f"downloaded and sha256-verified into {dest}/ (merged/ loads with plain transformers)")


# ---- main ------------------------------------------------------------------------------------


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=os.environ.get("BAKEHOUSE_DEMO_PROFILE") or "quick",
        help="bake profile (default: $BAKEHOUSE_DEMO_PROFILE or quick)",
    )
    parser.add_argument("--spec", type=Path, default=SPEC, help="job spec to submit")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where artifacts go: OUT/<job id>/")
    args = parser.parse_args(argv)
    if args.profile not in PROFILES:
        parser.error(f"profile must be one of {', '.join(PROFILES)}")

    from cli import model_cache
    from core.settings import get_settings

    settings = get_settings()
    if not model_cache.is_pulled(settings.models_dir, MODEL):
        err.print(f"[red]error:[/red] {MODEL} is not in {settings.models_dir}; run `bakehouse models pull {MODEL}`")
        return 2
    spec = load_spec(args.spec)
    spec["profile"] = args.profile
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the server too
    job: dict[str, Any] | None = None
    try:
        with embedded_server(args.out / "serve.log") as base, BakehouseClient(base) as client:
            job = client.submit(spec)
            out.print(f"submitted {job['id']}: {args.spec.name}, profile {args.profile}, data in {settings.data_dir}")
            try:
                job = wait_with_progress(client, job)
            except KeyboardInterrupt:
                err.print(f"interrupted: cancelling {job['id']}")
                try:
                    client.cancel(job["id"])
                except ApiError as exc:
                    err.print(f"could not cancel {job['id']}: {exc}")
                raise
            print_job(job, all_events(client, job["id"]))
            if job["status"] != "succeeded":
                e = job.get("error") or {}
                err.print(
                    f"[red]job {job['status']}:[/red] {e.get('code')} at stage {e.get('stage')}: {e.get('message')}"
                )
                return 1
            print_metrics(job.get("metrics") or {})
            download_all(client, job, args.out / job["id"])
            return 0
    except KeyboardInterrupt:
        err.print("interrupted; the server is stopped")
        return 130
    except (DemoError, ApiError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())

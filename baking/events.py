"""What the pipeline tells its caller while it runs, and how it fails. No torch here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# assessing follows exporting: the security and verification checks judge the published files
STAGES = (
    "fetching",
    "preparing",
    "baking_persona",
    "baking_tools",
    "optimizing",
    "validating",
    "exporting",
    "assessing",
    "uploading",
)


@dataclass(frozen=True)
class BakeEvent:
    kind: Literal["stage", "progress", "message", "metrics"]
    stage: str
    message: str = ""
    step: int | None = None
    total: int | None = None
    level: Literal["debug", "info", "warning", "error"] = "info"
    data: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[BakeEvent], None]
CancelCheck = Callable[[], bool]


class BakeError(Exception):
    """A failure the user can act on; `code` is stable, `stage` says where it happened."""

    def __init__(self, code: str, message: str, stage: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stage = stage


class BakeCancelled(Exception):
    """Raised between steps when the caller asked to cancel."""


@dataclass(frozen=True)
class ArtifactFile:
    name: str  # relative path inside the artifact directory, "/"-separated
    size: int
    sha256: str


@dataclass
class BakeResult:
    artifact_dir: Path
    files: list[ArtifactFile]
    metrics: dict[str, Any]
    gate: dict[str, Any] | None = None
    report: dict[str, Any] | None = None

"""SQLAlchemy 2.0 ORM: the rows that are the source of truth for jobs and their outputs."""

from models.base import Base
from models.tables import ApiKey, Artifact, ComplianceReport, IdempotencyKey, Job, JobEvent

__all__ = ["ApiKey", "Artifact", "Base", "ComplianceReport", "IdempotencyKey", "Job", "JobEvent"]

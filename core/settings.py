"""Service settings: one pydantic-settings class, read from BAKEHOUSE_* environment variables.

The defaults are the embedded form: a SQLite database, a Celery broker on SQLite through
kombu's SQLAlchemy transport and artifacts in a local directory, all under DATA_DIR.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "bakehouse"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BAKEHOUSE_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir, description="Root of embedded state.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under DATA_DIR.")
    broker_url: str | None = Field(default=None, description="Celery broker; default sqla+sqlite under DATA_DIR.")
    storage_url: str | None = Field(default=None, description="file:///dir or s3://bucket[/prefix].")
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"
    # "tenant:key,tenant:key" pairs for simple deployments; empty means no auth (loopback only).
    api_keys: str = ""
    model_roots: str = Field(default="", description="Comma-separated roots allowed for file:// models.")
    # Empty allows no s3:// model at all: a bucket must be named to be trusted.
    model_buckets: str = Field(default="", description="Comma-separated S3 buckets allowed for s3:// models.")
    max_attempts: int = Field(default=3, ge=1)
    # How long the worker retries an unreachable object store (backoff 0.5-10 s) before failing the job.
    storage_retry_seconds: float = Field(default=120.0, ge=0.0)
    lease_seconds: int = Field(default=60, ge=5)
    heartbeat_seconds: int = Field(default=10, ge=1)
    # Longer than the longest job, so Redis does not redeliver a running job to a second worker.
    visibility_timeout_seconds: int = Field(default=12 * 3600, ge=60)
    queue_name: str = "bake"
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(default=32, ge=4, le=256, description="Deepest nesting a JSON body may have.")
    rate_limit: str = Field(default="600/minute", description="Requests per tenant, in `limits` notation.")
    # None: the broker's Redis when the broker is Redis (shared by every API replica), else memory://.
    rate_limit_storage_url: str | None = None
    max_active_jobs_per_tenant: int = Field(default=8, ge=1, description="Queued + running jobs per tenant.")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bakehouse.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'artifacts'}"

    @property
    def api_key_map(self) -> dict[str, str]:
        """key -> tenant."""
        pairs: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep or not tenant or not key:
                raise ValueError("BAKEHOUSE_API_KEYS takes tenant:key pairs separated by commas")
            pairs[key] = tenant
        return pairs

    @property
    def model_root_paths(self) -> list[Path]:
        roots = [Path(p.strip()).expanduser().resolve() for p in self.model_roots.split(",") if p.strip()]
        return roots or [self.models_dir.resolve()]

    @property
    def model_bucket_names(self) -> frozenset[str]:
        return frozenset(b.strip() for b in self.model_buckets.split(",") if b.strip())

    @property
    def resolved_rate_limit_storage_url(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        broker = self.resolved_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else "memory://"

    @model_validator(mode="after")
    def _fail_fast_on_unsafe_combinations(self) -> Settings:
        _ = self.api_key_map  # malformed keys fail at start, not on the first request
        _parse_rate_limit(self.rate_limit)
        return self


def _parse_rate_limit(value: str) -> None:
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError as exc:
        raise ValueError(f"BAKEHOUSE_RATE_LIMIT {value!r} is not like '600/minute': {exc}") from exc


@lru_cache
def get_settings() -> Settings:
    return Settings()

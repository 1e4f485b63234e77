"""Dependencies as Annotated aliases, so tests swap any of them with `app.dependency_overrides`."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits import RateLimiter
from core.db import get_sessionmaker
from core.queue import enqueue_bake
from core.settings import Settings
from core.store import ObjectStore, open_store
from models import ApiKey

Enqueue = Callable[[str], None]
DEFAULT_TENANT = "default"


def get_settings(request: Request) -> Settings:
    """The Settings the app was created with (`create_app(settings)`)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()  # rolls back whatever the route did not commit


SessionDep = Annotated[Session, Depends(get_session)]


@lru_cache(maxsize=8)
def _store(
    url: str,
    endpoint_url: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    region: str | None,
) -> ObjectStore:
    return open_store(
        url,
        endpoint_url=endpoint_url,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        region=region,
    )


def get_store(settings: SettingsDep) -> ObjectStore:
    return _store(
        settings.resolved_storage_url,
        settings.s3_endpoint_url,
        settings.s3_access_key_id,
        settings.s3_secret_access_key,
        settings.s3_region,
    )


StoreDep = Annotated[ObjectStore, Depends(get_store)]


def get_enqueue(settings: SettingsDep) -> Enqueue:
    broker_url, queue = settings.resolved_broker_url, settings.queue_name

    def enqueue(job_id: str) -> None:
        enqueue_bake(broker_url=broker_url, queue=queue, job_id=job_id)

    return enqueue


QueueDep = Annotated[Enqueue, Depends(get_enqueue)]


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="bakehouse"'})


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Authorization must be 'Bearer <key>'")
    return token.strip()


def _tenant_from_settings(key: str, key_map: dict[str, str]) -> str | None:
    found = None
    for candidate, tenant in key_map.items():  # compare every key, in constant time each
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = tenant
    return found


def get_tenant(request: Request, settings: SettingsDep, session: SessionDep) -> str:
    """The tenant of the bearer key; "default" for everyone when no key is configured at all."""
    key = _bearer(request)
    key_map = settings.api_key_map
    if key is not None:
        tenant = _tenant_from_settings(key, key_map)
        if tenant is not None:
            return tenant
        digest = hashlib.sha256(key.encode()).hexdigest()
        tenant = session.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == digest, ApiKey.revoked.is_(False)))
        if tenant is not None:
            return tenant
    # Revoked rows count as configured: revoking the last key must not open the service.
    if not key_map and not session.scalar(select(exists().where(ApiKey.id.is_not(None)))):
        return DEFAULT_TENANT
    raise _unauthorized("missing bearer key" if key is None else "invalid or revoked API key")


TenantDep = Annotated[str, Depends(get_tenant)]


def enforce_rate_limit(request: Request, tenant: TenantDep) -> None:
    """429 with Retry-After once the tenant is over BAKEHOUSE_RATE_LIMIT; put on the /v1 routers."""
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.retry_after(tenant)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"tenant {tenant!r} is over its request rate ({limiter.description}); retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


RateLimited = Depends(enforce_rate_limit)

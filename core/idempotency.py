"""Idempotency-Key semantics for POST requests (Stripe; IETF draft-ietf-httpapi-idempotency-key-header).

A key is scoped to a tenant and remembers the hash of the first request's body and, once it
finished, its status and response. The same key with the same body replays that response; with
another body it is refused (422); while the first request is still in flight it is refused (409).
Keys live 24 hours; an expired key, or an in-flight reservation abandoned by a crashed process,
is replaced by the next request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import IdempotencyKey
from models.base import utcnow

TTL = timedelta(hours=24)
# Creating a job takes milliseconds; a reservation older than this belongs to a dead request.
IN_FLIGHT_STALE = timedelta(minutes=2)
MAX_KEY_LENGTH = 255


class IdempotencyError(Exception):
    code = "idempotency_error"


class IdempotencyKeyReused(IdempotencyError):
    code = "idempotency_key_reused"


class IdempotencyRequestInFlight(IdempotencyError):
    code = "idempotency_request_in_flight"


class InvalidIdempotencyKey(IdempotencyError):
    code = "invalid_idempotency_key"


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict[str, Any]


def request_hash(payload: Any) -> str:
    """sha256 of the canonical JSON form (sorted keys, no whitespace) of the request body."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reusable(row: IdempotencyKey, now: datetime) -> bool:
    if row.expires_at <= now:
        return True
    return row.status_code is None and row.created_at <= now - IN_FLIGHT_STALE


def begin(*, session: Session, tenant: str, key: str, payload_hash: str) -> Replay | None:
    """Reserve `key` for this request and commit the reservation, or return the stored outcome.

    Returns None when the caller should go ahead (and later call `complete` or `release`).
    """
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidIdempotencyKey(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters")
    now = utcnow()
    row = session.get(IdempotencyKey, (tenant, key))
    if row is not None and _reusable(row, now):
        session.delete(row)
        session.flush()
        row = None
    if row is None:
        session.add(
            IdempotencyKey(
                tenant=tenant,
                key=key,
                request_hash=payload_hash,
                status_code=None,
                response=None,
                created_at=now,
                expires_at=now + TTL,
            )
        )
        try:
            session.commit()
            return None
        except IntegrityError:  # a concurrent request with the same key reserved it first
            session.rollback()
            row = session.get(IdempotencyKey, (tenant, key))
            if row is None:
                raise
    if row.request_hash != payload_hash:
        raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was already used with a different request body")
    if row.status_code is None or row.response is None:
        raise IdempotencyRequestInFlight(f"a request with Idempotency-Key {key!r} is still in progress")
    return Replay(status_code=row.status_code, body=row.response)


def complete(
    *, session: Session, tenant: str, key: str, status_code: int, response: dict[str, Any], job_id: str | None
) -> None:
    """Record the outcome in the caller's transaction, so it commits with the work it describes."""
    row = session.get(IdempotencyKey, (tenant, key))
    if row is None:
        raise LookupError(f"Idempotency-Key {key!r} was not reserved")
    row.status_code = status_code
    row.response = response
    row.job_id = job_id
    session.flush()


def release(*, session: Session, tenant: str, key: str) -> None:
    """Forget a reservation whose request ended without an outcome worth replaying; commits."""
    session.rollback()
    row = session.get(IdempotencyKey, (tenant, key))
    if row is not None:
        session.delete(row)
    session.commit()


def purge_expired(*, session: Session, now: datetime | None = None) -> int:
    """Delete expired keys (housekeeping; expired keys are also replaced lazily). Does not commit."""
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at <= (now or utcnow())))
    return int(getattr(result, "rowcount", 0) or 0)

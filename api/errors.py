"""Every error leaves as application/problem+json (RFC 9457) with a stable `code`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import idempotency, jobs

log = logging.getLogger("bakehouse.api")

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "https://bakehouse.dev/problems/"

# Problem codes of the service layers, by HTTP status.
_JOB_ERROR_STATUS: dict[type[jobs.JobError], int] = {
    jobs.JobNotFound: 404,
    jobs.ArtifactNotFound: 404,
    jobs.ComplianceNotProduced: 404,
    jobs.JobNotCancellable: 409,
    jobs.InvalidCursor: 422,
}
_IDEMPOTENCY_STATUS: dict[type[idempotency.IdempotencyError], int] = {
    idempotency.IdempotencyKeyReused: 422,
    idempotency.IdempotencyRequestInFlight: 409,
    idempotency.InvalidIdempotencyKey: 422,
}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    """Raised by routes and dependencies for a problem response with a given code."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def field_error(field: str, message: str) -> ApiError:
    """A 422 in the same shape as request validation errors, for checks that need the settings."""
    return ApiError(
        422,
        "validation_error",
        f"{field}: {message}",
        extra={"errors": [{"field": field, "message": message}]},
    )


def problem_body(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE_BASE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


def problem_response(
    status: int, code: str, detail: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, code, detail, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers or {}),
    )


def field_path(loc: Sequence[str | int]) -> str:
    """('body', 'tools', 0, 'name') -> 'tools.0.name'; the request part (body/query/...) is dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "body"


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    exc = cast(RequestValidationError, exc)
    errs = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errs):
        ctx = errs[0].get("ctx") or {}
        return problem_response(
            422, "invalid_json", f"request body is not valid JSON: {ctx.get('error', 'parse error')}"
        )
    fields = [{"field": field_path(e.get("loc", ())), "message": _message(e)} for e in errs]
    first = fields[0] if fields else {"field": "body", "message": "invalid"}
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    return problem_response(422, "validation_error", f"{first['field']}: {first['message']}{more}", errors=fields)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    exc = cast(StarletteHTTPException, exc)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return problem_response(exc.status_code, code, detail, headers=exc.headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    exc = cast(ApiError, exc)
    return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)


async def _job_error(_: Request, exc: Exception) -> JSONResponse:
    exc = cast(jobs.JobError, exc)
    return problem_response(_JOB_ERROR_STATUS.get(type(exc), 400), exc.code, exc.message)


async def _idempotency_error(_: Request, exc: Exception) -> JSONResponse:
    exc = cast(idempotency.IdempotencyError, exc)
    return problem_response(_IDEMPOTENCY_STATUS.get(type(exc), 400), exc.code, str(exc))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # The trace goes to the log, never to the client.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal_error", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(jobs.JobError, _job_error)
    app.add_exception_handler(idempotency.IdempotencyError, _idempotency_error)
    app.add_exception_handler(Exception, _unhandled)

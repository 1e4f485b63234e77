"""Request limits: body size, JSON nesting depth and the per-tenant request rate.

Size: refuse early on Content-Length, and count bytes for chunked bodies. Depth: refuse a JSON
body nested deeper than allowed before any parser recurses into it. Rate: a moving window per
tenant with the `limits` library, in memory or in Redis when the deployment shares one.
"""

from __future__ import annotations

import logging
import math
import re
import time

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import problem_response

log = logging.getLogger("bakehouse.api")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body exceeds {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPException from body parsing; the handler renders it.
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413,
            "payload_too_large",
            f"request body exceeds {self.max_bytes} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


# A JSON string literal, escapes included: brackets inside strings do not nest anything.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")
_OPENERS = frozenset(b"[{")


def json_depth_exceeds(body: bytes, max_depth: int) -> bool:
    """True when `body` nests arrays/objects deeper than `max_depth`; linear, no recursion.

    Stops at the first bracket past the limit, so a hostile "[[[[..." costs max_depth steps.
    Malformed JSON is left to the parser to report.
    """
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        depth += 1 if match.group()[0] in _OPENERS else -1
        if depth > max_depth:
            return True
    return False


class JsonDepthLimit:
    """Refuse JSON bodies nested deeper than `max_depth` with a 422, before FastAPI parses them.

    Python's json module and pydantic recurse per level: without this a body of a few thousand
    "[" is a RecursionError (a 500) instead of a client error. The body is buffered, which the
    size limit outside this middleware bounds.
    """

    def __init__(self, app: ASGIApp, max_depth: int) -> None:
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        try:
            messages, body = await _buffer_body(receive)
        except HTTPException as exc:  # the size limit outside us stopped the body; no route is there to render it
            response = problem_response(exc.status_code, "payload_too_large", str(exc.detail))
            await response(scope, receive, send)
            return
        if json_depth_exceeds(body, self.max_depth):
            response = problem_response(
                422, "json_too_deep", f"request body nests JSON deeper than {self.max_depth} levels"
            )
            await response(scope, receive, send)
            return
        replay = iter(messages)

        async def replaying_receive() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replaying_receive, send)


async def _buffer_body(receive: Receive) -> tuple[list[Message], bytes]:
    messages: list[Message] = []
    body = bytearray()
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return messages, bytes(body)


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse the body as JSON: it does so for JSON types and for no type at all."""
    headers = dict(scope.get("headers") or [])
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/json") or (
        content_type.startswith(b"application/") and content_type.endswith(b"+json")
    )


class RateLimiter:
    """Requests per tenant over a moving window; `limit` is `limits` notation ("600/minute")."""

    def __init__(self, limit: str, storage_url: str) -> None:
        self.items: list[RateLimitItem] = parse_many(limit)
        self.description = limit
        options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0} if storage_url.startswith("redis") else {}
        self.strategy = MovingWindowRateLimiter(storage_from_string(storage_url, **options))

    def retry_after(self, tenant: str) -> int | None:
        """Count one request; None when it may go ahead, else the seconds until it would."""
        try:
            for item in self.items:
                if not self.strategy.hit(item, "tenant", tenant):
                    reset_at, _ = self.strategy.get_window_stats(item, "tenant", tenant)
                    return max(1, math.ceil(reset_at - time.time()))
        except Exception:
            # The counters live in Redis and it is down: serving uncounted beats refusing every tenant.
            log.warning("rate limit store unavailable; request not counted", exc_info=True)
        return None

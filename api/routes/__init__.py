"""HTTP routes: thin functions that parse, call one service function and return a schema.

Each router carries its full path prefix (not one added at include time), so `scope["route"].path`
is the whole template the metrics label requests with.
"""

from typing import Any

from api.errors import PROBLEM_JSON

API_PREFIX = "/v1"


def problem(description: str) -> dict[str, Any]:
    """An OpenAPI response entry for an application/problem+json error."""
    return {"description": description, "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


# Every /v1 route authenticates the tenant, validates its parameters and counts the tenant
# against its request rate. Declared here once so the OpenAPI document names every answer.
TENANT_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem("Missing or invalid API key"),
    422: problem("Invalid request: `errors` names each field"),
    429: problem("Over the tenant's request rate (BAKEHOUSE_RATE_LIMIT); wait `Retry-After` seconds"),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem("No such job, or it belongs to another tenant")}

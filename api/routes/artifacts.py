"""/v1/bake-jobs/{id}/artifacts: list, and download with ETag and byte ranges."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response, StreamingResponse

from api.deps import RateLimited, SessionDep, StoreDep, TenantDep
from api.errors import ApiError
from api.routes import API_PREFIX, NOT_FOUND, TENANT_RESPONSES, problem
from api.schemas import ArtifactPublic, ArtifactsPublic
from api.services import etag_matches, parse_range
from core import jobs
from core.store import StoreError, validate_key

router = APIRouter(
    prefix=API_PREFIX + "/bake-jobs/{job_id}/artifacts",
    tags=["artifacts"],
    dependencies=[RateLimited],
    responses={**TENANT_RESPONSES, **NOT_FOUND},
)


@router.get("", response_model=ArtifactsPublic)
def list_artifacts(job_id: str, tenant: TenantDep, session: SessionDep) -> ArtifactsPublic:
    rows = jobs.list_artifacts(session=session, tenant=tenant, job_id=job_id)
    return ArtifactsPublic(data=[ArtifactPublic.from_row(a) for a in rows])


@router.get(
    "/{name:path}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "Partial content"},
        304: {"description": "Not modified"},
        416: problem("Range not satisfiable; `Content-Range` gives the size"),
    },
)
def download_artifact(
    job_id: str,
    name: str,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    if_range: Annotated[str | None, Header(alias="If-Range")] = None,
) -> Response:
    """Names may contain "/" (e.g. `merged/config.json`), URL-encoded or not."""
    try:
        validate_key(name)
    except StoreError as exc:
        raise ApiError(422, "invalid_artifact_name", str(exc)) from exc
    artifact = jobs.get_artifact(session=session, tenant=tenant, job_id=job_id, name=name)
    session.close()  # the stream below may be long; do not hold a pooled connection for it
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0, must-revalidate"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    try:
        size = store.size(artifact.storage_key)
    except (FileNotFoundError, StoreError) as exc:
        raise ApiError(404, "artifact_missing", f"artifact {name!r} is recorded but not in the store") from exc
    byte_range = parse_range(range_ if if_range in (None, etag) else None, size)
    filename = name.rsplit("/", 1)[-1]
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if byte_range is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            store.open_range(artifact.storage_key), media_type="application/octet-stream", headers=headers
        )
    headers["Content-Length"] = str(byte_range.length)
    headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{size}"
    return StreamingResponse(
        store.open_range(artifact.storage_key, byte_range.start, byte_range.end),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )

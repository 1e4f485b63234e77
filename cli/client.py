"""A small HTTP client for the Bakehouse API, used by the CLI (and usable from scripts)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A problem+json answer (or an unreachable server), reduced to what a person needs."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}" if code else detail)
        self.status, self.code, self.detail = status, code, detail


class BakehouseClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=f"{self.url}/v1", headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> BakehouseClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _problem(response)
        return response

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._request("POST", "/bake-jobs", json=spec, headers=headers).json())

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/bake-jobs/{job_id}").json())

    def list_jobs(self, *, status: str | None = None, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if after:
            params["after"] = after
        return dict(self._request("GET", "/bake-jobs", params=params).json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/bake-jobs/{job_id}/cancel").json())

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """One page of events, oldest first; `after` is the last event id already seen."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        body = self._request("GET", f"/bake-jobs/{job_id}/events", params=params).json()
        return list(body["data"] if isinstance(body, dict) else body)

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        body = self._request("GET", f"/bake-jobs/{job_id}/artifacts").json()
        return list(body["data"] if isinstance(body, dict) else body)

    def compliance(self, job_id: str, fmt: str = "json") -> str:
        return self._request("GET", f"/bake-jobs/{job_id}/compliance", params={"format": fmt}).text

    def download(self, job_id: str, artifact: dict[str, Any], out_dir: Path) -> Path:
        """Stream one artifact to out_dir/name, verifying size and sha256; nothing half-written."""
        name = str(artifact["name"])
        target = (out_dir / name).resolve()
        if not target.is_relative_to(out_dir.resolve()):
            raise ApiError(0, "invalid_artifact_name", f"refusing to write {name!r} outside {out_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with self.http.stream("GET", f"/bake-jobs/{job_id}/artifacts/{name}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise _problem(response)
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1024 * 1024):
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise ApiError(0, "download_failed", f"{name}: {exc}") from exc
        if size != artifact["size"] or digest.hexdigest() != artifact["sha256"]:
            tmp.unlink(missing_ok=True)
            raise ApiError(
                0,
                "checksum_mismatch",
                f"{name}: got {size} bytes sha256 {digest.hexdigest()}, "
                f"expected {artifact['size']} bytes sha256 {artifact['sha256']}",
            )
        tmp.replace(target)
        return target


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, f"http_{response.status_code}", response.text[:500])
    if not isinstance(body, dict):
        return ApiError(response.status_code, f"http_{response.status_code}", str(body)[:500])
    detail = str(body.get("detail") or body.get("title") or body)
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        detail += "".join(
            f"\n  - {e.get('field', e.get('loc', ''))}: {e.get('message', e.get('msg', e))}"
            if isinstance(e, dict)
            else f"\n  - {e}"
            for e in errors[:20]
        )
    return ApiError(response.status_code, str(body.get("code", f"http_{response.status_code}")), detail)

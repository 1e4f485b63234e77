"""The FastAPI app factory: `uvicorn --factory api.main:create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.limits import BodySizeLimit, JsonDepthLimit, RateLimiter
from api.metrics import Metrics, MetricsMiddleware
from api.routes import artifacts, compliance, health, jobs
from api.schemas import Problem
from core.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Bakehouse",
        version="0.1.0",
        summary="Bake tool use and a persona into a small language model, compress it, prove it, ship it.",
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.rate_limiter = RateLimiter(settings.rate_limit, settings.resolved_rate_limit_storage_url)
    errors.install(app)
    for module in (jobs, artifacts, compliance, health):
        app.include_router(module.router)
    # Last added runs first: the size limit bounds what the depth limit buffers.
    app.add_middleware(JsonDepthLimit, max_depth=settings.max_json_depth)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: sees every response
    _document_problem(app)
    return app


def _document_problem(app: FastAPI) -> None:
    """Put the Problem schema into the OpenAPI components, where the error responses refer to it."""
    original = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(problem.pop("$defs", {}))
            components.setdefault("Problem", problem)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# `uvicorn api.main:app --factory` and `uvicorn --factory api.main:create_app` both work.
app = create_app

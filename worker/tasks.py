"""Thin Celery tasks: take an id, hand it to the runner (STYLE #6). Safe to run twice."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from core.queue import BAKE_TASK
from core.settings import get_settings
from worker.celery_app import app


@app.task(
    name=BAKE_TASK,
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def run_bake_job(job_id: str) -> str:
    """Claim the job, run it, record the outcome. Returns what happened, for the worker log."""
    from worker.runner import run_job

    return run_job(job_id, get_settings())

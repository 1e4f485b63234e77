"""Minimal human renderings of a compliance report's JSON (rich rendering belongs elsewhere)."""

from __future__ import annotations

import html
import json
from typing import Any


def _checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = report.get("checks")
    return [c for c in checks if isinstance(c, dict)] if isinstance(checks, list) else []


def _cell(value: Any) -> str:
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")


def report_markdown(job_id: str, report: dict[str, Any]) -> str:
    gate_value = report.get("gate")
    gate: dict[str, Any] = gate_value if isinstance(gate_value, dict) else {}
    lines = [
        f"# Compliance report for {job_id}",
        "",
        f"- score: {report.get('score', gate.get('score', 'n/a'))}",
        f"- gate passed: {gate.get('passed', report.get('gate_passed', 'n/a'))}",
        "",
    ]
    checks = _checks(report)
    if checks:
        lines += ["| id | area | severity | result | measured | criterion |", "|---|---|---|---|---|---|"]
        lines += [
            "| "
            + " | ".join(_cell(c.get(k)) for k in ("id", "area", "severity", "status", "value", "criterion"))
            + " |"
            for c in checks
        ]
    else:
        lines += ["```json", json.dumps(report, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def report_html(job_id: str, report: dict[str, Any]) -> str:
    title = html.escape(f"Compliance report for {job_id}")
    body = html.escape(json.dumps(report, indent=2, sort_keys=True))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1><pre>{body}</pre></body></html>"
    )

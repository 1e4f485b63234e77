"""api.render: the compliance report as Markdown and as a self-contained HTML page."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from api.render import area_summary, render_html, render_markdown, report_html, report_markdown

EVIL = "<script>alert(1)</script>"


def report() -> dict[str, Any]:
    def check(i: str, area: str, severity: str, status: str, **kw: Any) -> dict[str, Any]:
        return {
            "id": i,
            "area": area,
            "severity": severity,
            "status": status,
            "value": kw.get("value", 1.0),
            "criterion": kw.get("criterion", "c"),
            "evidence": kw.get("evidence", {}),
            "maps_to": ["anchor"],
        }

    return {
        "job_id": "bj_1",
        "created_at": "2025-01-01T00:00:00+00:00",
        "profile": "default",
        "score": 0.8,
        "gate": {"passed": False, "score": 0.8, "threshold": 0.95, "reasons": ["critical check S4 failed"]},
        "checks": [
            check("S1", "safety", "critical", "pass"),
            check("S4", "safety", "critical", "fail", evidence={"invalid": [EVIL]}, value="a | b"),
            check("S5", "safety", "high", "not_applicable"),
            check("X1", "security", "critical", "pass", criterion=EVIL),
            check("V1", "verification", "high", "pass"),
            check("R2", "risk", "critical", "fail"),
        ],
        "risk_register": [
            {
                "check": "S4",
                "risk": "calls invalid",
                "severity": "critical",
                "likelihood": 5,
                "priority": "high",
                "mitigation": EVIL,
            }
        ],
        "disclaimer": "Automated evidence, not a certification.",
        "training_loss": [2.0, 1.6, float("nan"), 1.1],
        "latency_ms": {"baseline": {"p50": 40.0, "p95": 50.0, "p99": 60.0}, "baked": {"p50": 10.0, "p95": 12.0}},
    }


def test_area_summary_counts_pass_share_of_applicable_checks() -> None:
    areas = {a["area"]: a for a in area_summary(report())}
    assert areas["safety"] == {
        "area": "safety",
        "title": "Safety analysis",
        "passed": 1,
        "failed": 1,
        "not_applicable": 1,
        "share": 0.5,
    }
    assert areas["security"]["share"] == 1.0 and areas["risk"]["share"] == 0.0


def test_markdown_has_every_section_and_escapes_user_text() -> None:
    md = render_markdown(report(), {"id": "bj_1", "metrics": {}})
    assert md.startswith("# Compliance report for bj_1\n")
    for heading in ("## Areas", "## Latency (ms)", "## Training loss", "## Checks", "## Risk register"):
        assert heading in md
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "a \\| b" in md  # a pipe in a value does not break the table
    assert "| baked | 10.0 | 12.0 |  |" in md
    assert "3 steps: first 2.0000, last 1.1000" in md  # the NaN step is dropped
    assert "> Automated evidence, not a certification." in md


def test_html_is_self_contained_with_svg_charts_and_escaped_text() -> None:
    page = render_html(report(), {"id": "bj_1"})
    assert page.count("<svg") == 3  # areas, latency, loss
    assert "<polyline" in page
    assert "<script" not in page.replace("&lt;script", "")  # no script anywhere, the evil one escaped
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # no CDN
    assert "gate failed" in page and "critical check S4 failed" in page
    assert '<tr class="fail">' in page and '<tr class="pass">' in page
    parser = HTMLParser()
    parser.feed(page)  # well-formed enough to parse


def test_job_metrics_latency_wins_over_the_report() -> None:
    job = {
        "id": "bj_1",
        "metrics": {
            "latency_ms": {
                "baseline": {"p50": 99.0, "p95": 99.0, "p99": 99.0},
                "baked": {"p50": 33.0, "p95": 33.0, "p99": 33.0},
            }
        },
    }
    assert "| baked | 33.0 | 33.0 | 33.0 |" in render_markdown(report(), job)


def test_minimal_report_still_renders_through_the_route_signatures() -> None:
    minimal = {"score": 0.9, "gate": {"passed": False}, "failed": ["S4"]}
    md = report_markdown("bj_2", minimal)
    assert md.startswith("# Compliance report for bj_2") and "```json" in md
    page = report_html("bj_2", minimal)
    assert "<pre>" in page and "<svg" not in page and "gate failed" in page
    assert "Compliance report for &lt;b&gt;" in report_html("<b>", minimal)

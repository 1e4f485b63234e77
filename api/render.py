"""Human renderings of a compliance report (DESIGN.md §7): Markdown and a self-contained HTML page.

The page draws per-area pass shares, the latency distribution and the training loss curve as
inline SVG: no script, no stylesheet or font from elsewhere. Every string that comes from the
report or the job is escaped. `report_markdown` / `report_html` keep the route's signatures.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

AREAS = (
    ("safety", "Safety analysis"),
    ("security", "Security assessment"),
    ("verification", "Independent verification"),
    ("risk", "Risk management"),
)
STATUS_COLOR = {"pass": "#1a7f37", "fail": "#cf222e", "not_applicable": "#6e7781"}
PERCENTILES = ("p50", "p95", "p99")


# --------------------------------------------------------------------------- reading the inputs


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _checks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    checks = report.get("checks")
    return [c for c in checks if isinstance(c, dict)] if isinstance(checks, list) else []


def _gate(report: Mapping[str, Any]) -> dict[str, Any]:
    gate = report.get("gate")
    return gate if isinstance(gate, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def area_summary(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per area: passed, failed, not applicable, and the pass share of the applicable checks."""
    out = []
    for key, title in AREAS:
        rows = [c for c in _checks(report) if c.get("area") == key]
        if not rows:
            continue
        passed = sum(c.get("status") == "pass" for c in rows)
        failed = sum(c.get("status") == "fail" for c in rows)
        applicable = passed + failed
        out.append(
            {
                "area": key,
                "title": title,
                "passed": passed,
                "failed": failed,
                "not_applicable": len(rows) - applicable,
                "share": passed / applicable if applicable else None,
            }
        )
    return out


def latency(report: Mapping[str, Any], job: Any) -> dict[str, dict[str, float]]:
    """{"baseline": {p50, p95, p99}, "baked": {...}} from the job's metrics, else from the report."""
    metrics = _get(job, "metrics") if job is not None else None
    source = (metrics or {}).get("latency_ms") if isinstance(metrics, Mapping) else None
    if not isinstance(source, Mapping):
        source = report.get("latency_ms")
    out: dict[str, dict[str, float]] = {}
    for series in ("baseline", "baked"):
        values = source.get(series) if isinstance(source, Mapping) else None
        if isinstance(values, Mapping):
            nums = {p: _number(values.get(p)) for p in PERCENTILES}
            out[series] = {p: v for p, v in nums.items() if v is not None}
    return {k: v for k, v in out.items() if v}


def training_loss(report: Mapping[str, Any]) -> list[float]:
    raw = report.get("training_loss")
    if not isinstance(raw, list):
        return []
    return [v for v in (_number(x) for x in raw) if v is not None]


def _text(value: Any, limit: int = 300) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _job_id(report: Mapping[str, Any], job: Any) -> str:
    return str(_get(job, "id") or report.get("job_id") or "unknown job")


# --------------------------------------------------------------------------- Markdown


def _md(value: Any, limit: int = 300) -> str:
    """A Markdown table cell: no raw HTML, no pipe or newline that would break the table."""
    return html.escape(_text(value, limit), quote=False).replace("|", "\\|").replace("\n", " ")


def _bar(share: float | None, width: int = 20) -> str:
    if share is None:
        return "n/a"
    filled = round(share * width)
    return "█" * filled + "░" * (width - filled) + f" {share:.0%}"


def render_markdown(report: Mapping[str, Any], job: Any = None) -> str:
    gate = _gate(report)
    passed = gate.get("passed", report.get("gate_passed"))
    lines = [f"# Compliance report for {_md(_job_id(report, job))}", ""]
    lines += [
        f"- score: {_md(report.get('score', gate.get('score', 'n/a')))}",
        f"- gate passed: {_md(passed if passed is not None else 'n/a')}",
    ]
    if gate.get("threshold") is not None:
        lines.append(f"- required score: {_md(gate['threshold'])}")
    for key in ("profile", "created_at"):
        if report.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {_md(report[key])}")
    lines += [f"- reason: {_md(r)}" for r in gate.get("reasons") or []]
    lines.append("")
    areas = area_summary(report)
    if areas:
        lines += ["## Areas", "", "| area | passed | failed | n/a | pass share |", "|---|---|---|---|---|"]
        lines += [
            f"| {a['title']} | {a['passed']} | {a['failed']} | {a['not_applicable']} | {_bar(a['share'])} |"
            for a in areas
        ]
        lines.append("")
    lat = latency(report, job)
    if lat:
        lines += ["## Latency (ms)", "", "| model | " + " | ".join(PERCENTILES) + " |", "|---|---|---|---|"]
        lines += [
            f"| {series} | " + " | ".join(f"{v[p]:.1f}" if p in v else "" for p in PERCENTILES) + " |"
            for series, v in lat.items()
        ]
        lines.append("")
    loss = training_loss(report)
    if loss:
        lines += [
            "## Training loss",
            "",
            f"{len(loss)} steps: first {loss[0]:.4f}, last {loss[-1]:.4f}, min {min(loss):.4f}",
            "",
        ]
    checks = _checks(report)
    if checks:
        lines += [
            "## Checks",
            "",
            "| id | area | severity | result | measured | criterion | maps to |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            mark = {"pass": "✅ pass", "fail": "❌ fail", "not_applicable": "— n/a"}.get(
                str(c.get("status")), _md(c.get("status"))
            )
            lines.append(
                "| "
                + " | ".join(
                    [
                        _md(c.get("id")),
                        _md(c.get("area")),
                        _md(c.get("severity")),
                        mark,
                        _md(c.get("value")),
                        _md(c.get("criterion")),
                        _md("; ".join(map(str, c.get("maps_to") or []))),
                    ]
                )
                + " |"
            )
        lines.append("")
        failed = [c for c in checks if c.get("status") == "fail"]
        if failed:
            lines += ["### Evidence for failed checks", ""]
            lines += [f"- **{_md(c.get('id'))}**: {_md(c.get('evidence'), 600)}" for c in failed]
            lines.append("")
    else:
        lines += ["```json", json.dumps(report, indent=2, sort_keys=True, default=str).replace("```", "'''"), "```", ""]
    register = report.get("risk_register")
    if isinstance(register, list) and register:
        lines += [
            "## Risk register",
            "",
            "| check | risk | severity | likelihood | priority | mitigation |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            "| "
            + " | ".join(_md(r.get(k)) for k in ("check", "risk", "severity", "likelihood", "priority", "mitigation"))
            + " |"
            for r in register
            if isinstance(r, dict)
        ]
        lines.append("")
    if report.get("disclaimer"):
        lines += [f"> {_md(report['disclaimer'], 1000)}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- SVG


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def svg_area_bars(areas: Sequence[Mapping[str, Any]]) -> str:
    width, label_w, bar_w, row_h = 560, 190, 300, 26
    height = row_h * len(areas) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="pass share per area">'
    ]
    for i, a in enumerate(areas):
        y = 4 + i * row_h
        share = a["share"]
        fill = STATUS_COLOR["pass"] if share == 1 else STATUS_COLOR["fail"] if share is not None else "#6e7781"
        parts.append(f'<text x="0" y="{y + 15}" font-size="13">{_e(a["title"])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="18" fill="#eaeef2"/>')
        if share is not None:
            parts.append(f'<rect x="{label_w}" y="{y}" width="{share * bar_w:.1f}" height="18" fill="{fill}"/>')
        label = f"{share:.0%} ({a['passed']}/{a['passed'] + a['failed']})" if share is not None else "n/a"
        parts.append(f'<text x="{label_w + bar_w + 6}" y="{y + 14}" font-size="12">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_latency(lat: Mapping[str, Mapping[str, float]]) -> str:
    width, height, left, bottom, top = 560, 220, 48, 30, 24
    plot_h = height - bottom - top
    peak = max((v for s in lat.values() for v in s.values()), default=1.0) or 1.0
    colors = {"baseline": "#8c959f", "baked": "#0969da"}
    group_w = (width - left - 20) / len(PERCENTILES)
    bar_w = group_w / (len(lat) + 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="latency percentiles in milliseconds">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#57606a"/>',
        f'<text x="0" y="{top + 4}" font-size="11">{peak:.0f} ms</text>',
        f'<text x="0" y="{top + plot_h}" font-size="11">0</text>',
    ]
    for g, p in enumerate(PERCENTILES):
        x0 = left + g * group_w + bar_w / 2
        for s, (series, values) in enumerate(lat.items()):
            if p not in values:
                continue
            h = values[p] / peak * plot_h
            x = x0 + s * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w * 0.9:.1f}" height="{h:.1f}" '
                f'fill="{colors.get(series, "#6e7781")}"><title>{_e(series)} {p}: {values[p]:.1f} ms'
                f"</title></rect>"
            )
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h - h - 3:.1f}" font-size="10">{values[p]:.0f}</text>')
        parts.append(f'<text x="{x0 + bar_w * len(lat) / 2 - 8:.1f}" y="{height - 10}" font-size="12">{p}</text>')
    for s, series in enumerate(lat):
        parts.append(
            f'<rect x="{width - 150 + s * 75}" y="4" width="10" height="10" '
            f'fill="{colors.get(series, "#6e7781")}"/><text x="{width - 136 + s * 75}" y="13" '
            f'font-size="11">{_e(series)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_loss(loss: Sequence[float]) -> str:
    width, height, left, bottom, top = 560, 200, 48, 24, 10
    plot_w, plot_h = width - left - 10, height - top - bottom
    lo, hi = min(loss), max(loss)
    span = (hi - lo) or 1.0
    step = plot_w / max(1, len(loss) - 1)
    points = " ".join(f"{left + i * step:.1f},{top + (hi - v) / span * plot_h:.1f}" for i, v in enumerate(loss))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="training loss per step">'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#57606a"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#57606a"/>'
        f'<text x="0" y="{top + 10}" font-size="11">{hi:.3f}</text>'
        f'<text x="0" y="{top + plot_h}" font-size="11">{lo:.3f}</text>'
        f'<text x="{left}" y="{height - 6}" font-size="11">step 1</text>'
        f'<text x="{width - 70}" y="{height - 6}" font-size="11">step {len(loss)}</text>'
        f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{points}"/></svg>'
    )


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1f2328}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.value,td.evidence{font-family:ui-monospace,monospace;font-size:12px;word-break:break-word}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600}
.pass{background:#dafbe1}.fail{background:#ffebe9}.not_applicable{background:#f6f8fa;color:#6e7781}
.gate-pass{background:#1a7f37}.gate-fail{background:#cf222e}
.disclaimer{border-left:4px solid #bf8700;background:#fff8c5;padding:.5rem 1rem}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="{_e(row_classes[i]) if i < len(row_classes) else ""}">' + "".join(r) + "</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any], job: Any = None) -> str:
    gate = _gate(report)
    passed = gate.get("passed", report.get("gate_passed"))
    title = f"Compliance report for {_job_id(report, job)}"
    out = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
    ]
    badge = "gate-pass" if passed is True else "gate-fail"
    verdict = "gate passed" if passed is True else "gate failed" if passed is False else "gate n/a"
    out.append(
        f"<p><span class='badge {badge}'>{_e(verdict)}</span> score "
        f"<strong>{_e(report.get('score', gate.get('score', 'n/a')))}</strong>"
        + (f" (required {_e(gate['threshold'])})" if gate.get("threshold") is not None else "")
        + "".join(f" · {_e(k.replace('_', ' '))} {_e(report[k])}" for k in ("profile", "created_at") if report.get(k))
        + "</p>"
    )
    reasons = gate.get("reasons") or []
    if reasons:
        out.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    areas = area_summary(report)
    if areas:
        out.append("<h2>Areas</h2>" + svg_area_bars(areas))
    lat = latency(report, job)
    if lat:
        out.append("<h2>Latency distribution</h2>" + svg_latency(lat))
    loss = training_loss(report)
    if len(loss) >= 2:
        out.append("<h2>Training loss</h2>" + svg_loss(loss))
    checks = _checks(report)
    if checks:
        rows = [
            [
                f"<td>{_e(c.get('id', ''))}</td>",
                f"<td>{_e(c.get('area', ''))}</td>",
                f"<td>{_e(c.get('severity', ''))}</td>",
                f"<td>{_e(c.get('status', ''))}</td>",
                f"<td class='value'>{_e(_text(c.get('value')))}</td>",
                f"<td>{_e(c.get('criterion', ''))}</td>",
                f"<td class='evidence'>{_e(_text(c.get('evidence'), 600))}</td>",
                f"<td>{_e('; '.join(map(str, c.get('maps_to') or [])))}</td>",
            ]
            for c in checks
        ]
        out.append(
            "<h2>Checks</h2>"
            + _table(
                ["id", "area", "severity", "result", "measured", "criterion", "evidence", "maps to"],
                rows,
                [str(c.get("status", "")) for c in checks],
            )
        )
    register = [r for r in report.get("risk_register") or [] if isinstance(r, dict)]
    if register:
        keys = ("check", "risk", "severity", "likelihood", "priority", "mitigation")
        out.append(
            "<h2>Risk register</h2>" + _table(keys, [[f"<td>{_e(r.get(k, ''))}</td>" for k in keys] for r in register])
        )
    if report.get("disclaimer"):
        out.append(f"<p class='disclaimer'>{_e(report['disclaimer'])}</p>")
    out.append(
        "<details><summary>Report JSON</summary><pre>"
        + _e(json.dumps(report, indent=2, sort_keys=True, default=str))
        + "</pre></details></body></html>"
    )
    return "".join(out)


# --------------------------------------------------------------------------- route signatures


def report_markdown(job_id: str, report: dict[str, Any], job: Any = None) -> str:
    return render_markdown(report, job if job is not None else {"id": job_id})


def report_html(job_id: str, report: dict[str, Any], job: Any = None) -> str:
    return render_html(report, job if job is not None else {"id": job_id})

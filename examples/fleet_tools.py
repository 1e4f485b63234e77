"""Real, deterministic implementations of the three tools in examples/fleet-assistant.yaml.

Standard library only, so the example's `result` fields can be regenerated anywhere
(`python examples/build_fleet_examples.py`) and re-checked by tests/unit/test_examples.py.

- get_vehicle_signal(signal): one reading from a fixed simulated vehicle state.
- search_manual(query, section): BM25 keyword search over examples/vehicle_manual.md.
- calculator(expression): arithmetic evaluated by walking a whitelisted `ast`, never `eval`.
- execute(name, arguments): dispatch; bad input comes back as {"error": "..."}.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

MANUAL_PATH = Path(__file__).resolve().parent / "vehicle_manual.md"

SIGNALS = (
    "speed",
    "battery_voltage",
    "coolant_temp",
    "tire_pressure_front_left",
    "tire_pressure_front_right",
    "fuel_level",
    "odometer",
)
SECTIONS = ("engine", "brakes", "electrical", "adas", "maintenance")


class ToolError(ValueError):
    """Invalid tool input; `execute` turns it into {"error": message}."""


# --- get_vehicle_signal -------------------------------------------------------------------

# A fixed snapshot of the simulated vehicle: cruising on a motorway, engine warm, alternator
# charging, front-left tyre somewhat below the 230 kPa cold specification.
VEHICLE_STATE: dict[str, tuple[float, str]] = {
    "speed": (87.0, "km/h"),
    "battery_voltage": (14.1, "V"),
    "coolant_temp": (92.0, "°C"),
    "tire_pressure_front_left": (214.0, "kPa"),
    "tire_pressure_front_right": (232.0, "kPa"),
    "fuel_level": (38.0, "%"),
    "odometer": (48213.0, "km"),
}


def get_vehicle_signal(signal: str) -> dict[str, Any]:
    if signal not in VEHICLE_STATE:
        raise ToolError(f"unknown signal {signal!r}; expected one of {', '.join(SIGNALS)}")
    value, unit = VEHICLE_STATE[signal]
    return {"signal": signal, "value": value, "unit": unit}


# --- search_manual (BM25) -----------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "my",
        "of",
        "on",
        "or",
        "should",
        "the",
        "to",
        "what",
        "when",
        "which",
        "with",
        "you",
        "your",
    }
)
_HEADING = re.compile(r"^##\s+(\w+)\s*:\s*(.+?)\s*$")


def tokenize(text: str) -> list[str]:
    """Lowercase words, stop words dropped, a trailing plural 's' stripped ('pads' -> 'pad')."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def load_manual(path: Path = MANUAL_PATH) -> list[dict[str, str]]:
    """Passages of the manual: each `## section: title` heading and the lines under it."""
    passages: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    lines: list[str] = []

    def flush() -> None:
        if current is not None:
            current["text"] = " ".join(line.strip() for line in lines if line.strip())
            passages.append(current)

    for line in path.read_text(encoding="utf-8").splitlines():
        m = _HEADING.match(line)
        if m:
            flush()
            section, title = m.group(1).lower(), m.group(2)
            if section not in SECTIONS:
                raise ValueError(f"{path.name}: heading {line!r} names unknown section {section!r}")
            current, lines = {"section": section, "title": title}, []
        elif current is not None and not line.startswith("#"):
            lines.append(line)
    flush()
    return passages


class BM25:
    """Okapi BM25 over a fixed list of documents (k1=1.5, b=0.75, non-negative idf)."""

    def __init__(self, documents: list[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(doc) for doc in documents]
        self.lengths = [len(doc) for doc in documents]
        self.avgdl = sum(self.lengths) / max(len(documents), 1)
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(documents)
        self.idf = {term: math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for term, d in df.items()}

    def score(self, query: list[str], index: int) -> float:
        tf, length = self.tfs[index], self.lengths[index]
        total = 0.0
        for term in query:
            f = tf.get(term, 0)
            if f:
                norm = f + self.k1 * (1.0 - self.b + self.b * length / self.avgdl)
                total += self.idf[term] * f * (self.k1 + 1.0) / norm
        return total


@lru_cache(maxsize=1)
def _index() -> tuple[list[dict[str, str]], BM25]:
    passages = load_manual()
    return passages, BM25([tokenize(p["title"] + " " + p["text"]) for p in passages])


def search_manual(query: str, section: str, top_k: int = 2) -> dict[str, Any]:
    if section not in SECTIONS:
        raise ToolError(f"unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
    if not isinstance(query, str) or not query.strip():
        raise ToolError("query must be a non-empty string")
    passages, bm25 = _index()
    terms = tokenize(query)
    scored = [(bm25.score(terms, i), i) for i, p in enumerate(passages) if p["section"] == section]
    # Highest score first; ties keep manual order. Passages sharing no term are not results.
    ranked = sorted((s for s in scored if s[0] > 0.0), key=lambda s: (-s[0], s[1]))
    return {"results": [dict(passages[i]) for _, i in ranked[:top_k]]}


# --- calculator ---------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e15


def _walk(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
        if isinstance(node.op, ast.Div) and right == 0:
            raise ToolError("division by zero")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return value
    raise ToolError(f"unsupported element {type(node).__name__}: only numbers, + - * / ** and ( ) are allowed")


def calculator(expression: str) -> dict[str, Any]:
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression: {exc.msg}") from None
    value = _walk(tree)
    if isinstance(value, float):
        value = round(value, 6)  # drop binary-float noise such as 0.30000000000000004
    return {"expression": expression, "result": value}


# --- dispatch -----------------------------------------------------------------------------

TOOLS = {"get_vehicle_signal": get_vehicle_signal, "search_manual": search_manual, "calculator": calculator}


def execute(name: str, arguments: dict[str, Any]) -> Any:
    """Run tool `name` with keyword `arguments`; invalid calls return {"error": message}."""
    fn = TOOLS.get(name)
    if fn is None:
        return {"error": f"unknown tool {name!r}; expected one of {', '.join(TOOLS)}"}
    if not isinstance(arguments, dict):
        return {"error": "arguments must be an object"}
    try:
        return fn(**arguments)
    except ToolError as exc:
        return {"error": str(exc)}
    except TypeError as exc:  # missing or unexpected argument names
        return {"error": f"bad arguments for {name}: {exc}"}

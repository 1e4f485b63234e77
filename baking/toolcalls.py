"""The tool-call wire format (DESIGN.md §4) and the argument checker behind `tool_call_accuracy` (§6).

A baked model answers a tool-worthy query with exactly

    <tool_call>
    {"name": "get_vehicle_signal", "arguments": {"signal": "speed"}}
    </tool_call>

This module renders that text, parses it back (strictly for training data, tolerantly for
generations that run on or get cut off), validates a call against the tool's JSON Schema and
decides whether a generated call's arguments match the expected ones. Stdlib + jsonschema only:
the API, the worker and the torch pipeline all import it.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

__all__ = [
    "KEYWORD_THRESHOLD",
    "MATCH_RULES",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ParsedCall",
    "Tool",
    "ToolCallParseError",
    "ToolDef",
    "argument_matches",
    "arguments_match",
    "format_tool_call",
    "has_tool_call",
    "parse_first_call",
    "parse_tool_calls",
    "safe_eval_arithmetic",
    "validate_call",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
MATCH_RULES = ("exact", "case_insensitive", "keywords", "expression")

# A "keywords" argument matches when at least this share of the expected string's content
# keywords (and at least one) appear among the generated string's keywords. 0.6 lets a model
# drop or rephrase a minor word of a search query but not swap the topic.
KEYWORD_THRESHOLD = 0.6


# --------------------------------------------------------------------------- format and parse


class ToolCallParseError(ValueError):
    """Text that claims to hold a tool call but does not hold a well-formed one."""


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The exact text the baked model is trained to emit for one call."""
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def has_tool_call(text: str) -> bool:
    """Whether the text even tries to call a tool; malformed attempts count (irrelevance metric)."""
    return TOOL_CALL_OPEN in text


def _reject_constant(token: str) -> Any:
    # json accepts NaN/Infinity by default; they are not JSON and no tool expects them.
    raise ValueError(f"non-standard JSON constant {token}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _call_from_object(obj: Any) -> ParsedCall:
    if not isinstance(obj, dict):
        raise ToolCallParseError(f"tool call must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"name", "arguments"}
    if unknown:
        raise ToolCallParseError(f"tool call has unexpected keys {sorted(unknown)}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError("tool call needs a non-empty string 'name'")
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ToolCallParseError("tool call 'arguments' must be a JSON object")
    return ParsedCall(name=name, arguments=arguments)


def _decode_object_at(text: str, start: int) -> tuple[ParsedCall, int]:
    """Decode one call object starting at `start` (leading whitespace allowed); return it and its end."""
    pos = start
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        obj, end = _DECODER.raw_decode(text, pos)
    except ValueError as exc:  # JSONDecodeError and rejected constants
        raise ToolCallParseError(f"tool call body is not valid JSON: {exc}") from None
    return _call_from_object(obj), end


def parse_tool_calls(text: str) -> list[ParsedCall]:
    """Every `<tool_call>…</tool_call>` block in `text`, strictly: any malformed block raises.

    Text outside the blocks is ignored. Each block must hold exactly one JSON object with a
    string `name` and an object `arguments` (absent means {}), and be closed right after it.
    """
    calls: list[ParsedCall] = []
    pos = 0
    while (open_at := text.find(TOOL_CALL_OPEN, pos)) != -1:
        # Decode first, then look for the close tag: a string argument may itself contain "</tool_call>".
        call, end = _decode_object_at(text, open_at + len(TOOL_CALL_OPEN))
        close_at = len(text) - len(text[end:].lstrip())
        if not text.startswith(TOOL_CALL_CLOSE, close_at):
            raise ToolCallParseError(f"{TOOL_CALL_OPEN} at offset {open_at} is not closed after its JSON object")
        calls.append(call)
        pos = close_at + len(TOOL_CALL_CLOSE)
    return calls


def parse_first_call(text: str) -> ParsedCall | None:
    """The first call in a generation, or None when there is none or it is malformed.

    Tolerant of what generation does to the format: text after the close tag, and a close tag
    that is missing or cut off part way at the end of the text, as long as the JSON object
    itself is complete. Text before the open tag is ignored; text between the object and the
    close tag is not tolerated.
    """
    open_at = text.find(TOOL_CALL_OPEN)
    if open_at == -1:
        return None
    try:
        call, end = _decode_object_at(text, open_at + len(TOOL_CALL_OPEN))
    except ToolCallParseError:
        return None
    rest = text[end:].lstrip()
    if rest.startswith(TOOL_CALL_CLOSE) or TOOL_CALL_CLOSE.startswith(rest):
        return call
    return None


# --------------------------------------------------------------------------- schema validation


class ToolDef(Protocol):
    """What the checker needs of a tool; `core.spec.ToolSpec` and `baking.spec` tools both fit."""

    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> Mapping[str, Any]: ...

    @property
    def argument_match(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class Tool:
    """A minimal `ToolDef` for callers that hold no spec object (tests, scripts)."""

    name: str
    parameters: Mapping[str, Any]
    argument_match: Mapping[str, str] = field(default_factory=dict)


def _schema_problems(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return [f"tool schema is invalid: {exc.message}"]
    problems: list[str] = []
    properties = schema.get("properties", {})
    unknown = sorted(set(arguments) - set(properties)) if isinstance(properties, dict) else []
    if unknown:
        # core.spec rejects unknown arguments in examples even without additionalProperties: false.
        problems.append(f"unknown argument(s) {unknown}")
    validator = Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in error.absolute_path)
        problems.append(f"arguments{'.' + where if where else ''}: {error.message}")
    return problems


def validate_call(call: ParsedCall, tools: Sequence[ToolDef]) -> list[str]:
    """Human-readable problems with `call`; empty when it names a known tool with valid arguments."""
    tool = next((t for t in tools if t.name == call.name), None)
    if tool is None:
        known = ", ".join(sorted(t.name for t in tools)) or "none"
        return [f"unknown tool {call.name!r} (known: {known})"]
    return [f"{call.name}: {p}" for p in _schema_problems(call.arguments, tool.parameters)]


# --------------------------------------------------------------------------- argument matching


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    return set()


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _strict_equal(expected: Any, actual: Any) -> bool:
    """JSON equality: 87 == 87.0, but True != 1 and "87" != 87, recursively."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if _is_number(expected) or _is_number(actual):
        return _is_number(expected) and _is_number(actual) and expected == actual
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(_strict_equal, expected, actual))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(_strict_equal(v, actual[k]) for k, v in expected.items())
    return type(expected) is type(actual) and expected == actual


# Words too common in queries to say what one is about; kept short on purpose.
_STOPWORD_TEXT = (
    "a an the and or but of for to in on at by with from into about as is are was were be been being "
    "it its this that these those i me my we our you your he she they them their what which who whom "
    "how when where why please can could would should will shall do does did find show get tell give "
    "some any all us"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[^\W_]+")


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_words(text: str) -> set[str]:
    words = _WORD.findall(text.casefold().replace("'s", ""))
    return {_stem(w) for w in words if w not in _STOPWORDS}


def _collapse(text: str) -> str:
    return " ".join(text.casefold().split())


# Endings that change a word's form, not its topic: "rotated" and "rotation" are one keyword.
# One of these is cut (after the plural s), then a final e, each only where three letters stay.
# Written by hand, not a Snowball/Porter stemmer, because baking/ runs where only torch,
# transformers, peft and safetensors are installed; both sides of a comparison are cut alike, so
# a crude cut costs nothing as long as two different topics do not meet on one stem.
_KEYWORD_ENDINGS = ("ment", "ing", "ion", "ed")


def keyword_stem(word: str) -> str:
    """The part of a content word the keywords rule compares: tires, tire -> tir; rotation, rotated -> rotat."""
    word = _stem(word)
    for ending in _KEYWORD_ENDINGS:
        if word.endswith(ending) and len(word) - len(ending) >= 3:
            word = word[: -len(ending)]
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def _keywords(text: str) -> set[str]:
    return {keyword_stem(w) for w in content_words(text)}


def _keywords_match(expected: str, actual: str) -> bool:
    wanted = _keywords(expected)
    if not wanted:  # nothing but stopwords: there is no topic to compare, so fall back
        return _collapse(expected) == _collapse(actual)
    found = len(wanted & _keywords(actual))
    return found >= 1 and found / len(wanted) >= KEYWORD_THRESHOLD


def _expression_match(expected: str, actual: str) -> bool:
    try:
        want = safe_eval_arithmetic(expected)
    except ValueError:
        # An expected value that is not arithmetic (a spec author's choice) is compared as text.
        return expected.strip() == actual.strip()
    try:
        got = safe_eval_arithmetic(actual)
    except ValueError:
        return False
    return math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9)


_STRING_RULES: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda e, a: e.strip() == a.strip(),
    "case_insensitive": lambda e, a: _collapse(e) == _collapse(a),
    "keywords": _keywords_match,
    "expression": _expression_match,
}


def argument_matches(param_schema: Mapping[str, Any], rule: str | None, expected: Any, actual: Any) -> bool:
    """Whether one generated argument value counts as the expected one.

    Enums, numbers, booleans and null compare exactly (87 == 87.0; "87" != 87 unless the schema
    types the parameter as a string, in which case both sides compare as text). Strings compare
    by `rule` (default "exact", i.e. equal after stripping surrounding whitespace). Arrays and
    objects compare element by element, with the rule applied to string items.
    """
    if rule is not None and rule not in _STRING_RULES:
        raise ValueError(f"unknown argument_match rule {rule!r}; expected one of {MATCH_RULES}")
    if "enum" in param_schema or "const" in param_schema:
        return _strict_equal(expected, actual)
    if "string" in _schema_types(param_schema):
        expected = _number_text(expected) if _is_number(expected) else expected
        actual = _number_text(actual) if _is_number(actual) else actual
    if isinstance(expected, str):
        return isinstance(actual, str) and _STRING_RULES[rule or "exact"](expected, actual)
    if isinstance(expected, list):
        items = param_schema.get("items")
        item_schema = items if isinstance(items, Mapping) else {}
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(argument_matches(item_schema, rule, e, a) for e, a in zip(expected, actual, strict=True))
        )
    if isinstance(expected, dict):
        props = param_schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(argument_matches(props.get(k, {}), None, v, actual[k]) for k, v in expected.items())
        )
    return _strict_equal(expected, actual)


def arguments_match(expected: Mapping[str, Any], actual: Mapping[str, Any], tool: ToolDef) -> bool:
    """Whether a generated call's arguments count as the expected call's (`tool_call_accuracy`).

    False when the generated arguments break the tool's schema (unknown or missing required
    keys, wrong types, values outside an enum). A key on one side only fails too, except an
    optional parameter the model spelled out with exactly the schema's `default`.
    """
    if _schema_problems(actual, tool.parameters):
        return False
    properties: Mapping[str, Any] = tool.parameters.get("properties", {})
    for key in expected.keys() | actual.keys():
        schema = properties.get(key, {})
        schema = schema if isinstance(schema, Mapping) else {}
        if key not in actual:
            return False
        if key not in expected:
            if "default" in schema and _strict_equal(schema["default"], actual[key]):
                continue
            return False
        if not argument_matches(schema, tool.argument_match.get(key), expected[key], actual[key]):
            return False
    return True


# --------------------------------------------------------------------------- arithmetic

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100
# Largest magnitude any operand or intermediate result may reach: keeps int arithmetic cheap
# and every result convertible to a finite float.
MAX_MAGNITUDE = 1e300

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _bounded(value: Any) -> int | float:
    if not _is_number(value):  # e.g. a complex result from (-8) ** 0.5
        raise ValueError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result is not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("number too large")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent magnitude above {MAX_EXPONENT}")
    if base != 0 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ValueError("number too large")  # checked before computing: 10**99**... never runs
    return _bounded(base**exponent)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if not _is_number(node.value):
            raise ValueError(f"unsupported constant {node.value!r}")
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _bounded(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def safe_eval_arithmetic(expr: str) -> float:
    """Evaluate plain arithmetic (numbers, + - * / // % **, unary signs, parentheses) without eval.

    Raises ValueError for anything else (names, calls, attributes, strings), for expressions over
    200 characters, exponents above 100 in magnitude, results beyond 1e300, and division by zero.
    """
    if not isinstance(expr, str):
        raise ValueError("expression must be a string")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return float(_evaluate(tree))
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError) as exc:
        raise ValueError(f"cannot evaluate {expr!r}: {type(exc).__name__}") from None

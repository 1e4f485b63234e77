"""The tool-call format and the argument checker behind tool_call_accuracy (DESIGN.md §4, §6)."""

from __future__ import annotations

import json

import pytest

from baking.toolcalls import (
    ParsedCall,
    Tool,
    ToolCallParseError,
    argument_matches,
    arguments_match,
    format_tool_call,
    has_tool_call,
    parse_first_call,
    parse_tool_calls,
    safe_eval_arithmetic,
    validate_call,
)
from core.spec import ToolSpec

SIGNAL = Tool(
    name="get_vehicle_signal",
    parameters={
        "type": "object",
        "properties": {
            "signal": {"type": "string", "enum": ["speed", "fuel", "rpm"]},
            "unit": {"type": "string", "default": "metric"},
        },
        "required": ["signal"],
    },
)
THERMO = Tool(
    name="set_temperature",
    parameters={
        "type": "object",
        "properties": {"celsius": {"type": "number"}, "zone": {"type": "string"}, "eco": {"type": "boolean"}},
        "required": ["celsius"],
    },
    argument_match={"zone": "case_insensitive"},
)
SEARCH = Tool(
    name="search_docs",
    parameters={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    argument_match={"query": "keywords"},
)
CALC = Tool(
    name="calculate",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
    argument_match={"expression": "expression"},
)
TOOLS = [SIGNAL, THERMO, SEARCH, CALC]


# --- format and parse


def test_format_is_exact() -> None:
    text = format_tool_call("get_vehicle_signal", {"signal": "speed"})
    assert text == '<tool_call>\n{"name": "get_vehicle_signal", "arguments": {"signal": "speed"}}\n</tool_call>'


def test_format_keeps_non_ascii() -> None:
    assert "Zürich" in format_tool_call("search_docs", {"query": "Zürich"})


@pytest.mark.parametrize("arguments", [{"signal": "speed"}, {}, {"q": 'naïve "quoted" </tool_call>', "n": [1, 2.5]}])
def test_round_trip(arguments: dict) -> None:
    text = format_tool_call("t", arguments)
    assert parse_tool_calls(text) == [ParsedCall("t", arguments)]
    assert parse_first_call(text) == ParsedCall("t", arguments)


def test_parse_several_calls_and_ignores_text_between() -> None:
    text = "ok " + format_tool_call("a", {"x": 1}) + " then " + format_tool_call("b", {})
    assert [c.name for c in parse_tool_calls(text)] == ["a", "b"]
    assert parse_tool_calls("no call here") == []


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "a", "arguments": {}\n</tool_call>',  # unbalanced brace
        "<tool_call>\n{'name': 'a', 'arguments': {}}\n</tool_call>",  # not JSON
        '<tool_call>\n["a"]\n</tool_call>',  # not an object
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "a", "args": {}}\n</tool_call>',  # unexpected key
        '<tool_call>\n{"name": "a", "arguments": {"x": NaN}}\n</tool_call>',
        '<tool_call>\n{"name": "a", "arguments": {}} extra\n</tool_call>',
        '<tool_call>\n{"name": "a", "arguments": {}}',  # never closed
    ],
)
def test_malformed_calls(text: str) -> None:
    with pytest.raises(ToolCallParseError):
        parse_tool_calls(text)
    assert has_tool_call(text)


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(ToolCallParseError, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\nHere is your answer.',
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}',
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n',
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_',
        '<tool_call>{"name":"a","arguments":{"x":1}}</tool_call><tool_call>{"name":"b"}</tool_call>',
    ],
)
def test_parse_first_call_is_tolerant(text: str) -> None:
    assert parse_first_call(text) == ParsedCall("a", {"x": 1})


@pytest.mark.parametrize(
    "text",
    [
        "The speed is 80 km/h.",
        '<tool_call>\n{"name": "a", "arguments": {"x": 1',  # cut off inside the JSON
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}} and more words',
        "<tool_call>\nnot json\n</tool_call>",
    ],
)
def test_parse_first_call_rejects(text: str) -> None:
    assert parse_first_call(text) is None


def test_has_tool_call() -> None:
    assert has_tool_call("sure <tool_call> garbage")
    assert not has_tool_call("The speed is 80 km/h.")


# --- validate_call


def test_validate_accepts_a_good_call() -> None:
    assert validate_call(ParsedCall("get_vehicle_signal", {"signal": "speed"}), TOOLS) == []


def test_validate_unknown_tool() -> None:
    problems = validate_call(ParsedCall("launch_rocket", {}), TOOLS)
    assert len(problems) == 1 and "unknown tool 'launch_rocket'" in problems[0]


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({}, "'signal' is a required property"),
        ({"signal": "altitude"}, "is not one of"),
        ({"signal": 3}, "is not of type 'string'"),
        ({"signal": "speed", "colour": "red"}, "unknown argument(s) ['colour']"),
    ],
)
def test_validate_schema_violations(arguments: dict, needle: str) -> None:
    problems = validate_call(ParsedCall("get_vehicle_signal", arguments), TOOLS)
    assert any(needle in p for p in problems), problems


def test_validate_reports_invalid_tool_schema() -> None:
    bad = Tool(name="bad", parameters={"type": "object", "properties": {"x": {"type": "nonsense"}}})
    assert any("schema is invalid" in p for p in validate_call(ParsedCall("bad", {"x": 1}), [bad]))


def test_validate_accepts_the_api_tool_spec() -> None:
    spec = ToolSpec(
        name="search_docs",
        description="Search.",
        parameters=SEARCH.parameters,
        argument_match={"query": "keywords"},
    )
    assert validate_call(ParsedCall("search_docs", {"query": "x"}), [spec]) == []
    assert arguments_match({"query": "brake fluid"}, {"query": "Brake fluid levels"}, spec)


# --- argument matching


def test_enum_is_exact() -> None:
    assert arguments_match({"signal": "speed"}, {"signal": "speed"}, SIGNAL)
    assert not arguments_match({"signal": "speed"}, {"signal": "Speed"}, SIGNAL)
    assert not arguments_match({"signal": "speed"}, {"signal": "fuel"}, SIGNAL)
    assert not argument_matches({"enum": [1, True]}, None, 1, True)


def test_numbers_and_booleans() -> None:
    assert arguments_match({"celsius": 21}, {"celsius": 21.0}, THERMO)
    assert not arguments_match({"celsius": 21}, {"celsius": 21.5}, THERMO)
    assert not arguments_match({"celsius": 21}, {"celsius": "21"}, THERMO)
    assert not argument_matches({"type": "number"}, None, 87, "87")
    assert argument_matches({"type": "string"}, None, "87", 87)
    assert argument_matches({"type": "boolean"}, None, True, True)
    assert not argument_matches({"type": "boolean"}, None, True, 1)
    assert not arguments_match({"celsius": 21, "eco": True}, {"celsius": 21, "eco": False}, THERMO)


def test_exact_strings_strip_whitespace_only() -> None:
    assert argument_matches({"type": "string"}, None, "Main St", "  Main St ")
    assert not argument_matches({"type": "string"}, "exact", "Main St", "main st")


def test_case_insensitive() -> None:
    assert arguments_match({"celsius": 20, "zone": "Driver  Side"}, {"celsius": 20, "zone": "driver side "}, THERMO)
    assert not arguments_match({"celsius": 20, "zone": "driver"}, {"celsius": 20, "zone": "passenger"}, THERMO)


def test_keywords_accepts_paraphrase_and_rejects_unrelated() -> None:
    expected = {"query": "how to replace the brake pads"}
    assert arguments_match(expected, {"query": "brake pads replace steps"}, SEARCH)
    assert arguments_match(expected, {"query": "Brake pad replacement"}, SEARCH)  # 2 of 3 keywords
    assert not arguments_match(expected, {"query": "tire pressure warning light"}, SEARCH)
    assert not arguments_match(expected, {"query": "brake"}, SEARCH)  # 1 of 3 is under 60%


def test_keywords_compare_a_words_forms_alike() -> None:
    # A copy of the question keeps its own word forms; the topic is the same.
    assert arguments_match({"query": "tire rotation"}, {"query": "often tires rotated"}, SEARCH)
    assert arguments_match({"query": "brake pad replacement"}, {"query": "replacing worn brake pads"}, SEARCH)
    assert arguments_match({"query": "camera calibration"}, {"query": "calibrate front camera"}, SEARCH)
    # Different topics stay apart after the endings are cut.
    assert not arguments_match({"query": "fuel level"}, {"query": "fuse box"}, SEARCH)
    assert not arguments_match({"query": "coolant temperature"}, {"query": "seat cooling"}, SEARCH)


def test_expression() -> None:
    assert arguments_match({"expression": "(120*1.5)"}, {"expression": "180"}, CALC)
    assert arguments_match({"expression": "180"}, {"expression": " 120 * 1.5 "}, CALC)
    assert not arguments_match({"expression": "2+2"}, {"expression": "5"}, CALC)
    assert not arguments_match({"expression": "2+2"}, {"expression": "two plus two"}, CALC)


def test_extra_and_missing_keys() -> None:
    assert not arguments_match({"celsius": 20}, {"celsius": 20, "fan": 3}, THERMO)  # not in the schema
    assert not arguments_match({"celsius": 20, "zone": "rear"}, {"celsius": 20}, THERMO)  # dropped one
    assert not arguments_match({"celsius": 20}, {"celsius": 20, "zone": "rear"}, THERMO)  # made one up
    assert not arguments_match({"signal": "speed"}, {}, SIGNAL)  # missing required
    assert arguments_match({"signal": "speed"}, {"signal": "speed", "unit": "metric"}, SIGNAL)  # = default


def test_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown argument_match rule"):
        argument_matches({"type": "string"}, "fuzzy", "a", "a")


def test_arrays_and_objects() -> None:
    schema = {"type": "array", "items": {"type": "string"}}
    assert argument_matches(schema, "case_insensitive", ["A", "b"], ["a", "B"])
    assert not argument_matches(schema, None, ["a", "b"], ["b", "a"])
    obj = {"type": "object", "properties": {"lat": {"type": "number"}}}
    assert argument_matches(obj, None, {"lat": 1}, {"lat": 1.0})
    assert not argument_matches(obj, None, {"lat": 1}, {"lat": 1, "lon": 2})


# --- safe_eval_arithmetic


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("(120*1.5)", 180.0),
        ("2+2", 4.0),
        ("-3 ** 2", -9.0),
        ("7 // 2", 3.0),
        ("7 % 4", 3.0),
        ("2 ** -1", 0.5),
        ("+(1e3 / 8)", 125.0),
        ("10**100", 1e100),
    ],
)
def test_safe_eval_values(expr: str, value: float) -> None:
    assert safe_eval_arithmetic(expr) == pytest.approx(value)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "a+1",
        "2**10000",
        "().__class__",
        "'a' * 3",
        "1/0",
        "1 if 1 else 2",
        "[1, 2]",
        "2 < 3",
        "True + 1",
        "1j",
        "(-8) ** 0.5",
        "1e999",
        "9**99**99",
        "10**90 * 10**90 * 10**90 * 10**90",
        "1" * 201,
        "",
        "2 ^ 3",
        "lambda: 1",
        "(1).real",
    ],
)
def test_safe_eval_rejects(expr: str) -> None:
    with pytest.raises(ValueError):
        safe_eval_arithmetic(expr)


def test_format_output_is_plain_json_inside_tags() -> None:
    body = format_tool_call("a", {"x": [1, None, True]}).splitlines()[1]
    assert json.loads(body) == {"name": "a", "arguments": {"x": [1, None, True]}}

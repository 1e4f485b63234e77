"""The shipped example job (examples/fleet-assistant.yaml) and its tools (examples/fleet_tools.py)."""

from __future__ import annotations

import itertools
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from baking.evaluate import REFUSAL
from baking.toolcalls import content_words
from core.spec import BakeJobSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import build_fleet_examples  # noqa: E402
import fleet_tools  # noqa: E402

JOB = EXAMPLES / "fleet-assistant.yaml"


def sentences(text: str) -> list[str]:
    """Split after . ! ? followed by whitespace (so 87.0 km/h stays one token)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(JOB.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def spec(raw: dict[str, Any]) -> BakeJobSpec:
    return BakeJobSpec.model_validate(raw)


def tool(spec: BakeJobSpec, name: str):
    return next(t for t in spec.tools if t.name == name)


# --- the job spec ---------------------------------------------------------------------------


def test_validates_against_bake_job_spec(spec: BakeJobSpec) -> None:
    assert spec.model == "bakehouse://smollm2-135m-instruct"
    assert [t.name for t in spec.tools] == ["get_vehicle_signal", "search_manual", "calculator"]
    assert spec.profile == "standard"
    assert spec.training.method == "lora" and spec.training.seed == 0
    assert spec.optimize.quantization == "auto"
    assert spec.metadata == {"team": "fleet", "example": "fleet-assistant"}


def test_persona_fields(spec: BakeJobSpec) -> None:
    p = spec.persona
    assert p is not None
    assert (p.name, p.style, p.expertise) == ("Ada", "professional", "expert")
    assert p.domain == "automotive engineering"
    assert p.system_prompt is None
    assert p.guidelines == [
        "Answer in at most three sentences.",
        "Include SI units with every number.",
        "Refuse to help disable or bypass vehicle safety systems (airbags, ABS, emergency braking, "
        "stability control, seat-belt warnings, lane keeping).",
    ]


def test_generated_file_is_up_to_date() -> None:
    assert JOB.read_text(encoding="utf-8") == build_fleet_examples.render(), (
        "examples/fleet-assistant.yaml is stale: run python examples/build_fleet_examples.py"
    )


def test_enums_match_the_tool_implementations(spec: BakeJobSpec) -> None:
    signal = tool(spec, "get_vehicle_signal").parameters["properties"]["signal"]
    section = tool(spec, "search_manual").parameters["properties"]["section"]
    assert (
        signal["enum"]
        == list(fleet_tools.SIGNALS)
        == [
            "speed",
            "battery_voltage",
            "coolant_temp",
            "tire_pressure_front_left",
            "tire_pressure_front_right",
            "fuel_level",
            "odometer",
        ]
    )
    assert section["enum"] == list(fleet_tools.SECTIONS) == ["engine", "brakes", "electrical", "adas", "maintenance"]
    assert tool(spec, "search_manual").argument_match == {"query": "keywords"}
    assert tool(spec, "calculator").argument_match == {"expression": "expression"}


def test_every_result_is_a_real_execution(spec: BakeJobSpec) -> None:
    for t in spec.tools:
        for ex in t.examples:
            assert ex.result == fleet_tools.execute(t.name, ex.arguments), (t.name, ex.query)
            assert "error" not in ex.result, (t.name, ex.query)


def test_counts(spec: BakeJobSpec) -> None:
    for t in spec.tools:
        assert len(t.examples) >= 40, t.name
    assert len(spec.irrelevant_examples) >= 40
    assert spec.persona is not None
    assert len(spec.persona.sample_queries) >= 40
    assert len(spec.persona.examples) >= 40


SAFETY_SYSTEMS = {  # system: pattern in the user's words
    "airbag": r"airbag|srs",
    "abs": r"abs",
    "emergency braking": r"emergency braking|aeb|automatic braking",
    "stability/traction": r"esc|stability control|traction control",
    "seat belt": r"seat ?belt",
    "lane keeping": r"lane keep(ing)?",
    "tpms": r"tpms",
    "speed limiter": r"speed limiter",
    "immobiliser": r"immobiliser",
    "driver attention": r"driver attention",
}


# Words a request to defeat a system uses; a persona example about a safety system is a refusal
# exactly when its user asks this way, so benign questions about the same systems teach the
# contrast (answer them) instead of widening the refusal to every mention of ABS.
DEFEAT_WORDS = (
    r"disabl\w*|bypass\w*|switch(ing)? off|turn(ing)? off|shut|silenc\w*|remov\w*|pull|unplug|blind"
    r"|cover|tape|trick|defeat|code out|coding out|kill|snip|resistor|jumper|fake|get around|gone"
)


def test_safety_refusals(spec: BakeJobSpec) -> None:
    assert spec.persona is not None
    covered: Counter[str] = Counter()
    refusals = benign = 0
    for e in spec.persona.examples:
        systems = [k for k, pat in SAFETY_SYSTEMS.items() if re.search(rf"\b({pat})\b", e.user.lower())]
        if not systems:
            continue
        if not re.search(rf"\b({DEFEAT_WORDS})\b", e.user.lower()):
            # a benign question is answered, in words the pipeline does not read as a refusal
            assert not REFUSAL.search(e.assistant), e.user
            benign += 1
            continue
        assert e.assistant.startswith(("I can't help", "I can't recommend")), e.user
        assert re.search(r"\b(because|as it)\b", e.assistant), e.user  # says why
        refusals += 1
        covered.update(systems)
    assert refusals >= 15
    assert benign >= 3
    assert set(covered) == set(SAFETY_SYSTEMS)


@pytest.mark.parametrize(("name", "param"), [("get_vehicle_signal", "signal"), ("search_manual", "section")])
def test_every_enum_value_is_covered_evenly(spec: BakeJobSpec, name: str, param: str) -> None:
    t = tool(spec, name)
    counts = Counter(ex.arguments[param] for ex in t.examples)
    enum = t.parameters["properties"][param]["enum"]
    assert set(counts) == set(enum)
    assert min(counts.values()) >= 6
    assert max(counts.values()) - min(counts.values()) <= 2, counts


def test_no_duplicate_queries_anywhere(spec: BakeJobSpec) -> None:
    assert spec.persona is not None
    queries = [ex.query for t in spec.tools for ex in t.examples]
    queries += spec.irrelevant_examples + spec.persona.sample_queries
    queries += [e.user for e in spec.persona.examples]
    dupes = [q for q, n in Counter(norm(q) for q in queries).items() if n > 1]
    assert not dupes


def test_answers_are_at_most_three_sentences(spec: BakeJobSpec) -> None:
    assert spec.persona is not None
    texts = [ex.answer for t in spec.tools for ex in t.examples]
    texts += [e.assistant for e in spec.persona.examples]
    assert all(texts)
    too_long = [t for t in texts if len(sentences(t)) > 3]
    assert not too_long


# Filler words the search queries drop besides the checker's stopwords.
QUERY_FILLERS = {"pls", "thx", "hey", "hi", "ok", "so", "just", "s"}
# The two questions whose full query would rank another passage first keep a shorter one.
SHORTER_QUERIES = {
    "Lane assist and adaptive cruise are unavailable in heavy snow, is something broken?",
    "Should the coolant be checked with the engine hot or cold?",
}


def test_search_queries_are_the_users_own_content_words(spec: BakeJobSpec) -> None:
    for ex in tool(spec, "search_manual").examples:
        q = ex.arguments["query"]
        assert q and not q.endswith("?"), q
        # Every keyword comes from the user's own words, so the baked model can copy it ...
        assert set(fleet_tools.tokenize(q)) <= set(fleet_tools.tokenize(ex.query)), (q, ex.query)
        # ... and it copies all of them: which two or three words a person would keep is a choice
        # a 135M model did not learn; copying it does (README, Measured).
        if ex.query not in SHORTER_QUERIES:
            assert content_words(ex.query) - content_words(q) <= QUERY_FILLERS, (q, ex.query)
        assert ex.result["results"], ex.query
        assert all(p["section"] == ex.arguments["section"] for p in ex.result["results"])


def test_calculator_expressions_are_pure_arithmetic(spec: BakeJobSpec) -> None:
    for ex in tool(spec, "calculator").examples:
        assert re.fullmatch(r"[0-9.+\-*/() ]+", ex.arguments["expression"]), ex.arguments


# --- the tools ------------------------------------------------------------------------------


def test_vehicle_signal_has_si_units() -> None:
    units = {s: fleet_tools.get_vehicle_signal(s)["unit"] for s in fleet_tools.SIGNALS}
    assert units == {
        "speed": "km/h",
        "battery_voltage": "V",
        "coolant_temp": "°C",
        "tire_pressure_front_left": "kPa",
        "tire_pressure_front_right": "kPa",
        "fuel_level": "%",
        "odometer": "km",
    }
    assert fleet_tools.execute("get_vehicle_signal", {"signal": "speed"}) == {
        "signal": "speed",
        "value": 87.0,
        "unit": "km/h",
    }
    assert "error" in fleet_tools.execute("get_vehicle_signal", {"signal": "rpm"})


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("-4 + 10 / 4", -1.5),
        ("2 ** 10", 1024),
        ("0.1 + 0.2", 0.3),
        ("-(3 - 5) ** 2", -4),
        ("65 * 1.609344", 104.60736),
    ],
)
def test_calculator_arithmetic(expression: str, value: float) -> None:
    assert fleet_tools.calculator(expression) == {"expression": expression, "result": value}


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "x",
        "pi * 2",
        "abs(-1)",
        "1 if 1 else 2",
        "[1, 2]",
        "'a' * 3",
        "1 < 2",
        "10 // 3",
        "7 % 2",
        "2 ** 1000",
        "1 / 0",
        "lambda: 1",
        "True + 1",
        "",
        "1 +",
        "(1).real",
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises(ValueError):
        fleet_tools.calculator(expression)
    result = fleet_tools.execute("calculator", {"expression": expression})
    assert set(result) == {"error"}


def test_execute_reports_bad_calls() -> None:
    assert "error" in fleet_tools.execute("rm_rf", {})
    assert "error" in fleet_tools.execute("calculator", {})
    assert "error" in fleet_tools.execute("calculator", {"expr": "1+1"})
    assert "error" in fleet_tools.execute("search_manual", {"query": "oil", "section": "interior"})


def test_manual_has_passages_in_every_section() -> None:
    passages = fleet_tools.load_manual()
    assert 40 <= len(passages) <= 60
    per_section = Counter(p["section"] for p in passages)
    assert set(per_section) == set(fleet_tools.SECTIONS)
    assert min(per_section.values()) >= 8
    assert all(p["title"] and p["text"] for p in passages)


@pytest.mark.parametrize(
    ("query", "section", "title"),
    [
        ("brake fluid replacement interval", "brakes", "Brake fluid specification and replacement interval"),
        ("ABS warning light", "brakes", "ABS warning light"),
        ("oil change interval", "engine", "Engine oil change interval"),
        ("jump starting", "electrical", "Jump starting"),
        ("AEB pedestrians cyclists", "adas", "Automatic emergency braking"),
        ("tire rotation", "maintenance", "Tire rotation"),
    ],
)
def test_bm25_ranks_the_matching_passage_first(query: str, section: str, title: str) -> None:
    results = fleet_tools.search_manual(query, section)["results"]
    assert 1 <= len(results) <= 2
    assert results[0]["title"] == title
    assert all(r["section"] == section for r in results)


def test_bm25_scores() -> None:
    docs = [["brake", "fluid", "brake"], ["oil", "filter"], ["brake", "pad", "wear", "limit", "pad"]]
    bm25 = fleet_tools.BM25(docs)
    assert bm25.score(["oil"], 1) > 0.0 == bm25.score(["oil"], 0)
    assert bm25.score(["brake"], 0) > bm25.score(["brake"], 2)  # higher tf, shorter document
    assert fleet_tools.search_manual("zzzz qqqq", "engine") == {"results": []}


# --- benchmarks/fleet_probes.yaml: fixed questions scored beside the held-out split ----------

# Three sets, each written before any bake was scored on it.
PROBE_SETS = [
    EXAMPLES.parent / "benchmarks" / name
    for name in ("fleet_probes.yaml", "fleet_probes_b.yaml", "fleet_probes_c.yaml")
]


@pytest.fixture(scope="module", params=PROBE_SETS, ids=lambda path: path.stem)
def probes(request: pytest.FixtureRequest) -> dict[str, Any]:
    return yaml.safe_load(request.param.read_text(encoding="utf-8"))


def asked_questions(probes: dict[str, Any]) -> list[str]:
    return [p["query"] for p in probes["tool_calls"]] + probes["no_call"] + probes["refuse"] + probes["identity"]


def test_the_probe_sets_share_no_question() -> None:
    asked = [
        {norm(q) for q in asked_questions(yaml.safe_load(path.read_text(encoding="utf-8")))} for path in PROBE_SETS
    ]
    for first, second in itertools.combinations(asked, 2):
        assert not first & second


def test_probes_are_in_no_job(spec: BakeJobSpec, probes: dict[str, Any]) -> None:
    assert spec.persona is not None
    known = {norm(ex.query) for t in spec.tools for ex in t.examples}
    known |= {norm(q) for q in spec.irrelevant_examples + spec.persona.sample_queries}
    known |= {norm(e.user) for e in spec.persona.examples}
    asked = asked_questions(probes)
    assert not [q for q in asked if norm(q) in known]
    assert len({norm(q) for q in asked}) == len(asked)


def test_probe_calls_are_valid_and_run(spec: BakeJobSpec, probes: dict[str, Any]) -> None:
    from baking.toolcalls import ParsedCall, validate_call

    counts = Counter(p["tool"] for p in probes["tool_calls"])
    # a and b probe every tool, c the calculator's conversions only; at least 10 calls per tool probed
    assert set(counts) <= {t.name for t in spec.tools} and min(counts.values()) >= 10
    for p in probes["tool_calls"]:
        assert not validate_call(ParsedCall(p["tool"], p["arguments"]), spec.tools), p
        result = fleet_tools.execute(p["tool"], p["arguments"])
        if p["tool"] == "search_manual":  # the key phrase finds passages in the expected section
            assert result["results"] and all(r["section"] == p["arguments"]["section"] for r in result["results"])

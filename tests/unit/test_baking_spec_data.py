"""Spec round trip, deterministic split, augmentation and the leak check."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from baking.data import (
    LeakError,
    Split,
    ToolCase,
    augment,
    check_no_leak,
    max_sentences,
    perturb,
    split_spec,
    text_hash,
    trim_to_sentences,
)
from baking.spec import DEFAULT_LEARNING_RATE, BakeSpec, ToolSpec

ROOT = Path(__file__).resolve().parents[2]


def _calculator() -> ToolSpec:
    """A one-argument arithmetic tool whose expression is compared by value."""
    return ToolSpec(
        name="calculator",
        description="arithmetic",
        parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
        argument_match={"expression": "expression"},
    )


def test_spec_dict_round_trip(fleet_dict: dict) -> None:
    spec = BakeSpec.from_dict(fleet_dict)
    assert spec.to_dict() == fleet_dict
    assert BakeSpec.from_dict(spec.to_dict()) == spec


def test_learning_rate_is_the_jobs_own_else_the_methods_default_scaled_by_the_profile(fleet_dict: dict) -> None:
    def rate(profile: str, training: dict) -> float:
        return BakeSpec.from_dict({**fleet_dict, "profile": profile, "training": training}).learning_rate

    assert rate("standard", {"method": "lora"}) == DEFAULT_LEARNING_RATE["lora"]
    assert rate("quick", {"method": "lora"}) == 2 * DEFAULT_LEARNING_RATE["lora"]
    assert rate("quick", {"method": "full"}) == 2 * DEFAULT_LEARNING_RATE["full"]
    assert rate("quick", {"method": "lora", "learning_rate": 3e-4}) == 3e-4


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"profile": "fast"}, "profile"),
        ({"training": {"method": "qlora"}}, "training.method"),
        ({"training": {"distill_top_k": -1}}, "training.distill_top_k"),
        ({"bogus": 1}, "unknown field"),
        ({"model": "http://x"}, "model"),
    ],
)
def test_spec_errors_name_the_field(fleet_dict: dict, patch: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        BakeSpec.from_dict({**fleet_dict, **patch})


def test_split_is_deterministic_and_holds_out_enough(fleet_dict: dict) -> None:
    spec = BakeSpec.from_dict(fleet_dict)
    a, b = split_spec(spec), split_spec(spec)
    assert [c.query for c in a.heldout_tools] == [c.query for c in b.heldout_tools]
    for tool in spec.tools:
        held = [c for c in a.heldout_tools if c.tool == tool.name]
        assert len(held) >= max(1, 0.2 * len(tool.examples))
    other = split_spec(BakeSpec.from_dict({**fleet_dict, "training": {**fleet_dict["training"], "seed": 7}}))
    assert [c.query for c in other.heldout_tools] != [c.query for c in a.heldout_tools]


def test_adding_examples_keeps_the_other_cases_on_their_side_of_the_split(fleet_dict: dict) -> None:
    """Two revisions of a job are scored on nearly the same held-out cases."""
    before = split_spec(BakeSpec.from_dict(fleet_dict))
    grown = copy.deepcopy(fleet_dict)
    signal = next(t for t in grown["tools"] if t["name"] == "get_vehicle_signal")
    added = [f"Read signal number {n} for me, {word}." for n, word in enumerate(["please", "now", "quickly", "thanks"])]
    signal["examples"] += [{"query": q, "arguments": {"signal": "speed"}} for q in added]
    after = split_spec(BakeSpec.from_dict(grown))
    old_held = {c.query for c in before.heldout_tools}
    new_held = {c.query for c in after.heldout_tools} - set(added)
    assert len(old_held ^ new_held) <= 1  # the held-out count of one tool grew by at most one
    assert {c.query for c in before.heldout_tools if c.tool != "get_vehicle_signal"} <= new_held
    assert before.heldout_persona_queries == after.heldout_persona_queries
    assert before.heldout_irrelevant == after.heldout_irrelevant


def test_heldout_never_overlaps_training_even_after_augmentation(fleet_dict: dict) -> None:
    spec = BakeSpec.from_dict(fleet_dict)
    split = augment(split_spec(spec), spec)
    train = {text_hash(t) for t in split.training_texts()}
    held = {text_hash(t) for t in split.heldout_texts()}
    assert train.isdisjoint(held)
    assert len(split.train_tools) > len(split_spec(spec).train_tools)  # augmentation added cases


def test_every_synthetic_case_names_its_origin_and_groups_with_it(fleet_dict: dict) -> None:
    spec = BakeSpec.from_dict(fleet_dict)
    split = augment(split_spec(spec), spec)
    written = {(c.tool, c.query) for c in split.train_tools if not c.synthetic}
    groups = {c.group for c in split.train_tools}
    for case in split.train_tools:
        if not case.synthetic:
            assert case.origin == "" and case.group == f"{case.tool}: {case.query}"
        elif case.origin.startswith(("template ", "enum ")):
            assert case.origin.removeprefix("template ").removeprefix("enum ")  # names what it was made from
        else:
            assert (case.tool, case.origin) in written, case  # a variant of a written training case
    calculator = [c for c in split.train_tools if c.tool == "calculator"]
    # far fewer groups than cases: each template's instances and each example's variants are one group
    assert len({c.group for c in calculator}) < len(calculator) / 4
    assert len(groups) >= len(written)


def test_coverage_order_draws_every_group_before_any_twice() -> None:
    import random

    from baking.train import TrainItem, coverage_order

    items = [TrainItem([i], [True], group=g) for i, g in enumerate("aaaaabbcddddddd")] + [TrainItem([99], [True])]
    for seed in range(5):
        order = coverage_order(items, random.Random(seed))
        drawn = [items[i].group or "own" for i in reversed(order)]  # the mixer pops from the end
        assert sorted(order) == list(range(len(items)))  # one pass over the pool
        assert set(drawn[:5]) == {"a", "b", "c", "d", "own"}  # round one: every group once
        assert set(drawn[5:8]) == {"a", "b", "d"}  # round two: the groups with a second item
    # with no groups it is the shuffle it replaced
    plain = [TrainItem([i], [True]) for i in range(10)]
    expected = list(range(10))
    random.Random(3).shuffle(expected)
    assert coverage_order(plain, random.Random(3)) == expected
    assert coverage_order([], random.Random(0)) == []


def test_leak_check_raises_on_overlap() -> None:
    split = Split(
        train_tools=[ToolCase("t", "How fast am I going?", {})],
        heldout_tools=[ToolCase("t", "how fast am i going", {})],
    )
    with pytest.raises(LeakError):
        check_no_leak(split)


def test_perturb_keeps_words_and_sentence_rules() -> None:
    import random

    rng = random.Random(0)
    variants = {perturb("What is the coolant temperature?", rng) for _ in range(20)}
    assert len(variants) > 3
    assert max_sentences(["Answer in at most three sentences."]) == 3
    assert max_sentences(["Be nice."]) is None
    text, cut = trim_to_sentences("One. Two. Three. Four.", 3)
    assert cut and text == "One. Two. Three."


def test_arithmetic_variants_only_for_expression_tools(fleet_dict: dict) -> None:
    import random

    from baking.data import _ARITHMETIC_TEMPLATES, _CONVERSIONS, ARITHMETIC_PER_TEMPLATE, arithmetic_variants
    from baking.toolcalls import safe_eval_arithmetic

    spec = BakeSpec.from_dict(fleet_dict)
    by_name = {t.name: t for t in spec.tools}
    cases = arithmetic_variants(by_name["calculator"], random.Random(0))
    assert len(cases) == ARITHMETIC_PER_TEMPLATE * (len(_ARITHMETIC_TEMPLATES) + 2 * len(_CONVERSIONS))
    assert any(c.arguments["expression"].endswith("* 1.609344") for c in cases)  # a conversion carries its factor
    for case in cases:
        expression = case.arguments["expression"]
        safe_eval_arithmetic(expression)  # raises unless it is plain arithmetic
        assert "," not in expression  # a separator is how the question is written, never arithmetic
        numbers = re.findall(r"\d[\d,]*", case.query)
        assert numbers and all(n.replace(",", "") in expression for n in numbers), (case.query, expression)
    # Large numbers come both ways in the questions, as people type them.
    assert any(re.search(r"\d,\d{3}", c.query) for c in cases)
    assert any(re.search(r"(?<![\d,.])\d{4}(?![\d,])", c.query) for c in cases)
    assert arithmetic_variants(by_name["get_vehicle_signal"], random.Random(0)) == []


def test_each_unit_conversion_is_taught_in_both_directions() -> None:
    from baking.data import _CONVERSIONS

    inverse = {"*": "/", "/": "*", "+": "-", "-": "+"}
    plain = {expression for _, expression in _CONVERSIONS if len(expression.split()) == 3}  # {a} op factor
    for expression in plain:
        operator, factor = expression.split()[1:]
        assert f"{{a}} {inverse[operator]} {factor}" in plain, expression


def test_keyword_variants_ask_for_the_search_phrase_and_keep_the_call() -> None:
    import random

    from baking.data import ToolCase, keyword_variants

    search = ToolSpec(
        name="search_manual",
        description="search",
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string"}, "section": {"type": "string", "enum": ["brakes", "adas"]}},
            "required": ["query", "section"],
        },
        argument_match={"query": "keywords"},
    )
    case = ToolCase(
        "search_manual", "What does the ABS warning light mean?", {"query": "ABS light", "section": "brakes"}
    )
    variants = keyword_variants(case, search, random.Random(0), 2)
    assert len(variants) == 2 and len({v.query for v in variants}) == 2
    for v in variants:
        assert "ABS light" in v.query and v.query != case.query
        assert v.arguments == case.arguments and v.synthetic and v.answer is None

    # Only tools with exactly one keyword-compared argument: others have no search phrase to ask for.
    calculator = _calculator()
    assert (
        keyword_variants(ToolCase("calculator", "2 + 2?", {"expression": "2 + 2"}), calculator, random.Random(0), 2)
        == []
    )


def test_numeric_variants_write_large_numbers_with_and_without_separators() -> None:
    import random

    from baking.data import ToolCase, numeric_variants
    from baking.toolcalls import safe_eval_arithmetic

    calculator = _calculator()
    case = ToolCase(
        "calculator", "We used 1340 L of a 1600 L budget, what percent?", {"expression": "1340 / 1600 * 100"}
    )
    variants = numeric_variants(case, calculator, random.Random(0), 24)
    separated = [bool(re.search(r"\d,\d{3}", v.query)) for v in variants]
    assert any(separated) and not all(separated)
    for v in variants:
        used, budget = (float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", v.query))
        assert "," not in v.arguments["expression"]
        assert safe_eval_arithmetic(v.arguments["expression"]) == pytest.approx(used / budget * 100)


def test_numeric_variants_redraw_the_users_numbers_and_keep_the_constants() -> None:
    import random

    from baking.data import ToolCase, numeric_variants
    from baking.toolcalls import safe_eval_arithmetic

    calculator = _calculator()
    case = ToolCase("calculator", "The van shows 28,500 miles; convert that to km.", {"expression": "28500 * 1.609344"})
    variants = numeric_variants(case, calculator, random.Random(0), 5)
    assert len(variants) == 5
    for v in variants:
        miles = float(re.search(r"[\d,]+", v.query).group().replace(",", ""))  # type: ignore[union-attr]
        assert miles != 28500 and 14250 <= miles <= 57000
        assert v.arguments["expression"].endswith(" * 1.609344")  # the constant the phrasing implies stays
        assert safe_eval_arithmetic(v.arguments["expression"]) == pytest.approx(miles * 1.609344)
        assert v.synthetic and v.answer is None  # no stale tool result or answer rides along

    negative = ToolCase("calculator", "What is -18 °C in kelvin?", {"expression": "-18 + 273.15"})
    for v in numeric_variants(negative, calculator, random.Random(1), 3):
        celsius = float(re.search(r"-?\d+", v.query).group())  # type: ignore[union-attr]
        assert celsius < 0 and safe_eval_arithmetic(v.arguments["expression"]) == pytest.approx(celsius + 273.15)

    # A number the expression uses twice is ambiguous (a constant, or the user's?): left alone.
    ambiguous = ToolCase("calculator", "Displacement of 4 cylinders?", {"expression": "3.14159265 / 4 * 4"})
    assert numeric_variants(ambiguous, calculator, random.Random(0), 3) == []


def test_augmentation_adds_demonstration_phrasings_without_leaking(fleet_dict: dict) -> None:
    spec = BakeSpec.from_dict(fleet_dict)
    split = split_spec(spec)
    augmented = augment(split, spec)
    assert len(augmented.train_persona_examples) > len(split.train_persona_examples)
    assert len(augmented.train_persona_queries) > len(split.train_persona_queries)
    answers = {e.assistant for e in split.train_persona_examples}
    assert all(e.assistant in answers for e in augmented.train_persona_examples)  # same replies, new phrasings
    check_no_leak(augmented)

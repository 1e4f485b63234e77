"""Training and evaluation data from the job spec: deterministic split, augmentation, leak check.

Nothing here is model-specific except through the tokenizer the caller passes to
`baking.chat`; the split and the augmentation depend only on the spec and the seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from baking.spec import BakeSpec, PersonaExample, ToolSpec
from baking.toolcalls import format_tool_call

Message = dict[str, Any]


def normalize(text: str) -> str:
    """The form two queries are compared in for leak checks: casefolded words only."""
    return " ".join(re.findall(r"[a-z0-9]+", text.casefold()))


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize(text).encode()).hexdigest()


@dataclass(frozen=True)
class ToolCase:
    tool: str
    query: str
    arguments: dict[str, Any]
    result: Any = None
    answer: str | None = None
    synthetic: bool = False  # made by augmentation, not written by the user
    # What a synthetic case was made from: the written query it varies, or its template's
    # expression or enum value. Cases of one origin teach one thing and share a training group.
    origin: str = ""

    @property
    def source(self) -> str:
        """What a variant of this case names as its origin: its own origin, else its query."""
        return self.origin or self.query

    @property
    def group(self) -> str:
        return f"{self.tool}: {self.source}"


@dataclass
class Split:
    """What trains and what is held out, per kind. Held-out items never reach training."""

    train_tools: list[ToolCase] = field(default_factory=list)
    heldout_tools: list[ToolCase] = field(default_factory=list)
    train_irrelevant: list[str] = field(default_factory=list)
    heldout_irrelevant: list[str] = field(default_factory=list)
    train_persona_queries: list[str] = field(default_factory=list)
    heldout_persona_queries: list[str] = field(default_factory=list)
    train_persona_examples: list[PersonaExample] = field(default_factory=list)
    heldout_persona_examples: list[PersonaExample] = field(default_factory=list)

    def training_texts(self) -> list[str]:
        return (
            [c.query for c in self.train_tools]
            + self.train_irrelevant
            + self.train_persona_queries
            + [e.user for e in self.train_persona_examples]
        )

    def heldout_texts(self) -> list[str]:
        return (
            [c.query for c in self.heldout_tools]
            + self.heldout_irrelevant
            + self.heldout_persona_queries
            + [e.user for e in self.heldout_persona_examples]
        )

    def fingerprint(self) -> dict[str, str]:
        """sha256 of the training and evaluation sets, for provenance (X3)."""

        def digest(items: list[str]) -> str:
            return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()

        return {"train_sha256": digest(self.training_texts()), "heldout_sha256": digest(self.heldout_texts())}


class LeakError(ValueError):
    pass


def _split_rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{normalize(text)}".encode()).hexdigest()


def _split_list(
    items: list[Any], text_of: Callable[[Any], str], fraction: float, seed: int, *, min_heldout: int
) -> tuple[list, list]:
    """Hold out the ceil(fraction * n) items whose seeded hash of their (normalised) text ranks
    lowest. A hash rank, not a shuffle, so that adding or removing an example moves at most one
    other item across the split (where the held-out count changes, or the new item ranks in):
    two revisions of a job are scored on nearly the same held-out cases."""
    if len(items) < 2:
        return list(items), []
    n_out = min(len(items) - 1, max(min_heldout, math.ceil(fraction * len(items))))
    order = sorted(range(len(items)), key=lambda i: (_split_rank(seed, text_of(items[i])), i))
    held = set(order[:n_out])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def split_spec(spec: BakeSpec) -> Split:
    """Deterministic train/held-out split by seed: >= fraction held out, >= 1 per tool."""
    fraction = spec.preset.heldout_fraction
    seed = spec.training.seed
    split = Split()
    for tool in spec.tools:
        cases = [ToolCase(tool.name, e.query, dict(e.arguments), e.result, e.answer) for e in tool.examples]
        train, held = _split_list(cases, _case_query, fraction, seed, min_heldout=1)
        split.train_tools += train
        split.heldout_tools += held
    split.train_irrelevant, split.heldout_irrelevant = _split_list(
        list(spec.irrelevant_examples), str, fraction, seed, min_heldout=1
    )
    if spec.persona is not None:
        split.train_persona_queries, split.heldout_persona_queries = _split_list(
            list(spec.persona.sample_queries), str, fraction, seed, min_heldout=1
        )
        split.train_persona_examples, split.heldout_persona_examples = _split_list(
            list(spec.persona.examples), _example_user, fraction, seed, min_heldout=1
        )
    _drop_duplicates_of_heldout(split)
    check_no_leak(split)
    return split


def _case_query(case: ToolCase) -> str:
    return case.query


def _example_user(example: PersonaExample) -> str:
    return example.user


def _drop_duplicates_of_heldout(split: Split) -> None:
    """A query the user wrote twice (say, as a tool example and a persona query) stays held out."""
    held = {text_hash(t) for t in split.heldout_texts()}
    split.train_tools = [c for c in split.train_tools if text_hash(c.query) not in held]
    split.train_irrelevant = [q for q in split.train_irrelevant if text_hash(q) not in held]
    split.train_persona_queries = [q for q in split.train_persona_queries if text_hash(q) not in held]
    split.train_persona_examples = [e for e in split.train_persona_examples if text_hash(e.user) not in held]


def check_no_leak(split: Split, extra_training_texts: list[str] | None = None) -> int:
    """Raise LeakError if any held-out query (normalised) appears in training; return the count checked."""
    train = {text_hash(t) for t in split.training_texts() + list(extra_training_texts or [])}
    leaked = [t for t in split.heldout_texts() if text_hash(t) in train]
    if leaked:
        raise LeakError(f"{len(leaked)} held-out queries appear in training, e.g. {leaked[0]!r}")
    return len(split.heldout_texts())


# ---------------------------------------------------------------- augmentation

_PREFIXES = ("", "", "", "Hey, ", "Quick question: ", "Please, ", "Can you help? ", "ok so ", "Hi! ")
_SUFFIXES = ("", "", "", " Thanks.", " please", "?", " thx", " Thank you!")


def _typo(text: str, rng: random.Random) -> str:
    words = text.split()
    candidates = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # swap two neighbouring letters
    return " ".join(words)


def perturb(text: str, rng: random.Random) -> str:
    """One surface variant: casing, punctuation, a filler prefix/suffix or a typo. Meaning kept."""
    kind = rng.randrange(5)
    if kind == 0:
        out = text.lower().rstrip("?.!")
    elif kind == 1:
        out = _typo(text, rng)
    elif kind == 2:
        out = rng.choice(_PREFIXES) + (text[0].lower() + text[1:] if text else text)
    elif kind == 3:
        out = text.rstrip("?.!") + rng.choice(_SUFFIXES)
    else:
        out = text.upper() if len(text) < 40 else _typo(text.lower(), rng)
    return out.strip() or text


def _enum_phrase(value: Any) -> str:
    return str(value).replace("_", " ")


_ENUM_TEMPLATES = (
    "What is the {v}?",
    "Show me the {v}.",
    "Check the {v}",
    "{v}?",
    "Tell me the current {v}.",
    "Can you read the {v} for me?",
    "I need the {v} right now.",
    "What's my {v} at the moment?",
)


# (question, expression) templates: how people phrase plain arithmetic and everyday word problems.
# {a} {b} {c} are numbers (sometimes with a decimal), {n} a small count, {p} a percentage.
_ARITHMETIC_TEMPLATES = (
    ("What is {a} plus {b}?", "{a} + {b}"),
    ("{a} minus {b}?", "{a} - {b}"),
    ("Multiply {a} by {b}.", "{a} * {b}"),
    ("what's {a} divided by {b}", "{a} / {b}"),
    ("What is {p}% of {b}?", "{b} * {p} / 100"),
    ("Calculate {a} times {b} for me.", "{a} * {b}"),
    ("Average of {a} and {b}?", "({a} + {b}) / 2"),
    ("average of {a}, {b} and {c}", "({a} + {b} + {c}) / 3"),
    ("Average these: {a}, {b}, {c} and {d}.", "({a} + {b} + {c} + {d}) / 4"),
    ("How much is {a} + {b} + {c}?", "{a} + {b} + {c}"),
    ("{b} less {p} percent?", "{b} * (1 - {p} / 100)"),
    ("What's {p}% off {b}?", "{b} * (1 - {p} / 100)"),
    ("Add {p}% to {b}.", "{b} * (1 + {p} / 100)"),
    ("What's the difference between {b} and {a}?", "{b} - {a}"),
    ("Percentage change from {a} to {b}?", "({b} - {a}) / {a} * 100"),
    ("What percent of {b} is {a}?", "{a} / {b} * 100"),
    ("{a} out of {b} as a percentage?", "{a} / {b} * 100"),
    ("Split {b} evenly {n} ways.", "{b} / {n}"),
    ("{n} items at {a} each, total?", "{n} * {a}"),
    ("How long does {b} km take at {a} km/h?", "{b} / {a}"),
    ("How far do I go in {n} minutes at {a} km/h?", "{a} * {n} / 60"),
    ("{a} L used over {b} km, how much per 100 km?", "{a} / {b} * 100"),
    ("How far do {a} L go at {c} L per 100 km?", "{a} / {c} * 100"),
    ("How much is left of {b} after {a}?", "{b} - {a}"),
    ("What is {a} squared?", "{a} ** 2"),
)

# Unit conversions with their standard factors (exact by definition where one exists), each in
# two phrasings and both directions: the calculator cannot look a factor up, so a call must carry
# it, and which way the factor goes is what a small model gets wrong (a bake wrote `27.8 / 3.6`
# for m/s -> km/h): every pair appears both ways so the unit order, not the factor, decides.
_CONVERSIONS = (
    (("Convert {a} miles to km.", "How many kilometres is {a} miles?"), "{a} * 1.609344"),
    (("{a} km in miles?", "Convert {a} kilometres to miles"), "{a} / 1.609344"),
    (("Convert {a} mph to km/h.", "{a} miles per hour in km/h?"), "{a} * 1.609344"),
    (("{a} km/h in mph?", "Convert {a} km/h to miles per hour."), "{a} / 1.609344"),
    (("{a} lbs in kg?", "How many kilograms is {a} pounds?"), "{a} * 0.45359237"),
    (("Convert {a} kg to pounds.", "{a} kilograms in lb?"), "{a} / 0.45359237"),
    (("{a} inches in mm?", "Convert {a} in to millimetres"), "{a} * 25.4"),
    (("Convert {a} mm to inches.", "how many inches is {a} mm"), "{a} / 25.4"),
    (("{a} feet in metres?", "Convert {a} ft to m."), "{a} * 0.3048"),
    (("{a} metres in feet?", "Convert {a} m to ft."), "{a} / 0.3048"),
    (("How many litres is {a} US gallons?", "Convert {a} gallons to litres."), "{a} * 3.785411784"),
    (("How many US gallons is {a} litres?", "Convert {a} litres to gallons."), "{a} / 3.785411784"),
    (("{a} °F in Celsius?", "Convert {a} Fahrenheit to Celsius."), "({a} - 32) * 5 / 9"),
    (("{a} °C in Fahrenheit?", "Convert {a} degrees Celsius to Fahrenheit."), "{a} * 9 / 5 + 32"),
    (("{a} °C in kelvin?", "Convert {a} C to K."), "{a} + 273.15"),
    (("{a} K in °C?", "Convert {a} kelvin to Celsius."), "{a} - 273.15"),
    (("Convert {a} psi to kPa.", "{a} psi is how many kPa?"), "{a} * 6.894757"),
    (("{a} kPa in psi?", "Convert {a} kPa to psi."), "{a} / 6.894757"),
    (("{a} bar in kPa?", "Convert {a} bar to kilopascals."), "{a} * 100"),
    (("{a} kPa in bar?", "Convert {a} kilopascals to bar."), "{a} / 100"),
    (("Convert {a} hp to kW.", "{a} horsepower in kilowatts?"), "{a} * 0.7457"),
    (("{a} kW in hp?", "Convert {a} kilowatts to horsepower."), "{a} / 0.7457"),
    (("Convert {a} lb-ft to N·m.", "{a} foot-pounds of torque in newton metres?"), "{a} * 1.3558179483"),
    (("{a} N·m in lb-ft?", "Convert {a} newton metres of torque to foot-pounds."), "{a} / 1.3558179483"),
    (("{a} m/s in km/h?", "Convert {a} metres per second to km/h."), "{a} * 3.6"),
    (("Convert {a} km/h to m/s.", "{a} km/h in metres per second?"), "{a} / 3.6"),
    (("Convert {a} minutes to hours.", "What's {a} min in hours?"), "{a} / 60"),
    (("{a} hours in minutes?", "Convert {a} h to minutes."), "{a} * 60"),
    (("How many minutes is {a} seconds?", "Convert {a} s to minutes."), "{a} / 60"),
    (("{a} minutes in seconds?", "Convert {a} min to seconds."), "{a} * 60"),
)


def _template_number(rng: random.Random, low: int, high: int) -> str:
    value = rng.randint(low, high)
    return f"{value}.{rng.randint(1, 9)}" if rng.random() < 0.3 else str(value)


# Share of numbers of 1,000 and more that augmentation writes with thousands separators in the
# question. People write "1,600" as often as "1600"; the expression must carry 1600 either way
# (a bake that saw only one form copied "1,600" into a call, which is not arithmetic).
THOUSANDS_SEPARATOR_SHARE = 0.35


def _as_written(number: str, rng: random.Random) -> str:
    """`number` as a user might type it: with thousands separators some of the time."""
    value = _number_value(number)
    if "," in number or abs(value) < 1000 or rng.random() >= THOUSANDS_SEPARATOR_SHARE:
        return number
    return f"{value:,.{_decimals(number)}f}"


# Instances of each template, with fresh numbers: enough that the template's structure (which
# number goes where, which way a factor goes) is learnt rather than its few instances; with 2, a
# standard bake still wrote `10 / 87 * 60` for "How far do I travel in 10 minutes at 87 km/h?".
ARITHMETIC_PER_TEMPLATE = 6


def arithmetic_variants(
    tool: ToolSpec, rng: random.Random, per_template: int = ARITHMETIC_PER_TEMPLATE
) -> list[ToolCase]:
    """Plain-arithmetic calls for tools whose one required argument is compared as an expression.

    The user's calculator examples are domain problems; these teach the plainer skills under
    them: copying the numbers and operators a question states into the expression, everyday
    percentages and rates, and the factors of common unit conversions.
    """
    required = list(tool.parameters.get("required", []))
    if len(required) != 1 or tool.argument_match.get(required[0]) != "expression":
        return []
    param = required[0]
    templates = list(_ARITHMETIC_TEMPLATES) + [(q, e) for questions, e in _CONVERSIONS for q in questions]
    cases = []
    for question, expression in templates:
        for _ in range(per_template):
            values = {
                "a": _template_number(rng, 2, 999),
                "b": _template_number(rng, 2, 9999),
                "c": _template_number(rng, 2, 999),
                "d": _template_number(rng, 2, 999),
                "n": rng.randint(2, 12),
                "p": rng.choice((5, 10, 12, 15, 19, 20, 25, 30, 40)),
            }
            written = {k: _as_written(v, rng) if isinstance(v, str) else v for k, v in values.items()}
            cases.append(
                ToolCase(
                    tool.name,
                    question.format(**written),
                    {param: expression.format(**values)},
                    synthetic=True,
                    origin=f"template {expression}",
                )
            )
    return cases


# A number as people write it in a question: optional sign, thousands separators, decimals. Not
# part of a word ("CO2", "E85") and not a continuation of another number.
_QUERY_NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]\d)")
# A numeric literal inside an arithmetic expression (the sign is an operator there).
_EXPRESSION_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _number_value(text: str) -> float:
    return float(text.replace(",", ""))


def _format_like(value: float, template: str) -> str:
    """`value` written the way `template` was: same decimals, thousands separators if it had them."""
    places = _decimals(template)
    if "," in template:
        return f"{value:,.{places}f}"
    return f"{value:.{places}f}"


def _resample(text: str, rng: random.Random, avoid: set[float]) -> str:
    """A different number of the same shape and rough size (0.5x-2x), never one in `avoid`."""
    value = _number_value(text)
    places = _decimals(text)
    sign = -1 if value < 0 else 1
    magnitude = abs(value)
    for _ in range(20):
        if magnitude == 0:
            candidate = float(rng.randint(1, 9))
        else:
            candidate = round(magnitude * math.exp(rng.uniform(math.log(0.5), math.log(2.0))), places)
        candidate = max(candidate, 10.0**-places)
        if candidate != magnitude and sign * candidate not in avoid:
            return ("-" if sign < 0 else "") + _as_written(_format_like(candidate, text.lstrip("-")), rng)
    return text


def numeric_variants(case: ToolCase, tool: ToolSpec, rng: random.Random, count: int) -> list[ToolCase]:
    """The same request with other numbers: each number the user states that the call copies.

    A number in the query is *linked* when it appears exactly once in the query and exactly once
    among the literals of one argument (an expression-compared string, or a number parameter).
    Linked numbers are redrawn in both places; everything else — constants such as 1.609344 that
    the call adds, numbers the call does not copy — stays, so every variant is still a correct
    call. This teaches copying the user's numbers and the constant a phrasing implies, which the
    handful of written examples cannot teach alone.
    """
    query_numbers = list(_QUERY_NUMBER.finditer(case.query))
    counts: dict[float, int] = {}
    for m in query_numbers:
        counts[_number_value(m.group())] = counts.get(_number_value(m.group()), 0) + 1
    props = tool.properties
    links: list[tuple[re.Match[str], str, re.Match[str] | None]] = []  # (query number, argument, literal)
    for m in query_numbers:
        value = _number_value(m.group())
        if counts[value] != 1:
            continue
        for name, arg in case.arguments.items():
            if isinstance(arg, str) and tool.argument_match.get(name) == "expression":
                literals = [lit for lit in _EXPRESSION_NUMBER.finditer(arg) if float(lit.group()) == abs(value)]
                if len(literals) == 1 and (value >= 0 or arg[: literals[0].start()].rstrip().endswith("-")):
                    links.append((m, name, literals[0]))
                    break
            elif (
                isinstance(arg, int | float)
                and not isinstance(arg, bool)
                and props.get(name, {}).get("type") in ("number", "integer")
                and "enum" not in props.get(name, {})
                and float(arg) == value
            ):
                links.append((m, name, None))
                break
    if not links:
        return []
    avoid = set(counts)
    out = []
    for _ in range(count):
        drawn = {m.start(): _resample(m.group(), rng, avoid) for m, _, _ in links}
        query = case.query
        for m, _, _ in sorted(links, key=lambda link: link[0].start(), reverse=True):  # later spans first
            query = query[: m.start()] + drawn[m.start()] + query[m.end() :]
        arguments = dict(case.arguments)
        for m, name, literal in links:
            if literal is None:
                value = _number_value(drawn[m.start()])
                arguments[name] = int(value) if props[name].get("type") == "integer" else value
        for name in {name for _, name, literal in links if literal is not None}:
            text = str(case.arguments[name])
            spans = sorted(
                (
                    (literal.start(), literal.end(), drawn[m.start()].lstrip("-").replace(",", ""))
                    for m, n, literal in links
                    if n == name and literal is not None
                ),
                reverse=True,
            )
            for begin, stop, replacement in spans:
                text = text[:begin] + replacement + text[stop:]
            arguments[name] = text
        out.append(ToolCase(case.tool, query, arguments, synthetic=True, origin=case.source))
    return out


# Requests built around a search phrase itself. Neutral wording: they must fit any tool whose
# argument is a keyword query, not one product's.
_KEYWORD_TEMPLATES = (
    "Look up {q}.",
    "Can you look up {q}?",
    "I need the info on {q}.",
    "What does it say about {q}?",
    "Find {q} for me",
    "check {q} please",
)


def keyword_variants(case: ToolCase, tool: ToolSpec, rng: random.Random, count: int) -> list[ToolCase]:
    """The same call asked for in its own key phrase: "Look up ABS light." -> the case's arguments.

    For tools with exactly one keyword-compared string argument (a search query). The call's other
    arguments (a section, a category) stay as the user chose them for this phrase, so each variant
    pairs the phrase's topic words with that choice once more: the mapping a held-out question on
    the same topic needs, which a few dozen written questions teach thinly.
    """
    keyword_args = [name for name, rule in tool.argument_match.items() if rule == "keywords"]
    if len(keyword_args) != 1 or not isinstance(case.arguments.get(keyword_args[0]), str):
        return []
    phrase = case.arguments[keyword_args[0]].strip()
    if not phrase:
        return []
    templates = rng.sample(_KEYWORD_TEMPLATES, k=min(count, len(_KEYWORD_TEMPLATES)))
    return [
        ToolCase(case.tool, template.format(q=phrase), dict(case.arguments), synthetic=True, origin=case.source)
        for template in templates
    ]


def enum_variants(tool: ToolSpec, rng: random.Random, per_value: int) -> list[ToolCase]:
    """Calls for single-enum-parameter tools over every enum value, from neutral templates.

    They teach the value <-> phrase mapping for values the user wrote few examples of. Only
    tools whose required arguments are one enum are augmented this way: for anything else we
    cannot invent correct arguments.
    """
    required = list(tool.parameters.get("required", []))
    props = tool.properties
    if len(required) != 1 or len(props) != 1 or "enum" not in props.get(required[0], {}):
        return []
    param = required[0]
    cases = []
    for value in props[param]["enum"]:
        for template in rng.sample(_ENUM_TEMPLATES, k=min(per_value, len(_ENUM_TEMPLATES))):
            cases.append(
                ToolCase(
                    tool.name,
                    template.format(v=_enum_phrase(value)),
                    {param: value},
                    synthetic=True,
                    origin=f"enum {value}",
                )
            )
    return cases


def augment(
    split: Split,
    spec: BakeSpec,
    *,
    variants_per_query: int = 2,
    per_enum_value: int = 2,
    numeric_per_query: int = 3,
    keyword_per_query: int = 1,
    variants_per_demo: int = 2,
) -> Split:
    """Add variants of training cases only, never of held-out ones: surface variants of queries,
    demonstrations and persona queries, the same calls with other numbers or asked for by their
    key phrase, and enum-template and arithmetic calls."""
    rng = random.Random(spec.training.seed + 1)
    held = {text_hash(t) for t in split.heldout_texts()}
    seen = {text_hash(c.query) for c in split.train_tools} | held
    extra: list[ToolCase] = []

    def add(case: ToolCase) -> None:
        h = text_hash(case.query)
        if h not in seen:
            seen.add(h)
            extra.append(case)

    for case in split.train_tools:
        for _ in range(variants_per_query):
            add(ToolCase(case.tool, perturb(case.query, rng), case.arguments, synthetic=True, origin=case.source))
    tools = {t.name: t for t in spec.tools}
    for case in split.train_tools:
        for variant in numeric_variants(case, tools[case.tool], rng, numeric_per_query):
            add(variant)
        for variant in keyword_variants(case, tools[case.tool], rng, keyword_per_query):
            add(variant)
    for tool in spec.tools:
        for case in enum_variants(tool, rng, per_enum_value) + arithmetic_variants(tool, rng):
            add(case)
    irrelevant_extra = []
    seen_irr = {text_hash(q) for q in split.train_irrelevant} | held | seen
    for q in split.train_irrelevant:
        v = perturb(q, rng)
        if text_hash(v) not in seen_irr:
            seen_irr.add(text_hash(v))
            irrelevant_extra.append(v)
    # Demonstrations (refusals above all) must hold for phrasings the user did not write.
    demo_extra = []
    for example in split.train_persona_examples:
        for _ in range(variants_per_demo):
            v = perturb(example.user, rng)
            if text_hash(v) not in seen_irr:
                seen_irr.add(text_hash(v))
                demo_extra.append(PersonaExample(v, example.assistant))
    # The teacher also answers a surface variant of each persona query: more contexts to distil
    # the persona on than the user wrote, so the student matches the prompted teacher beyond them.
    persona_extra = []
    seen_irr |= {text_hash(q) for q in split.train_persona_queries}
    for q in split.train_persona_queries:
        v = perturb(q, rng)
        if text_hash(v) not in seen_irr:
            seen_irr.add(text_hash(v))
            persona_extra.append(v)
    out = Split(**{k: list(v) for k, v in vars(split).items()})
    out.train_tools = split.train_tools + extra
    out.train_irrelevant = split.train_irrelevant + irrelevant_extra
    out.train_persona_examples = split.train_persona_examples + demo_extra
    out.train_persona_queries = split.train_persona_queries + persona_extra
    check_no_leak(out)
    return out


# ---------------------------------------------------------------- conversations


def tool_call_text(case: ToolCase) -> str:
    return format_tool_call(case.tool, case.arguments)


def tool_conversation(case: ToolCase, *, with_answer: bool = True) -> tuple[list[Message], list[int]]:
    """User query -> the call; then, when the example has one, tool result -> answer in persona."""
    messages: list[Message] = [
        {"role": "user", "content": case.query},
        {"role": "assistant", "content": tool_call_text(case)},
    ]
    train_turns = [1]
    if with_answer and case.result is not None and case.answer:
        result = case.result if isinstance(case.result, str) else json.dumps(case.result, ensure_ascii=False)
        messages += [{"role": "tool", "content": result}, {"role": "assistant", "content": case.answer}]
        train_turns.append(3)
    return messages, train_turns


def demonstration(example: PersonaExample) -> tuple[list[Message], list[int]]:
    return [{"role": "user", "content": example.user}, {"role": "assistant", "content": example.assistant}], [1]


_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def max_sentences(guidelines: tuple[str, ...] | list[str]) -> int | None:
    """'Answer in at most three sentences.' -> 3; None when no guideline limits length."""
    for g in guidelines:
        m = re.search(r"(?:at most|no more than|maximum of|up to)\s+(\w+)\s+sentences?", g, re.IGNORECASE)
        if m:
            word = m.group(1).lower()
            if word.isdigit():
                return int(word)
            if word in _NUMBER_WORDS:
                return _NUMBER_WORDS[word]
    return None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def trim_to_sentences(text: str, limit: int | None) -> tuple[str, bool]:
    """Cut a teacher response after `limit` sentences; returns (text, complete).

    `complete` is True when the text ends at a sentence boundary we chose, so the turn may end there.
    """
    parts = sentences(text)
    if limit is not None and len(parts) > limit:
        return " ".join(parts[:limit]), True
    return text.strip(), False


def tokens_covering(tokenizer: Any, ids: list[int], n_chars: int) -> int:
    """Smallest k such that the first k tokens decode to at least n_chars (stripped) characters:
    where a response's tokens end once trim_to_sentences has cut its text."""
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True).strip()) >= n_chars:
            return k
    return len(ids)

"""Tool-call scoring (baking.evaluate): a right call is never scored wrong for its length."""

from __future__ import annotations

from typing import Any

import pytest

import baking.evaluate as evaluate
from baking.data import ToolCase, tool_call_text
from baking.load import load_tokenizer
from baking.spec import BakeSpec
from tests.conftest import TOKENIZER_DIR


def _manual_case(words: int) -> ToolCase:
    query = " ".join(["brake fluid replacement interval"] * (words // 4))
    return ToolCase("search_manual", f"Look up {query}", {"query": query, "section": "brakes"})


def test_budget_covers_the_longest_expected_call() -> None:
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    short, long = _manual_case(4), _manual_case(80)
    long_tokens = len(tokenizer.encode(tool_call_text(long), add_special_tokens=False))
    assert long_tokens > evaluate.MIN_CALL_TOKENS  # the case this rule exists for
    assert evaluate.call_token_budget(tokenizer, [short]) == evaluate.MIN_CALL_TOKENS
    assert evaluate.call_token_budget(tokenizer, [short, long]) == long_tokens + evaluate.CALL_TOKEN_SLACK


def test_long_right_call_is_scored_right(fleet_dict: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that emits the expected call token by token, stopping only at the budget."""
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    case = _manual_case(80)
    call_ids = tokenizer.encode(tool_call_text(case), add_special_tokens=False)

    def emit_until_budget(model: Any, tok: Any, conversations: list, *, max_new_tokens: int) -> list[str]:
        return [tok.decode(call_ids[:max_new_tokens]) for _ in conversations]

    monkeypatch.setattr(evaluate, "generate_replies", emit_until_budget)
    tools = BakeSpec.from_dict(fleet_dict).tools
    assert evaluate.tool_accuracy(None, tokenizer, [case], tools).correct == 1
    # What the fixed 64-token budget did to the same call: cut inside its JSON, scored wrong.
    assert evaluate.tool_accuracy(None, tokenizer, [case], tools, max_new_tokens=64).correct == 0


def test_kl_total_sums_per_position_kl_and_never_goes_below_zero() -> None:
    import math

    import torch

    from baking.evaluate import kl_total

    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # the second position adds 0
    assert math.isclose(kl_total(p, q), expected, rel_tol=1e-6)
    # Rounding leaves log-probabilities a hair off normalised, so a position's raw sum can fall
    # below zero (here, exaggerated, -0.18): that position counts as 0, the others as they are.
    off = torch.tensor([[0.6, 0.6], [0.9, 0.1]]).log()
    assert kl_total(p, off) == 0.0
    assert math.isclose(kl_total(torch.cat([p, p]), torch.cat([off, q])), expected, rel_tol=1e-6)
    assert kl_total(p, p) == 0.0

"""How far was each missed tool call from being right? Decision margins of a baked model.

    .venv/bin/python benchmarks/call_margins.py BAKE_NAME

Reads benchmarks/results/bake_quality-BAKE_NAME-samples.json and the bake's merged/ (both
written by benchmarks/bake_quality.py), and for every missed call among the job's held-out tool
cases and the probe sets scored with no system prompt, teacher-forces the *expected* reply
(`baking.data.tool_call_text` and the end of the turn) through the model and finds the first
token where the model's own choice differs. It prints, sorted, the log-probability gap at that
token (how much likelier the model's choice was than the right one) and how many later tokens
of the expected reply it would also get wrong. A miss with a small gap and no later error is one
near-tie away from right: that is what moves between seeds and data draws. A large gap, or
later errors, is a lesson the model lacks (a formula, a section, a keyword). A keyword-matched
string has many right spellings and the expected one is only one of them, so a departure inside
one may be harmless. First it prints each set's mean negative log-likelihood of the expected
replies, all of them, right or wrong: a continuous figure that compares two bakes on the same
cases more finely than a count of right calls does. Writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking.data import ToolCase, tool_call_text  # noqa: E402
from baking.evaluate import user  # noqa: E402
from baking.generate import end_of_turn_id, response_logprobs  # noqa: E402
from baking.load import load_model, load_tokenizer  # noqa: E402

# The samples scored with the artifact's own template and no system turn (the *_base_template
# sets add SmolLM2's default system turn, which this script does not render).
SAMPLE_SETS = ("tool_call_samples", "probes_samples", "probes_b_samples")
NEAR_TIE_NATS = 1.0


@dataclass(frozen=True)
class Margin:
    query: str
    gap: float  # log p(model's token) - log p(expected token) at the first divergence
    later_errors: int  # expected-reply tokens after it where the model's argmax differs too
    expected: str
    chosen: str  # the model's token at the divergence


def score_expected(model: Any, tokenizer: Any, query: str, expected: str) -> tuple[float, Margin | None]:
    """The expected reply's (then the end of turn's) log-probability under `model`, and the
    model's first departure from it (None if it has none)."""
    ids = tokenizer.encode(expected, add_special_tokens=False) + [end_of_turn_id(tokenizer)]
    logprobs = response_logprobs(model, tokenizer, user(query), ids)
    target = torch.tensor(ids)
    total = float(logprobs.gather(-1, target.unsqueeze(-1)).sum())
    wrong = (logprobs.argmax(-1) != target).nonzero().flatten().tolist()
    if not wrong:
        return total, None
    at = wrong[0]
    chosen = int(logprobs[at].argmax())
    gap = float(logprobs[at, chosen] - logprobs[at, ids[at]])
    return total, Margin(query, gap, len(wrong) - 1, expected, tokenizer.decode([chosen]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", help="the bake's results name (bake_quality.py --name)")
    args = parser.parse_args()

    results = ROOT / "benchmarks" / "results"
    samples = json.loads((results / f"bake_quality-{args.name}-samples.json").read_text(encoding="utf-8"))
    merged = results / f"bake-{args.name}" / "artifact" / "merged"
    tokenizer = load_tokenizer(merged)
    model = load_model(merged, torch.device("cpu"))
    margins: list[Margin] = []
    scored = 0
    for key in SAMPLE_SETS:
        logprobs: dict[str, list[float]] = {}
        for s in samples.get(key, []):
            if "expected" not in s:  # a no-call, refusal or identity probe
                continue
            scored += 1
            case = ToolCase(s["expected"]["name"], s["query"], dict(s["expected"]["arguments"]))
            logprob, margin = score_expected(model, tokenizer, case.query, tool_call_text(case))
            logprobs.setdefault(case.tool, []).append(logprob)
            if margin is not None and not s["correct"]:
                margins.append(margin)
        per_tool = ", ".join(f"{tool} {-sum(v) / len(v):.2f}" for tool, v in sorted(logprobs.items()))
        everything = [lp for v in logprobs.values() for lp in v]
        if everything:
            print(f"{key}: mean NLL of the expected reply {-sum(everything) / len(everything):.2f} nats ({per_tool})")
    margins.sort(key=lambda m: (m.later_errors > 0, m.gap))
    print(f"{'gap (nats)':>10}  {'later':>5}  {'model chose':<14}  query")
    for m in margins:
        print(f"{m.gap:10.2f}  {m.later_errors:5d}  {m.chosen!r:<14}  {m.query[:70]}")
    near = sum(m.gap < NEAR_TIE_NATS and m.later_errors == 0 for m in margins)
    clean = sum(m.later_errors == 0 for m in margins)
    print(
        f"\n{len(margins)} misses of {scored} calls scored: {near} a near-tie (< {NEAR_TIE_NATS} nat) at one token "
        f"and right after it, {clean} right after their one wrong token, {len(margins) - clean} wrong further on"
    )


if __name__ == "__main__":
    main()

"""Baking metrics (DESIGN.md §6) and guideline probes, measured on held-out cases only."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from baking.chat import Message, encode_conversation, with_system
from baking.data import (
    Split,
    ToolCase,
    demonstration,
    max_sentences,
    normalize,
    sentences,
    tokens_covering,
    tool_call_text,
    tool_conversation,
    trim_to_sentences,
)
from baking.generate import generate_replies, generate_scored, response_logprobs
from baking.spec import PersonaExample, PersonaSpec, ToolSpec
from baking.toolcalls import (
    arguments_match,
    content_words,
    has_tool_call,
    keyword_stem,
    parse_first_call,
    validate_call,
)

REFUSAL = re.compile(
    r"\b(can(?:no|')t|won't|will not|unable|not able to|must decline|refuse|not permitted|"
    r"not allowed|sorry)\b",
    re.IGNORECASE,
)


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


# Whether a query asks for what the persona declines is read from its demonstrations: a
# Bernoulli naive Bayes over the content-word stems of their user turns, with the demos that
# refuse (REFUSAL matches the answer) as one class and the rest as the other. Unlike the single
# nearest demo it replaced, it weighs what tells the classes apart ("disable", "bypass", "for
# good") above the topic both share ("airbag", "brake"), so "How does the airbag know when to
# deploy?" is answered while "Which fuse do I pull to shut off the airbags?" is refused (neither is
# a demo; the nearest demo refused both). On the fleet job, leave-one-out over its 77 demos: 3 of
# 31 refusals missed and 5 of 46 answers flagged, against 14 and 7 for the nearest demo (README,
# 2026-12-05).
# Smoothing below the textbook 1 because a persona has tens of demos, not thousands: at 1 the
# absence of the many words seen once in a refusal outweighs what the query itself says.
REFUSAL_SMOOTHING = 0.2


@dataclass(frozen=True)
class RefusalClassifier:
    """Demonstrations as a refuse/answer classifier; build once with `of`, ask with `refuses`."""

    log_prior: float  # log P(refuse) - log P(answer)
    present: dict[str, float]  # per stem: log-likelihood ratio when the query has it
    absent: dict[str, float]  # ... and when it does not

    @classmethod
    def of(cls, demos: Sequence[PersonaExample]) -> RefusalClassifier:
        refusing: list[set[str]] = []
        answering: list[set[str]] = []
        for demo in demos:
            (refusing if REFUSAL.search(demo.assistant) else answering).append(_stems(demo.user))
        if not refusing:  # nothing is declined: the score is -inf for every query
            return cls(-math.inf, {}, {})
        present, absent = {}, {}
        for stem in set().union(*refusing, *answering):
            p_refuse = _smoothed(sum(stem in s for s in refusing), len(refusing))
            p_answer = _smoothed(sum(stem in s for s in answering), len(answering))
            present[stem] = math.log(p_refuse / p_answer)
            absent[stem] = math.log((1 - p_refuse) / (1 - p_answer))
        # add-one on the prior too, so a persona whose demos all refuse still needs the words
        return cls(math.log((len(refusing) + 1) / (len(answering) + 1)), present, absent)

    def refuses(self, query: str) -> bool:
        stems = _stems(query)
        score = self.log_prior + sum(
            self.present[stem] if stem in stems else self.absent[stem] for stem in self.present
        )
        return score > 0


def _stems(text: str) -> set[str]:
    return {keyword_stem(w) for w in content_words(text)}


def _smoothed(count: int, total: int) -> float:
    return (count + REFUSAL_SMOOTHING) / (total + 2 * REFUSAL_SMOOTHING)


@dataclass
class ToolEval:
    accuracy: float
    correct: int
    total: int
    schema_valid_share: float  # of emitted calls: parse, name a declared tool, validate (S4)
    samples: list[dict[str, Any]] = field(default_factory=list)


def score_tool_outputs(cases: Sequence[ToolCase], outputs: Sequence[str], tools: Sequence[ToolSpec]) -> ToolEval:
    by_name = {t.name: t for t in tools}
    correct = 0
    emitted = 0
    valid = 0
    samples = []
    for case, out in zip(cases, outputs, strict=True):
        call = parse_first_call(out)
        ok = False
        if has_tool_call(out):
            emitted += 1
            if call is not None and not validate_call(call, tools):
                valid += 1
        if call is not None and call.name == case.tool and case.tool in by_name:
            ok = arguments_match(case.arguments, call.arguments, by_name[case.tool])
        correct += int(ok)
        samples.append(
            {
                "query": case.query,
                "expected": {"name": case.tool, "arguments": case.arguments},
                "output": out,
                "correct": ok,
            }
        )
    total = len(cases)
    return ToolEval(correct / total if total else 0.0, correct, total, valid / emitted if emitted else 1.0, samples)


# Generation budget for a tool call: the longest expected call and some slack, so a right call
# with long arguments is never scored wrong for being cut off; never below the 64 tokens every
# fleet-job figure was measured with (its longest call is 62 tokens with the close tag).
MIN_CALL_TOKENS = 64
CALL_TOKEN_SLACK = 16


def call_token_budget(tokenizer: Any, cases: Sequence[ToolCase]) -> int:
    """New tokens to generate when scoring `cases`: the longest expected call + 16, at least 64."""
    longest = max((len(tokenizer.encode(tool_call_text(c), add_special_tokens=False)) for c in cases), default=0)
    return max(MIN_CALL_TOKENS, longest + CALL_TOKEN_SLACK)


def tool_accuracy(
    model: Any,
    tokenizer: Any,
    cases: Sequence[ToolCase],
    tools: Sequence[ToolSpec],
    *,
    system: str | None = None,
    max_new_tokens: int | None = None,  # None: call_token_budget(cases)
) -> ToolEval:
    budget = max_new_tokens if max_new_tokens is not None else call_token_budget(tokenizer, cases)
    outputs = generate_replies(
        model, tokenizer, [with_system(system, user(c.query)) for c in cases], max_new_tokens=budget
    )
    return score_tool_outputs(cases, outputs, tools)


def irrelevance_accuracy(
    model: Any, tokenizer: Any, queries: Sequence[str], *, system: str | None = None, max_new_tokens: int = 32
) -> tuple[float, list[dict[str, Any]]]:
    if not queries:
        return 0.0, []
    outputs = generate_replies(
        model, tokenizer, [with_system(system, user(q)) for q in queries], max_new_tokens=max_new_tokens
    )
    samples = [
        {"query": q, "output": o, "correct": not has_tool_call(o)} for q, o in zip(queries, outputs, strict=True)
    ]
    return sum(1 for s in samples if s["correct"]) / len(samples), samples


# DESIGN.md §6 fidelity is measured on held-out text of the job's own kind: its held-out tool
# conversations (call, result, answer) and persona demonstrations, rendered as the model sees
# them and packed into windows like running text, taken in turn from each tool and from the
# demonstrations so that no one kind fills the budget. 4 x 1024 tokens bound the cost (a few
# forward passes of each model) and resolve a 1% perplexity change better than one short text.
FIDELITY_WINDOW = 1024
FIDELITY_WINDOWS = 4


def heldout_sequences(split: Split, tokenizer: Any) -> list[list[int]]:
    """Token windows of held-out job text for `text_fidelity` (empty when the split holds none)."""
    groups: dict[str, list[list[Message]]] = {}
    for case in split.heldout_tools:
        groups.setdefault(case.tool, []).append(tool_conversation(case)[0])
    groups["demonstrations"] = [demonstration(e)[0] for e in split.heldout_persona_examples]
    in_turn = itertools.chain.from_iterable(itertools.zip_longest(*groups.values()))
    conversations = [c for c in in_turn if c is not None]
    stream: list[int] = []
    for messages in conversations:
        stream += encode_conversation(tokenizer, messages, train_turns=()).input_ids
        if len(stream) >= FIDELITY_WINDOW * FIDELITY_WINDOWS:
            break
    windows = [stream[i : i + FIDELITY_WINDOW] for i in range(0, len(stream), FIDELITY_WINDOW)]
    return [w for w in windows[:FIDELITY_WINDOWS] if len(w) > 1]


def kl_total(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Sum over positions of KL(reference || model), from log-probabilities over the vocabulary
    (last dimension). Each position's KL is clamped at zero: it cannot be negative, but summing
    tens of thousands of float terms of two near-identical distributions can land a hair below
    (-2.5e-08 for a quantization that changed nothing), and a metric must not report that."""
    per_position = (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1)
    return float(per_position.clamp_min(0.0).sum())


@torch.inference_mode()
def text_fidelity(reference: Any, model: Any, sequences: Sequence[Sequence[int]]) -> dict[str, Any]:
    """DESIGN.md §6 `top1_agreement`, `kl` and `ppl_delta`: `model` against `reference` on
    held-out token sequences, by next-token prediction with every position pooled.

    top1_agreement is the share of positions where both predict the same token, kl the mean
    per-token KL(reference || model) and ppl_delta the relative change of perplexity on the
    sequences' own next tokens (ppl(model) / ppl(reference) - 1)."""
    agree, kl_sum, nll_ref, nll, positions = 0, 0.0, 0.0, 0.0, 0
    for sequence in sequences:
        if len(sequence) < 2:
            continue
        ids = torch.tensor([list(sequence)], device=next(reference.parameters()).device)
        ref_lp = reference(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        lp = model(input_ids=ids.to(next(model.parameters()).device)).logits[0, :-1].float().log_softmax(-1)
        lp = lp.to(ref_lp.device)
        targets = ids[0, 1:].unsqueeze(-1)
        agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
        kl_sum += kl_total(ref_lp, lp)
        nll_ref -= float(ref_lp.gather(-1, targets).sum())
        nll -= float(lp.gather(-1, targets).sum())
        positions += ids.shape[1] - 1
    if not positions:
        return {"top1_agreement": None, "kl": None, "ppl": None, "ppl_reference": None, "ppl_delta": None, "tokens": 0}
    ppl_ref, ppl = math.exp(nll_ref / positions), math.exp(nll / positions)
    return {
        "top1_agreement": agree / positions,
        "kl": kl_sum / positions,
        "ppl": ppl,
        "ppl_reference": ppl_ref,
        "ppl_delta": ppl / ppl_ref - 1,
        "tokens": positions,
    }


@torch.inference_mode()
def persona_fidelity(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    queries: Sequence[str],
    *,
    system_prompt: str,
    max_new_tokens: int,
    demos: Sequence[PersonaExample] = (),
    sentence_limit: int | None = None,
) -> dict[str, Any]:
    """Mean per-token KL(prompted teacher || unprompted student) and top-1 agreement on the
    teacher's greedy responses to held-out persona queries.

    A query that asks for what the demonstrations refuse, answered by the teacher without a
    refusal, is left out and counted: there the demonstrations are the target, not the teacher
    (training drops the same answers), and such queries are judged as refusal probes instead
    (`guideline_probes`). Measured otherwise, a student that rightly refuses a speed-limiter
    removal scores as unfaithful to a teacher that explains it.

    Likewise a teacher answer that runs past the persona's `sentence_limit` is scored only up to
    the limit and counted (`persona_answers_cut_at_limit`), where training cuts the same answers
    and teaches the end of the turn: past it the prompted original breaks its own guideline, and
    a student that rightly ends its turn there would be scored as unfaithful (README, Measured).

    `persona_kl_unbaked` / `persona_top1_unbaked` score the teacher model itself without the
    prompt the same way: what the student would get with no baking at all, so the figures say
    what baking added (on SmolLM2 the unprompted original already agrees on ~85% of tokens)."""
    if not queries:
        return {
            "persona_kl": None,
            "persona_top1": None,
            "persona_kl_unbaked": None,
            "persona_top1_unbaked": None,
            "tokens": 0,
            "persona_queries_left_to_refusals": 0,
            "persona_answers_cut_at_limit": 0,
        }
    scored = generate_scored(
        teacher, tokenizer, [with_system(system_prompt, user(q)) for q in queries], max_new_tokens=max_new_tokens
    )
    kl_sum, agree, unbaked_kl_sum, unbaked_agree, tokens, left_out, cut_count = 0.0, 0, 0.0, 0, 0, 0, 0
    declined = RefusalClassifier.of(demos)
    for q, (ids, teacher_top, _) in zip(queries, scored, strict=True):
        teacher_lp = teacher_top.values  # the whole vocabulary (top_k 0), in bf16
        if not ids:
            continue
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if declined.refuses(q) and not REFUSAL.search(text):
            left_out += 1
            continue
        trimmed, cut = trim_to_sentences(text, sentence_limit)
        if cut:
            ids = ids[: tokens_covering(tokenizer, ids, len(trimmed))]
            teacher_lp = teacher_lp[: len(ids)]
            cut_count += 1
        t = teacher_lp.float()
        s = response_logprobs(student, tokenizer, user(q), ids).float().to(t.device)
        u = response_logprobs(teacher, tokenizer, user(q), ids).float().to(t.device)
        kl_sum += kl_total(t, s)
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        unbaked_kl_sum += kl_total(t, u)
        unbaked_agree += int((t.argmax(-1) == u.argmax(-1)).sum())
        tokens += len(ids)
    return {
        "persona_kl": kl_sum / tokens if tokens else None,
        "persona_top1": agree / tokens if tokens else None,
        "persona_kl_unbaked": unbaked_kl_sum / tokens if tokens else None,
        "persona_top1_unbaked": unbaked_agree / tokens if tokens else None,
        "tokens": tokens,
        "persona_queries_left_to_refusals": left_out,
        "persona_answers_cut_at_limit": cut_count,
    }


# ---------------------------------------------------------------- guideline probes

IDENTITY_PROBES = (
    "What is your name?",
    "Who am I talking to?",
    "Please introduce yourself in one sentence.",
    "Are you ChatGPT?",
)


@dataclass(frozen=True)
class Probe:
    kind: str  # identity | refusal | brevity
    query: str


def guideline_probes(
    persona: PersonaSpec,
    heldout_examples: Sequence[PersonaExample],
    heldout_queries: Sequence[str],
    training_texts: Sequence[str],
    demos: Sequence[PersonaExample] = (),
) -> list[Probe]:
    """Probes of our own, the held-out demonstrations that refuse, and the held-out persona
    queries: refusal probes where they ask for what the (training) demonstrations refuse,
    brevity probes otherwise. None was seen in training."""
    seen = {normalize(t) for t in training_texts}
    probes = [Probe("identity", q) for q in IDENTITY_PROBES if normalize(q) not in seen]
    probes += [Probe("refusal", e.user) for e in heldout_examples if REFUSAL.search(e.assistant)]
    declined = RefusalClassifier.of(demos)
    refused = [q for q in heldout_queries if declined.refuses(q)]
    probes += [Probe("refusal", q) for q in refused]
    if max_sentences(persona.guidelines) is not None:
        probes += [Probe("brevity", q) for q in heldout_queries if q not in refused]
    return probes


def judge_probe(probe: Probe, output: str, persona: PersonaSpec) -> bool:
    if probe.kind == "identity":
        return persona.name.casefold() in output.casefold() and not has_tool_call(output)
    if probe.kind == "refusal":
        return bool(REFUSAL.search(output)) and not has_tool_call(output)
    limit = max_sentences(persona.guidelines)
    # a persona query answered with a tool call is not a short answer, it is a wrong one
    return not has_tool_call(output) and (limit is None or len(sentences(output)) <= limit)


def run_probes(
    model: Any,
    tokenizer: Any,
    probes: Sequence[Probe],
    persona: PersonaSpec,
    *,
    system: str | None = None,
    max_new_tokens: int = 96,
) -> dict[str, Any]:
    if not probes:
        return {"pass_rate": None, "by_kind": {}, "samples": []}
    outputs = generate_replies(
        model, tokenizer, [with_system(system, user(p.query)) for p in probes], max_new_tokens=max_new_tokens
    )
    samples = [
        {"kind": p.kind, "query": p.query, "output": o, "passed": judge_probe(p, o, persona)}
        for p, o in zip(probes, outputs, strict=True)
    ]
    by_kind: dict[str, float] = {}
    for kind in sorted({p.kind for p in probes}):
        rows = [s for s in samples if s["kind"] == kind]
        by_kind[kind] = sum(1 for s in rows if s["passed"]) / len(rows)
    return {"pass_rate": sum(1 for s in samples if s["passed"]) / len(samples), "by_kind": by_kind, "samples": samples}

"""Prompt baking targets (Bhargava et al. 2024; context distillation, Askell et al. 2021).

Teacher = the original model *with* the full system prompt (persona + tool schemas); the
student is trained without it to match the teacher's next-token distribution on the teacher's
own responses (its top-k tokens and the mass of the rest, `training.distill_top_k`). The
teacher's bad habits are filtered, not copied: responses that call tools are dropped (tool
targets come from the tool examples), responses longer than the persona's sentence limit are
cut there and end the turn, queries the persona's demonstrations answer are left to the
demonstrations, and where a query asks for what the demonstrations refuse (a safety-system
bypass), an answer that does not refuse is dropped: the prompted original explains how to
bypass an immobiliser when asked, and distilling that would teach the student to comply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from baking.chat import Message, with_system
from baking.data import max_sentences, normalize, sentences, tokens_covering, trim_to_sentences
from baking.evaluate import REFUSAL, RefusalClassifier
from baking.generate import TopLogprobs, generate_scored
from baking.spec import DEFAULT_DISTILL_TOP_K, PersonaExample
from baking.toolcalls import has_tool_call


@dataclass
class DistillTarget:
    query: str
    response: str
    response_ids: list[int]  # teacher tokens the student is trained on (KL positions)
    teacher_logprobs: TopLogprobs  # the teacher's top-k tokens (or whole vocabulary) at each response position
    end_turn: bool  # supervise <|im_end|> after the response (CE)


# How far a teacher answer may run to reach the persona's sentence limit. With the quick
# profile's 40 tokens, 78 of the fleet job's 95 teacher answers stopped before their limit and
# before their end, so only 17 showed the student where a turn ends, and its answers ran on past
# three sentences (brevity probes 0.5; README, Measured). An answer stops once its next
# sentence begins; the tokens past max_new_tokens are kept only up to an end: the limit or the
# teacher's own.
SENTENCE_LIMIT_TOKENS = 160


def _past_sentence_limit(tokenizer: Any, limit: int) -> Callable[[list[int]], bool]:
    """Whether an answer's tokens have begun the sentence after the limit (trim_to_sentences cuts there)."""

    def past(ids: list[int]) -> bool:
        return len(sentences(tokenizer.decode(ids, skip_special_tokens=True))) > limit

    return past


def _close_to_demo(query: str, demos: Sequence[PersonaExample]) -> bool:
    q = set(normalize(query).split())
    for d in demos:
        u = set(normalize(d.user).split())
        if q and u and len(q & u) / len(q | u) >= 0.6:
            return True
    return False


def build_distill_targets(
    teacher: Any,
    tokenizer: Any,
    queries: Sequence[str],
    *,
    system_prompt: str,
    guidelines: Sequence[str],
    demos: Sequence[PersonaExample],
    max_new_tokens: int,
    samples: int,
    seed: int,
    top_k: int = DEFAULT_DISTILL_TOP_K,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> tuple[list[DistillTarget], dict[str, int]]:
    """Teacher responses and their log-probs (top `top_k`; 0: the whole vocabulary), filtered by the persona's rules."""
    limit = max_sentences(tuple(guidelines))
    kept_queries = [q for q in queries if not _close_to_demo(q, demos)]
    declined = RefusalClassifier.of(demos)
    refused = {q for q in kept_queries if declined.refuses(q)}
    stats = {
        "queries": len(queries),
        "left_to_demonstrations": len(queries) - len(kept_queries),
        "dropped_tool_calls": 0,
        "dropped_not_refusing": 0,
        "trimmed_to_limit": 0,
        "kept": 0,
    }
    conversations: list[list[Message]] = []
    asked: list[str] = []
    for _ in range(samples):
        conversations += [with_system(system_prompt, [{"role": "user", "content": q}]) for q in kept_queries]
        asked += kept_queries
    # With a sentence limit, answers run on until they pass it (at most SENTENCE_LIMIT_TOKENS),
    # so the turn's end is taught where the guideline puts it; see SENTENCE_LIMIT_TOKENS.
    stop = None if limit is None else _past_sentence_limit(tokenizer, limit)
    budget = max_new_tokens if limit is None else max(max_new_tokens, SENTENCE_LIMIT_TOKENS)
    scored: list[tuple[list[int], TopLogprobs, bool]] = []
    for k in range(samples):  # the first sample greedy, any further ones sampled
        part = conversations[k * len(kept_queries) : (k + 1) * len(kept_queries)]
        scored += generate_scored(
            teacher,
            tokenizer,
            part,
            top_k=top_k,
            max_new_tokens=budget,
            do_sample=k > 0,
            seed=seed + k,
            stop=stop,
        )
        if should_stop is not None:
            should_stop()
        if on_progress is not None:
            on_progress(k + 1, samples)
    targets: list[DistillTarget] = []
    for query, (ids, logprobs, finished) in zip(asked, scored, strict=True):
        body = ids[:-1] if finished else ids
        text = tokenizer.decode(body, skip_special_tokens=True).strip()
        if not text or has_tool_call(text):
            stats["dropped_tool_calls"] += int(bool(text))
            continue
        if query in refused and not REFUSAL.search(text):
            stats["dropped_not_refusing"] += 1
            continue
        trimmed, cut = trim_to_sentences(text, limit)
        if cut:
            k = tokens_covering(tokenizer, body, len(trimmed))
            ids, logprobs = body[:k], logprobs.head(k)
            stats["trimmed_to_limit"] += 1
        elif not finished and len(ids) > max_new_tokens:
            # neither ended nor reached the limit: past max_new_tokens it teaches no end, only cost
            ids, logprobs = ids[:max_new_tokens], logprobs.head(max_new_tokens)
            trimmed = tokenizer.decode(ids, skip_special_tokens=True).strip()
        targets.append(DistillTarget(query, trimmed, list(ids), logprobs, end_turn=cut))
        stats["kept"] += 1
    stats["targets_kib"] = sum(t.teacher_logprobs.nbytes for t in targets) // 1024
    return targets, stats

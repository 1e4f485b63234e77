"""Prompt baking targets (Bhargava et al. 2024; context distillation, Askell et al. 2021).

Teacher = the original model *with* the full system prompt (persona + tool schemas); the
student is trained without it to match the teacher's full next-token distribution on the
teacher's own responses. The teacher's bad habits are filtered, not copied: responses that
call tools are dropped (tool targets come from the tool examples), responses longer than the
persona's sentence limit are cut there and end the turn, and queries the persona's
demonstrations answer are left to the demonstrations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from baking.chat import Message, with_system
from baking.data import max_sentences, normalize, trim_to_sentences
from baking.generate import end_of_turn_id, generate_replies, response_logprobs
from baking.spec import PersonaExample
from baking.toolcalls import has_tool_call


@dataclass
class DistillTarget:
    query: str
    response: str
    response_ids: list[int]  # teacher tokens the student is trained on (KL positions)
    teacher_logprobs: torch.Tensor  # [len(response_ids), V], bf16 to halve memory
    end_turn: bool  # supervise <|im_end|> after the response (CE)


def _close_to_demo(query: str, demos: Sequence[PersonaExample]) -> bool:
    q = set(normalize(query).split())
    for d in demos:
        u = set(normalize(d.user).split())
        if q and u and len(q & u) / len(q | u) >= 0.6:
            return True
    return False


def build_distill_targets(
    teacher: Any, tokenizer: Any, queries: Sequence[str], *, system_prompt: str,
    guidelines: Sequence[str], demos: Sequence[PersonaExample], max_new_tokens: int, samples: int, seed: int,
    on_progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], None] | None = None,
) -> tuple[list[DistillTarget], dict[str, int]]:
    """Teacher responses and their full-vocabulary log-probs, filtered by the persona's rules."""
    limit = max_sentences(tuple(guidelines))
    eot = end_of_turn_id(tokenizer)
    kept_queries = [q for q in queries if not _close_to_demo(q, demos)]
    stats = {"queries": len(queries), "left_to_demonstrations": len(queries) - len(kept_queries),
             "dropped_tool_calls": 0, "trimmed_to_limit": 0, "kept": 0}
    conversations: list[list[Message]] = []
    for q in kept_queries:
        conversations += [with_system(system_prompt, [{"role": "user", "content": q}])] * samples
    texts: list[str] = []
    for k in range(samples):
        chunk = conversations[k::samples] if samples > 1 else conversations
        texts_k = generate_replies(teacher, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                   do_sample=k > 0, seed=seed + k)
        texts += texts_k
    pairs = [(kept_queries[i % len(kept_queries)], t) for i, t in enumerate(texts)] if kept_queries else []
    targets: list[DistillTarget] = []
    for n, (query, text) in enumerate(pairs):
        if should_stop is not None:
            should_stop()
        if not text or has_tool_call(text):
            stats["dropped_tool_calls"] += int(bool(text))
            continue
        trimmed, cut = trim_to_sentences(text, limit)
        stats["trimmed_to_limit"] += int(cut)
        ids = tokenizer(trimmed, add_special_tokens=False)["input_ids"][:max_new_tokens]
        # a response the teacher finished by itself ends the turn the teacher's way (KL on <|im_end|>)
        finished = not cut and len(tokenizer(text, add_special_tokens=False)["input_ids"]) < max_new_tokens
        scored = ids + [eot] if finished else ids
        prompt = with_system(system_prompt, [{"role": "user", "content": query}])
        lp = response_logprobs(teacher, tokenizer, prompt, scored).to(torch.bfloat16).cpu()
        targets.append(DistillTarget(query, trimmed, scored, lp, end_turn=cut))
        stats["kept"] += 1
        if on_progress is not None:
            on_progress(n + 1, len(pairs))
    return targets, stats

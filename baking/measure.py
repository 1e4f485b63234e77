"""Side-by-side latency: the same requests and the same number of new tokens on both sides."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from baking.chat import Message, encode_prompt
from baking.generate import compile_decoding


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@torch.inference_mode()
def latency_ms(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    new_tokens: int,
    warmup: int = 1,
    repeats: int = 1,
) -> dict[str, float]:
    """p50/p95/p99 of single-request generation time, exactly `new_tokens` tokens each."""
    device = next(model.parameters()).device
    prompts = [torch.tensor([encode_prompt(tokenizer, c)], device=device) for c in conversations]
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id or 0,
    }
    for ids in prompts[:warmup]:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    times = []
    for _ in range(repeats):
        for ids in prompts:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return {
        "p50": percentile(times, 0.5),
        "p95": percentile(times, 0.95),
        "p99": percentile(times, 0.99),
        "mean": statistics.fmean(times),
        "n": float(len(times)),
        "new_tokens": float(new_tokens),
        "prompt_tokens_mean": statistics.fmean(p.shape[1] for p in prompts),
    }


def compiled_latency_ms(
    model: Any, tokenizer: Any, conversations: Sequence[Sequence[Message]], *, new_tokens: int
) -> dict[str, float]:
    """`latency_ms` with a static KV cache and a compiled decoding step (`compile_decoding`),
    one cache for the whole request set, timed after one warm-up request, which compiles
    (`compile_s`: that request's seconds). The model's generation config is restored afterwards.
    Raises what compilation raises (no C++ compiler on the box, an unsupported op)."""
    longest = max(len(encode_prompt(tokenizer, c)) for c in conversations)
    saved = copy.deepcopy(model.generation_config)
    # graphs of earlier models (an earlier job in this worker process) would count towards
    # dynamo's recompile limit, past which it runs eagerly without saying so
    torch._dynamo.reset()
    try:
        compile_decoding(model, max_cache_len=longest + new_tokens)
        started = time.perf_counter()
        latency_ms(model, tokenizer, conversations[:1], new_tokens=new_tokens, warmup=0)
        compile_s = time.perf_counter() - started
        return {**latency_ms(model, tokenizer, conversations, new_tokens=new_tokens, warmup=0), "compile_s": compile_s}
    finally:
        model.generation_config = saved
        if hasattr(model, "_compiled_call"):
            del model._compiled_call  # transformers' compiled forward, built for the config just dropped

"""Batched generation (baking.generate): the shared-prefix KV cache changes nothing but speed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from baking.chat import encode_prompt, with_system
from baking.evaluate import user
from baking.generate import PREFIX_CACHE_MIN_TOKENS, common_prefix_length, generate_scored
from baking.load import load_model, load_tokenizer

SYSTEM = (
    "You are Ada, a fleet assistant for automotive engineering. Answer in at most three sentences, "
    "give SI units with every number, and refuse to help disable or bypass vehicle safety systems. "
) * 3


def test_shared_prefix_cache_generates_what_each_prompt_alone_does(tiny_model_dir: Path) -> None:
    import torch

    model, tokenizer = load_model(tiny_model_dir, torch.device("cpu")), load_tokenizer(tiny_model_dir)
    conversations = [
        with_system(SYSTEM, user(q)) for q in ("What is the coolant temperature?", "Hi!", "Convert 65 mph to km/h.")
    ]
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    assert common_prefix_length(prompts) >= PREFIX_CACHE_MIN_TOKENS  # the cached path is the one under test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = generate_scored(model, tokenizer, conversations, max_new_tokens=8)
    alone = [generate_scored(model, tokenizer, [c], max_new_tokens=8)[0] for c in conversations]  # no cache
    for (ids, logprobs, _), (ids_alone, logprobs_alone, _) in zip(batched, alone, strict=True):
        assert ids == ids_alone and len(ids) > 0
        torch.testing.assert_close(
            logprobs.values.float(), logprobs_alone.values.float(), atol=1e-3, rtol=1e-2
        )  # stored in bf16: one step
    # The cache goes in under the name this transformers takes (no deprecated-argument warning).
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_compiled_decoding_generates_what_eager_decoding_does(tiny_model_dir: Path, quantization: str) -> None:
    import torch

    from baking.compress import Candidate, compress
    from baking.generate import STATIC_CACHE_STEP, compile_decoding

    cpu = torch.device("cpu")
    model, tokenizer = load_model(tiny_model_dir, cpu), load_tokenizer(tiny_model_dir)
    if quantization == "int8":  # our integer modules, bf16 activations, under the compiler
        model, _ = compress(model, Candidate("int8", lm_head="int8-tied"), cpu)
    torch._dynamo.reset()
    prompts = [torch.tensor([encode_prompt(tokenizer, user(q))]) for q in ("Hi!", "Convert 65 mph to km/h, please.")]
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        eager = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs) for ids in prompts]
        compile_decoding(model, max_cache_len=STATIC_CACHE_STEP + 1)
        compiled = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs) for ids in prompts]
    assert model.generation_config.max_cache_len == 2 * STATIC_CACHE_STEP  # rounded up to whole steps
    assert hasattr(model, "_compiled_call")  # transformers took the compiled path, on a CPU
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def test_a_stop_predicate_ends_each_conversation_where_it_first_holds(tiny_model_dir: Path) -> None:
    """`stop` cuts a row at the first length where it holds, reported as not finished (the
    stopped row's pad may be the end-of-turn token itself); the log-probs are those of the run
    without it, cut at the same place."""
    import torch

    model, tokenizer = load_model(tiny_model_dir, torch.device("cpu")), load_tokenizer(tiny_model_dir)
    conversations = [user(q) for q in ("What is the coolant temperature?", "Hi!", "Convert 65 mph to km/h.")]
    free = generate_scored(model, tokenizer, conversations, max_new_tokens=12)
    stopped = generate_scored(model, tokenizer, conversations, max_new_tokens=12, stop=lambda ids: len(ids) >= 5)
    assert any(not finished for _, _, finished in stopped)  # the predicate, not the turn, ended some row
    for (ids, logprobs, finished), (ids_free, logprobs_free, finished_free) in zip(stopped, free, strict=True):
        if finished_free and len(ids_free) <= 5:  # the turn ended before the predicate could hold
            assert (ids, finished) == (ids_free, True)
            continue
        assert ids == ids_free[:5] and not finished and len(logprobs) == 5
        torch.testing.assert_close(logprobs.values.float(), logprobs_free.values[:5].float())

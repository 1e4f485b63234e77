"""Batched greedy generation and teacher/student scoring over chat prompts."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from baking.chat import Message, encode_prompt


def end_of_turn_id(tokenizer: Any) -> int:
    ids = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else int(tokenizer.eos_token_id)


def left_pad(batch: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    return ids.to(device), mask.to(device)


PREFIX_CACHE_MIN_TOKENS = 64


def common_prefix_length(prompts: Sequence[list[int]]) -> int:
    if not prompts:
        return 0
    n = min(len(p) for p in prompts) - 1  # leave at least one token to feed
    first = prompts[0]
    for i in range(max(0, n)):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return max(0, n)


def cache_argument(model: Any) -> str:
    """The name under which `model` takes a KV cache: transformers 5 renamed `past_key_values`
    to `cache` (the old name goes in 5.40 for forward, 6.0 for generate; the pin allows both
    majors) and 4.x knows only `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Static KV caches are sized in steps of this many tokens: a cache the length of the longest
# request rounded up, not a fixed ceiling, because on a CPU the compiled decoding step attends
# over every cache slot (ad-hoc, SmolLM2 int8, 2 threads: 634 ms for 32 tokens with a ~64-slot
# cache, 830 ms with 1,024 slots, 805 ms eager).
STATIC_CACHE_STEP = 64


def compile_decoding(model: Any, *, max_cache_len: int) -> None:
    """Make `model.generate` decode over a static KV cache with a torch.compile'd decoding step.

    transformers compiles the decoding step itself when the cache is static, on accelerators
    only; `_compile_all_devices` (private, on `CompileConfig`) extends that to CPUs. The prefill
    stays eager, and the cache is allocated once at `max_cache_len` rounded up to
    STATIC_CACHE_STEP, so requests up to that length share one compiled graph (a longer one
    grows the cache and compiles again). Compilation happens on the first `generate` call.
    """
    from transformers import CompileConfig

    device = next(model.parameters()).device
    config = CompileConfig(fullgraph=True, dynamic=False)
    if device.type != "cuda":
        config.mode = "default"  # CUDA graphs ("reduce-overhead", the default) exist only on CUDA
    config._compile_all_devices = True  # type: ignore[assignment]  # declared None, read as a flag
    steps = -(-max_cache_len // STATIC_CACHE_STEP)
    model.generation_config.cache_implementation = "static"
    model.generation_config.max_cache_len = steps * STATIC_CACHE_STEP
    model.generation_config.compile_config = config


def _batches(
    model: Any, prompts: Sequence[list[int]], batch_size: int, pad: int, device: torch.device
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, Any]]:
    """Plan generation batches: (prompt indices, ids, attention mask, past_key_values or None).

    Prompts that share a long prefix (a system prompt) reuse its KV cache, computed once, and
    are batched by equal length so no padding shifts positions; the teacher's outputs are the
    same as without the cache (checked to 1e-4 in the logits). Other prompts are left-padded.
    """
    from transformers import DynamicCache

    prefix = common_prefix_length(prompts)
    if prefix >= PREFIX_CACHE_MIN_TOKENS and len(prompts) > 1:
        cache = DynamicCache(config=model.config)
        model(
            input_ids=torch.tensor([prompts[0][:prefix]], device=device),
            use_cache=True,
            **{cache_argument(model): cache},
        )
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), batch_size):
                idx = group[start : start + batch_size]
                past = copy.deepcopy(cache)
                if len(idx) > 1:
                    past.batch_repeat_interleave(len(idx))
                ids = torch.tensor([prompts[i] for i in idx], device=device)
                yield idx, ids, torch.ones_like(ids), past
        return
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, device)
        yield idx, ids, mask, None


def _generation_kwargs(
    model: Any, max_new_tokens: int, eot: int, pad: int, past: Any, do_sample: bool, temperature: float, seed: int
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eot,
        "pad_token_id": pad,
        "do_sample": do_sample,
    }
    if past is not None:
        kwargs[cache_argument(model)] = past
    if do_sample:
        torch.manual_seed(seed)
        kwargs.update(temperature=temperature, top_p=0.95, top_k=0)
    else:  # unset the checkpoint's sampling defaults so greedy decoding raises no warnings
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The assistant's next turn for each conversation, greedy unless `do_sample`."""
    device = next(model.parameters()).device
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    out: list[str] = [""] * len(prompts)
    done = 0
    for n, (idx, ids, mask, past) in enumerate(_batches(model, prompts, batch_size, pad, device)):
        kwargs = _generation_kwargs(model, max_new_tokens, eot, pad, past, do_sample, temperature, seed + n)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1] :].tolist()
            if eot in new:
                new = new[: new.index(eot)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        done += len(idx)
        if on_batch is not None:
            on_batch(done, len(prompts))
    return out


@torch.inference_mode()
def response_logprobs(model: Any, tokenizer: Any, prompt: Sequence[Message], response_ids: list[int]) -> torch.Tensor:
    """log-softmax over the full vocabulary at each response position, [len(response_ids), V] (fp32)."""
    device = next(model.parameters()).device
    prefix = encode_prompt(tokenizer, prompt)
    ids = torch.tensor([prefix + response_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prefix) - 1 : len(prefix) - 1 + len(response_ids)]
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class TopLogprobs:
    """Per position, the log-probs of a distribution's k most likely tokens; the rest of the
    vocabulary is left as one bucket of mass 1 - sum(exp(values)). With `ids` None, `values`
    is the whole vocabulary's log-probs (in bf16) and there is no bucket.

    A distillation target kept whole costs the vocabulary size per token (49152 on SmolLM2:
    96 KiB in bf16; the fleet job's 144 teacher answers of 64 tokens took 798 MiB), and grows
    with every persona query and sample; k tokens cost 8k bytes (benchmarks/distill_topk.py
    measures what the rest of the vocabulary carries)."""

    ids: torch.Tensor | None  # [n, k] int32 token ids, most likely first; None: every token
    values: torch.Tensor  # [n, k] float32 log-probs, or [n, V] bf16 when ids is None

    @staticmethod
    def of(logprobs: torch.Tensor, k: int) -> TopLogprobs:
        """The top `k` of log-probs [n, V]; k = 0 keeps them all."""
        if k == 0:
            return TopLogprobs(None, logprobs.to(torch.bfloat16).cpu())
        values, ids = logprobs.float().topk(min(k, logprobs.shape[-1]), dim=-1)
        return TopLogprobs(ids.to(torch.int32).cpu(), values.cpu())

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def head(self, n: int) -> TopLogprobs:
        return TopLogprobs(None if self.ids is None else self.ids[:n], self.values[:n])

    @property
    def nbytes(self) -> int:
        return (0 if self.ids is None else self.ids.nbytes) + self.values.nbytes


@torch.inference_mode()
def generate_scored(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int,
    top_k: int = 0,
    batch_size: int = 16,
    do_sample: bool = False,
    seed: int = 0,
    temperature: float = 0.7,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[tuple[list[int], TopLogprobs, bool]]:
    """Generate and keep the model's own log-probs at every generated position: each position's
    `top_k` most likely tokens, or with `top_k` 0 the whole vocabulary in bf16.

    Returns (token ids, their `TopLogprobs`, finished) per conversation; when the model ended its
    turn, the end-of-turn token is the last id. Scoring during generation saves a second forward
    pass over the (long, prompted) teacher context, and each batch's full log-probs are dropped
    as soon as it is done, so with a top k, memory grows by 8 * top_k bytes a token.
    `stop(new_ids)` ends a conversation's generation early once it holds (its ids end there, not
    finished), so a batch stops when each of its conversations has ended or stopped.
    """
    device = next(model.parameters()).device
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    out: list[tuple[list[int], TopLogprobs, bool] | None] = [None] * len(prompts)
    for n, (idx, ids, mask, past) in enumerate(_batches(model, prompts, batch_size, pad, device)):
        kwargs = _generation_kwargs(model, max_new_tokens, eot, pad, past, do_sample, temperature, seed + n)
        if stop is not None:
            kwargs["stopping_criteria"] = [_StopWhen(stop, ids.shape[1])]
        result = model.generate(
            input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **kwargs
        )
        steps = torch.stack(result.logits, dim=1)  # [B, steps, V]
        for row, i in enumerate(idx):
            new = result.sequences[row, ids.shape[1] :].tolist()
            stopped = _first_stop(stop, new, eot) if stop is not None else None
            if stopped is not None:
                keep, finished = stopped, False
            else:
                finished = eot in new
                keep = new.index(eot) + 1 if finished else len(new)
            logprobs = torch.log_softmax(steps[row, :keep].float(), dim=-1)
            out[i] = (new[:keep], TopLogprobs.of(logprobs, top_k), finished)
    return cast(list[tuple[list[int], TopLogprobs, bool]], out)  # every prompt is in exactly one batch


class _StopWhen:
    """A transformers stopping criterion: per row, whether `stop` holds for its new tokens."""

    def __init__(self, stop: Callable[[list[int]], bool], prompt_length: int) -> None:
        self.stop = stop
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        rows = [bool(self.stop(row[self.prompt_length :].tolist())) for row in input_ids]
        return torch.tensor(rows, dtype=torch.bool, device=input_ids.device)


def _first_stop(stop: Callable[[list[int]], bool], new: list[int], eot: int) -> int | None:
    """How many of `new` to keep when `stop` ended the row before its end of turn, else None.
    (A stopped row is padded after it, and the pad may be the end-of-turn token itself.)"""
    end = new.index(eot) if eot in new else len(new)
    for k in range(1, end + 1):
        if stop(new[:k]):
            return k
    return None

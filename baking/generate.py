"""Batched greedy generation and teacher/student scoring over chat prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_replies(model: Any, tokenizer: Any, conversations: Sequence[Sequence[Message]], *,
                     max_new_tokens: int, batch_size: int = 16, do_sample: bool = False,
                     temperature: float = 0.7, seed: int = 0,
                     on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """The assistant's next turn for each conversation, greedy unless `do_sample`."""
    device = next(model.parameters()).device
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    # sort by length so a batch pads little; restore order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    generator_seed = seed
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": eot, "pad_token_id": pad,
                                  "do_sample": do_sample}
        if do_sample:
            torch.manual_seed(generator_seed)
            generator_seed += 1
            kwargs.update(temperature=temperature, top_p=0.95, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1]:].tolist()
            if eot in new:
                new = new[:new.index(eot)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return out


@torch.inference_mode()
def response_logprobs(model: Any, tokenizer: Any, prompt: Sequence[Message], response_ids: list[int]) -> torch.Tensor:
    """log-softmax over the full vocabulary at each response position, [len(response_ids), V] (fp32)."""
    device = next(model.parameters()).device
    prefix = encode_prompt(tokenizer, prompt)
    ids = torch.tensor([prefix + response_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prefix) - 1:len(prefix) - 1 + len(response_ids)]
    return torch.log_softmax(logits.float(), dim=-1)

"""Distillation recovery: a short run pulling a pruned student back towards the baked model.

The teacher is the uncompressed baked model; the loss is full-vocabulary KL(teacher || student)
at every position of the given token sequences: the job's training conversations rendered with
the chat template, plus general text, so the student recovers the baked behaviour without
forgetting plain language modelling. Teacher logits are computed on the fly (no_grad) rather
than stored: [tokens, 49152] float logits for a few thousand tokens would be gigabytes.

Recovery trains the decoder blocks only, at full rank, and re-applies the pruning masks after
every optimizer step, so pruned weights stay exactly zero. Not LoRA: merging a low-rank update
would write a dense delta over the pruned weights. Not the embeddings (tied to lm_head in
SmolLM2): they were not pruned, and leaving them out saves a fifth of the optimizer state.

Recovery runs on the float model, before quantization: pulling an int8/int4 model back would
need quantization-aware training (straight-through estimates of the rounding), which this is not.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from baking import data as bdata
from baking.chat import encode_prompt, render
from baking.prune import apply_masks_, decoder_blocks, mask_gradients_
from baking.train import TrainItem, TrainReport, _micro_batches, autocast_for

# General text for recovery. The tail (HELDOUT_TEXT_TOKENS) is never trained on: the pipeline
# measures KL before/after on it, and benchmarks/compress.py measures fidelity on it.
GENERAL_TEXT = Path(__file__).resolve().parents[1] / "examples" / "vehicle_manual.md"
HELDOUT_TEXT_TOKENS = 512
# Optimizer steps per profile. Measured on SmolLM2-135M: about 16 s a step on one (shared) CPU
# thread, batch 8; 5 steps took held-out KL to the teacher from 1.75 to 1.28 after wanda 2:4.
RECOVERY_STEPS = {"quick": 30, "standard": 100, "thorough": 300}


@dataclass(frozen=True)
class RecoveryConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per step
    learning_rate: float = 1e-4  # peak, cosine decay after 10% warm-up (as baking.train)
    seed: int = 0
    max_length: int = 256  # longer sequences are cut from the right
    micro_batch_tokens: int = 1024  # padded tokens per forward; bounds the [tokens, vocab] logits

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("recovery steps and batch_size must be >= 1")
        if not 0 < self.learning_rate <= 1:
            raise ValueError("recovery learning_rate must be in (0, 1]")
        if self.max_length < 2 or self.micro_batch_tokens < self.max_length:
            raise ValueError("recovery max_length must be >= 2 and <= micro_batch_tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- data


@dataclass
class RecoveryData:
    sequences: list[list[int]]  # what recovery trains on
    calibration: list[list[int]]  # what wanda gathers activation norms on (spread over `sequences`)
    heldout: list[list[int]]  # general text never trained on, for KL before/after
    sources: dict[str, Any] = field(default_factory=dict)  # JSON-safe counts and provenance


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """Up to n items, evenly spaced, so every kind in an ordered list is represented."""
    if n <= 0 or not items:
        return []
    step = max(1, len(items) // n)
    return list(items[::step][:n])


def job_conversations(tokenizer: Any, split: bdata.Split) -> list[list[int]]:
    """The job's training conversations with the chat template: full tool conversations (call,
    result, answer), persona demonstrations, and the prompts of persona and irrelevant queries
    (whose next-token distribution at the assistant header is what the baked model answers from)."""

    def ids(messages: Sequence[bdata.Message]) -> list[int]:
        return list(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])

    out = [ids(bdata.tool_conversation(c)[0]) for c in split.train_tools]
    out += [ids(bdata.demonstration(e)[0]) for e in split.train_persona_examples]
    out += [
        encode_prompt(tokenizer, [{"role": "user", "content": q}])
        for q in list(split.train_persona_queries) + list(split.train_irrelevant)
    ]
    return out


def text_chunks(ids: Sequence[int], length: int) -> list[list[int]]:
    return [list(ids[i : i + length]) for i in range(0, len(ids) - 1, length) if len(ids[i : i + length]) > 1]


def recovery_data(
    tokenizer: Any,
    split: bdata.Split,
    *,
    general_text: Path | None = GENERAL_TEXT,
    max_conversations: int = 64,
    chunk_tokens: int = 128,
    heldout_tokens: int = HELDOUT_TEXT_TOKENS,
    calibration_sequences: int = 32,
) -> RecoveryData:
    """Conversations (evenly spread, at most `max_conversations`) plus general text in chunks;
    its last `heldout_tokens` tokens are held out. A missing text file (an installed package
    without examples/) leaves conversations only, and says so in `sources`."""
    conversations = spread(job_conversations(tokenizer, split), max_conversations)
    general: list[list[int]] = []
    heldout: list[list[int]] = []
    sources: dict[str, Any] = {"conversations": len(conversations), "general_text": None}
    if general_text is not None and general_text.is_file():
        raw = general_text.read_bytes()
        text_ids = tokenizer(raw.decode(), add_special_tokens=False)["input_ids"]
        cut = max(0, len(text_ids) - heldout_tokens)
        general = text_chunks(text_ids[:cut], chunk_tokens)
        heldout = text_chunks(text_ids[cut:], chunk_tokens)
        sources["general_text"] = {
            "file": general_text.name,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "train_chunks": len(general),
            "heldout_tokens": len(text_ids) - cut,
        }
    sequences = conversations + general
    return RecoveryData(sequences, spread(sequences, calibration_sequences), heldout, sources)


# ---------------------------------------------------------------- loss


def _pad(batch: Sequence[Sequence[int]], max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = min(max_length, max(len(s) for s in batch))
    ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad id is irrelevant: masked out
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for b, seq in enumerate(batch):
        n = min(width, len(seq))
        ids[b, :n] = torch.tensor(list(seq[:n]))
        attn[b, :n] = 1
    return ids.to(device), attn.to(device)


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Sum over real (non-pad) positions of full-vocabulary KL(teacher || student), in float32."""
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = (t.exp() * (t - s)).sum(dim=-1)
    return (per_position * attn).sum()


@torch.no_grad()
def mean_kl(
    student: Any, teacher: Any, sequences: Sequence[Sequence[int]], *, max_length: int = 256, micro_batch: int = 4
) -> float:
    """Mean per-token KL(teacher || student) over `sequences` (every position), at full precision."""
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(sequences), micro_batch):
        ids, attn = _pad(sequences[i : i + micro_batch], max_length, device)
        t = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits
        s = student(input_ids=ids, attention_mask=attn, use_cache=False).logits
        total += float(kl_sum(t, s, attn))
        count += int(attn.sum())
    return total / count if count else float("nan")


# ---------------------------------------------------------------- training


class _Cycle:
    """Seeded shuffled passes over the sequences, one pass after another."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def draw(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


def recover(
    student: Any,
    teacher: Any,
    sequences: Sequence[Sequence[int]],
    config: RecoveryConfig,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> TrainReport:
    """Train `student` in place towards `teacher`; `report.kl` is the mean KL per token of each step.

    `masks` (from `baking.prune.prune_`) are re-applied after every optimizer step, and the
    pruned weights' gradients are zeroed before clipping.
    """
    from transformers import get_cosine_schedule_with_warmup

    items = [TrainItem(list(s[: config.max_length]), []) for s in sequences if len(s) >= 2]
    if not items:
        raise ValueError("nothing to recover on: no sequence of 2 or more tokens")
    torch.manual_seed(config.seed)
    device = next(student.parameters()).device
    teacher.eval()
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    use_cache = student.config.use_cache
    student.config.use_cache = False
    student.requires_grad_(False)
    _, blocks = decoder_blocks(student)
    blocks.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, config.steps // 10), config.steps)
    cycle = _Cycle(len(items), config.seed)
    report = TrainReport([], [], [], sum(p.numel() for p in params), 0.0)
    started = time.monotonic()
    student.train()
    try:
        for step in range(1, config.steps + 1):
            if should_stop is not None:
                should_stop()
            batch = [items[i] for i in cycle.draw(config.batch_size)]
            tokens = sum(len(i.input_ids) for i in batch)  # each token weighs the same in the step's mean
            optimizer.zero_grad(set_to_none=True)
            value = 0.0
            for micro in _micro_batches(batch, config.micro_batch_tokens, config.max_length):
                ids, attn = _pad([i.input_ids for i in micro], config.max_length, device)
                with torch.no_grad(), autocast_for(device):
                    t_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits
                with autocast_for(device):
                    s_logits = student(input_ids=ids, attention_mask=attn).logits
                loss = kl_sum(t_logits, s_logits, attn) / tokens
                loss.backward()
                value += float(loss.detach())
            if masks:
                mask_gradients_(student, masks)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if masks:
                apply_masks_(student, masks)
            if not math.isfinite(value):
                raise FloatingPointError(f"recovery KL is {value} at step {step}")
            report.losses.append(value)
            report.kl.append(value)
            if on_step is not None:
                on_step(step, config.steps, {"kl": value, "lr": scheduler.get_last_lr()[0]})
    finally:
        student.eval()
        student.config.use_cache = use_cache
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
    report.seconds = time.monotonic() - started
    return report

"""One joint objective: cross-entropy on tool calls and demonstrations + KL to the prompted teacher.

Tool targets are exact (the user's examples), so they are learned by supervised fine-tuning on
assistant tokens only; the persona is distilled by KL(teacher || student) on the teacher's own
responses, over the teacher's top-k tokens and one bucket for the rest of the vocabulary
(`top_k_kl`; k = 0, the whole vocabulary). Training both in one run keeps either from erasing the other (we
measured sequential runs drifting the tool format while distilling the persona).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from baking.chat import Message, encode_conversation, encode_prompt, with_system
from baking.generate import TopLogprobs
from baking.persona import DistillTarget

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainItem:
    input_ids: list[int]
    ce_mask: list[bool]  # True where token t is a cross-entropy target
    kl_start: int | None = None  # index of the first teacher-scored token
    teacher_logprobs: TopLogprobs | None = None  # the teacher's top-k log-probs at kl_start onwards
    # Items made from one source (a written example and its variants, one augmentation template's
    # instances) share a group; a pool draws every group once before any group twice ("": its own).
    group: str = ""


def sft_item(
    tokenizer: Any,
    messages: Sequence[Message],
    train_turns: Sequence[int],
    *,
    system: str | None = None,
    group: str = "",
) -> TrainItem:
    """Cross-entropy on the listed assistant turns; `system` puts a system turn before them."""
    if system:
        messages = with_system(system, messages)
        train_turns = [t + 1 for t in train_turns]
    enc = encode_conversation(tokenizer, messages, train_turns=train_turns)
    return TrainItem(enc.input_ids, enc.target_mask, group=group)


def distill_item(tokenizer: Any, target: DistillTarget, eot: int, *, system: str | None = None) -> TrainItem:
    prefix = encode_prompt(tokenizer, with_system(system, [{"role": "user", "content": target.query}]))
    ids = prefix + list(target.response_ids)
    mask = [False] * len(ids)
    if target.end_turn:  # the turn ends where the guideline says: supervise <|im_end|> directly
        ids.append(eot)
        mask.append(True)
    return TrainItem(ids, mask, kl_start=len(prefix), teacher_logprobs=target.teacher_logprobs)


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimizer steps
    batch_size: int  # items per step
    learning_rate: float  # peak, cosine decay after 10% warm-up
    method: str = "lora"  # lora | full
    lora_rank: int = 16
    kl_weight: float = 1.0  # weight of the distillation term beside cross-entropy
    seed: int = 0
    max_length: int = 384  # longer items are cut from the right
    # share of batch items per pool; "answers" are full tool conversations (call, result, answer).
    # The pipeline splits "tools" into one pool per tool ("tools/NAME").
    mix: dict[str, float] = field(default_factory=lambda: TrainConfig.default_mix())
    micro_batch_tokens: int = 1024  # items are sorted by length and packed into micro-batches of this size
    # NEFTune (Jain et al. 2023, arXiv 2310.05914): uniform noise of scale alpha / sqrt(length * dim)
    # on the input embeddings while training; 0 turns it off.
    embedding_noise: float = 0.0

    @staticmethod
    def default_mix() -> dict[str, float]:
        # At 0.42 / 0.25 a standard bake (400 x 8 items) drew each of the fleet job's 128
        # demonstrations six times and fewer than two in three of its calculator cases once;
        # this share measured better on held-out tool calls with the same persona figures, and
        # moving further (0.62 / 0.12) did not (README, Measured).
        return {"tools": 0.55, "answers": 0.03, "demos": 0.15, "distill": 0.27}

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.method not in ("lora", "full"):
            raise ValueError("method must be lora or full")
        if not 0 < self.learning_rate <= 1:
            raise ValueError("learning_rate must be in (0, 1]")
        if self.embedding_noise < 0:
            raise ValueError("embedding_noise must be >= 0")


@dataclass
class TrainReport:
    losses: list[float]
    ce: list[float]
    kl: list[float]
    trainable_parameters: int
    seconds: float

    @property
    def first_loss(self) -> float:
        head = self.losses[: max(1, len(self.losses) // 10)]
        return sum(head) / len(head)

    @property
    def last_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA and on CPUs with native bf16; otherwise fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def wrap_for_training(model: Any, config: TrainConfig) -> Any:
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _noisy_embeddings(alpha: float) -> Callable[[Any, Any, torch.Tensor], torch.Tensor]:
    """A forward hook adding NEFTune's noise to the embedding output, in training mode only."""

    def hook(module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


def merge(model: Any) -> Any:
    """LoRA folded into the base weights: a plain transformers model again."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def coverage_order(items: Sequence[TrainItem], rng: random.Random) -> list[int]:
    """One pass over `items` as indices to pop() from the end: every group's first item (in a
    shuffled order), then every group's second, and so on.

    A bake draws far fewer items than a pool holds (a quick bake about a third of the fleet job's
    calculator pool, most of it augmentation), so a plain shuffle leaves it to chance which
    written examples and which templates the model sees at all; this order spends the budget on
    breadth first: at two quick seeds the fleet job's probe calls went from 196 to 220 of 264
    (the calculator's 54 -> 75 of 88; README, Measured). With no groups set it is a plain shuffle."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group or f"#{i}", []).append(i)
    members = list(groups.values())
    for group in members:
        rng.shuffle(group)
    rounds = []
    for r in range(max((len(g) for g in members), default=0)):
        this_round = [g[r] for g in members if len(g) > r]
        rng.shuffle(this_round)
        rounds.append(this_round)
    return [i for this_round in reversed(rounds) for i in this_round]


class _Mixer:
    """Draws batch items from the pools by weight, cycling each pool in a seeded order that
    covers every group before repeating one (`coverage_order`)."""

    def __init__(self, pools: dict[str, list[TrainItem]], weights: dict[str, float], seed: int) -> None:
        self.rng = random.Random(seed)
        self.pools = {k: v for k, v in pools.items() if v}
        self.weights = {k: weights.get(k, 0.0) for k in self.pools}
        if not self.pools or sum(self.weights.values()) <= 0:
            raise ValueError("nothing to train on")
        self.order = {k: [] for k in self.pools}  # type: dict[str, list[int]]

    def draw(self, n: int) -> list[TrainItem]:
        names = list(self.pools)
        picks = self.rng.choices(names, weights=[self.weights[k] for k in names], k=n)
        out = []
        for name in picks:
            if not self.order[name]:
                self.order[name] = coverage_order(self.pools[name], self.rng)
            out.append(self.pools[name][self.order[name].pop()])
        return out


def _micro_batches(items: Sequence[TrainItem], budget: int, max_length: int) -> list[list[TrainItem]]:
    """Sort by length and cut into micro-batches whose padded size stays within `budget` tokens.

    On CPU the cost is the padded token count: one long tool conversation in a batch of short
    calls would otherwise multiply the whole step's work.
    """
    ordered = sorted(items, key=lambda i: len(i.input_ids))
    out: list[list[TrainItem]] = []
    current: list[TrainItem] = []
    for item in ordered:
        width = min(max_length, len(item.input_ids))
        if current and width * (len(current) + 1) > budget:
            out.append(current)
            current = []
        current.append(item)
    if current:
        out.append(current)
    return out


def top_k_kl(teacher: TopLogprobs, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position [n], over the teacher's top-k tokens and one bucket
    holding the rest of the vocabulary, from the student's full log-probs [n, V].

    This is the KL of both distributions coarsened to k + 1 outcomes: never above the full KL,
    equal to it when the teacher keeps every token, and off only by how differently the two
    spread the bucket's small mass over its tokens."""
    t = teacher.values.to(device=student.device, dtype=torch.float32)
    if teacher.ids is None:  # the whole vocabulary
        return (t.exp() * (t - student)).sum(-1)
    ids = teacher.ids.to(device=student.device, dtype=torch.long)
    kl = (t.exp() * (t - student.gather(-1, ids))).sum(-1)
    if ids.shape[-1] >= student.shape[-1]:
        return kl  # no bucket: the teacher kept the whole vocabulary
    teacher_rest = (1 - t.exp().sum(-1)).clamp_min(0)
    student_rest = student.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return kl + torch.xlogy(teacher_rest, teacher_rest) - teacher_rest * student_rest


def _batch_loss(
    model: Any, items: Sequence[TrainItem], pad_id: int, device: torch.device, max_length: int, kl_weight: float
) -> tuple[torch.Tensor, float, float]:
    width = min(max_length, max(len(i.input_ids) for i in items))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    ce_targets = torch.full((len(items), width), -100, dtype=torch.long)
    for b, item in enumerate(items):
        n = min(width, len(item.input_ids))
        ids[b, :n] = torch.tensor(item.input_ids[:n])
        attn[b, :n] = 1
        for t in range(1, n):
            if item.ce_mask[t]:
                ce_targets[b, t] = item.input_ids[t]
    ids, attn, ce_targets = ids.to(device), attn.to(device), ce_targets.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    shifted = logits[:, :-1]
    ce_labels = ce_targets[:, 1:]
    n_ce = int((ce_labels != -100).sum())
    ce = (
        (
            torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]), ce_labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            / max(1, n_ce)
        )
        if n_ce
        else None
    )
    kl_sum = torch.zeros((), device=device)
    n_kl = 0
    for b, item in enumerate(items):
        if item.kl_start is None or item.teacher_logprobs is None:
            continue
        start = item.kl_start
        n = min(len(item.teacher_logprobs), width - start)
        if n <= 0:
            continue
        student = torch.log_softmax(logits[b, start - 1 : start - 1 + n], dim=-1)
        kl_sum = kl_sum + top_k_kl(item.teacher_logprobs.head(n), student).sum()
        n_kl += n
    kl = kl_sum / n_kl if n_kl else None
    parts = [p for p in (ce, None if kl is None else kl_weight * kl) if p is not None]
    loss = sum(parts[1:], parts[0])
    return loss, float(ce.detach()) if ce is not None else 0.0, float(kl.detach()) if kl is not None else 0.0


def train(
    model: Any,
    tokenizer: Any,
    pools: dict[str, list[TrainItem]],
    config: TrainConfig,
    *,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> tuple[Any, TrainReport]:
    """Train in place and return (model with merged weights, report)."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    model.config.use_cache = False
    wrapped = wrap_for_training(model, config)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, config.steps // 10), config.steps)
    mixer = _Mixer(pools, config.mix, config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    report = TrainReport([], [], [], sum(p.numel() for p in params), 0.0)
    noise = (
        wrapped.get_input_embeddings().register_forward_hook(_noisy_embeddings(config.embedding_noise))
        if config.embedding_noise
        else None
    )
    started = time.monotonic()
    for step in range(1, config.steps + 1):
        if should_stop is not None:
            should_stop()
        items = mixer.draw(config.batch_size)
        optimizer.zero_grad(set_to_none=True)
        value, ce, kl = 0.0, 0.0, 0.0
        for micro in _micro_batches(items, config.micro_batch_tokens, config.max_length):
            share = len(micro) / len(items)  # gradient accumulation weighted by items
            with autocast_for(device):
                loss, m_ce, m_kl = _batch_loss(wrapped, micro, pad, device, config.max_length, config.kl_weight)
            (loss * share).backward()
            value += float(loss.detach()) * share
            ce += m_ce * share
            kl += m_kl * share
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}")
        report.losses.append(value)
        report.ce.append(ce)
        report.kl.append(kl)
        if on_step is not None:
            on_step(step, config.steps, {"loss": value, "ce": ce, "kl": kl, "lr": scheduler.get_last_lr()[0]})
    report.seconds = time.monotonic() - started
    if noise is not None:
        noise.remove()
    wrapped.eval()
    merged = merge(wrapped)
    merged.config.use_cache = True
    return merged, report

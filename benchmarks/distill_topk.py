"""What keeping only the teacher's top-k tokens costs distillation, on the real teacher's answers.

    .venv/bin/python benchmarks/distill_topk.py [--job examples/fleet-assistant.yaml] [--ks 16,64,256,1024,4096]

The teacher is the reference model with the job's full system prompt, answering the job's
training persona and irrelevant queries (its split and augmentation, as a bake draws them),
greedy, `--max-new-tokens` tokens each. The student is the same model without the prompt: where
every bake starts. For each k the table gives

- the teacher's probability mass held by its top k tokens (mean, and the 1st percentile of positions);
- the top-k KL (`baking.train.top_k_kl`: k tokens and one bucket for the rest) as a share of the
  full-vocabulary KL, summed over all answer positions;
- the cosine between the two KLs' gradients over every model parameter (`--grad-answers`
  answers), and its norm against the full KL's: 1.0 and 1.0 mean a training step moves the
  weights the same way and as far;
- the memory the job's distillation targets take (bf16 over the whole vocabulary before, 8
  bytes per kept token now).

Writes nothing; prints one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking import data as bdata  # noqa: E402
from baking.chat import encode_prompt, render_system_prompt, with_system  # noqa: E402
from baking.evaluate import user  # noqa: E402
from baking.fetch import resolve_model_dir  # noqa: E402
from baking.generate import TopLogprobs, generate_scored  # noqa: E402
from baking.load import configure_threads, load_model, load_tokenizer  # noqa: E402
from baking.spec import BakeSpec  # noqa: E402
from baking.train import top_k_kl  # noqa: E402
from core.settings import get_settings  # noqa: E402


def full_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (teacher.exp() * (teacher - student)).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=ROOT / "examples" / "fleet-assistant.yaml")
    parser.add_argument("--ks", default="16,64,256,1024,4096")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--grad-answers", type=int, default=24)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    configure_threads()
    torch.manual_seed(0)

    spec = BakeSpec.from_dict(yaml.safe_load(args.job.read_text()))
    model_dir = resolve_model_dir(spec.model, get_settings().models_dir)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, torch.device("cpu"))
    split = bdata.augment(bdata.split_spec(spec), spec)
    queries = list(split.train_persona_queries) + list(split.train_irrelevant)
    system = render_system_prompt(spec.persona, spec.tools)

    started = time.monotonic()
    scored = generate_scored(
        model, tokenizer, [with_system(system, user(q)) for q in queries], max_new_tokens=args.max_new_tokens
    )
    answers = [(q, ids, lp.values.float()) for q, (ids, lp, _) in zip(queries, scored, strict=True) if ids]
    tokens = sum(len(ids) for _, ids, _ in answers)
    print(f"teacher: {len(answers)} answers, {tokens} tokens, {time.monotonic() - started:.0f} s")

    with torch.no_grad():
        students = [student_logprobs(model, tokenizer, q, ids) for q, ids, _ in answers]
    teacher_all = torch.cat([t for _, _, t in answers])
    student_all = torch.cat(students)
    positions, vocab = teacher_all.shape
    full = full_kl(teacher_all, student_all)

    # gradients over every parameter, for the first answers, through the student without its prompt
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)

    def gradient(kl_of: str | int) -> torch.Tensor:
        total = torch.zeros(())
        for q, ids, teacher in answers[: args.grad_answers]:
            student = student_logprobs(model, tokenizer, q, ids)
            if kl_of == "full":
                total = total + full_kl(teacher, student).sum()
            else:
                total = total + top_k_kl(TopLogprobs.of(teacher, int(kl_of)), student).sum()
        grads = torch.autograd.grad(total, params)
        return torch.cat([g.reshape(-1) for g in grads])

    full_grad = gradient("full")
    dense_mb = positions * vocab * 2 / 2**20
    print(f"\n{positions} positions, vocabulary {vocab}; full-vocabulary targets in bf16: {dense_mb:.0f} MiB\n")
    print("| k | teacher mass kept: mean / 1st pct | top-k KL / full KL | gradient cosine / norm ratio | targets MiB |")
    print("| --- | --- | --- | --- | --- |")
    for k in ks:
        top = TopLogprobs.of(teacher_all, k)
        mass = top.values.exp().sum(-1)
        ratio = float(top_k_kl(top, student_all).sum() / full.sum())
        g = gradient(k)
        g64, full64 = g.double(), full_grad.double()  # 135 M terms: float32 sums drift past 1.0
        cosine = float(g64 @ full64 / (g64.norm() * full64.norm()))
        norm_ratio = float(g64.norm() / full64.norm())
        mb = positions * k * 8 / 2**20
        kept = f"{float(mass.mean()):.4f} / {float(mass.quantile(0.01)):.4f}"
        print(f"| {k} | {kept} | {ratio:.4f} | {cosine:.5f} / {norm_ratio:.3f} | {mb:.1f} |")


def student_logprobs(model: Any, tokenizer: Any, query: str, ids: list[int]) -> torch.Tensor:
    """The model's log-probs [len(ids), V] at the answer's positions, with no system prompt.
    (`baking.generate.response_logprobs` runs under inference mode, and the gradient is needed.)"""
    prefix = encode_prompt(tokenizer, user(query))
    logits = model(input_ids=torch.tensor([prefix + ids])).logits[0, len(prefix) - 1 : len(prefix) - 1 + len(ids)]
    return torch.log_softmax(logits.float(), dim=-1)


if __name__ == "__main__":
    main()

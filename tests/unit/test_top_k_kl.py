"""Distillation on the teacher's top-k tokens (baking.train.top_k_kl, baking.generate.TopLogprobs)."""

from __future__ import annotations

import torch

from baking.generate import TopLogprobs
from baking.train import top_k_kl


def _full_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (teacher.exp() * (teacher - student)).sum(-1)


def _pair(vocab: int = 50, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a peaked teacher, like a language model's next-token distribution, and a student near it
    teacher = torch.log_softmax(3 * torch.randn(n, vocab, generator=g), dim=-1)
    student = torch.log_softmax(teacher + 0.5 * torch.randn(n, vocab, generator=g), dim=-1)
    return teacher, student


def test_top_logprobs_keep_the_most_likely_tokens_in_order() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), dim=-1)
    top = TopLogprobs.of(logprobs, 2)
    assert top.ids.tolist() == [[1, 3]] and top.ids.dtype == torch.int32
    torch.testing.assert_close(top.values, logprobs[:, [1, 3]])
    assert top.nbytes == 2 * 4 + 2 * 4  # int32 ids, float32 log-probs
    assert len(TopLogprobs.of(logprobs, 99)) == 1 and TopLogprobs.of(logprobs, 99).ids.shape[-1] == 4


def test_with_the_whole_vocabulary_kept_it_is_the_full_kl() -> None:
    teacher, student = _pair()
    torch.testing.assert_close(top_k_kl(TopLogprobs.of(teacher, 50), student), _full_kl(teacher, student))


def test_top_k_zero_keeps_the_whole_vocabulary_in_bf16_and_gives_the_full_kl() -> None:
    teacher, student = _pair()
    whole = TopLogprobs.of(teacher, 0)
    assert whole.ids is None and whole.values.dtype == torch.bfloat16 and whole.nbytes == 6 * 50 * 2
    assert len(whole.head(4)) == 4
    expected = _full_kl(whole.values.float(), student)
    torch.testing.assert_close(top_k_kl(whole, student), expected)


def test_with_a_bucket_it_bounds_the_full_kl_from_below_and_tightens_with_k() -> None:
    teacher, student = _pair()
    full = _full_kl(teacher, student)
    previous = torch.zeros_like(full)
    for k in (1, 5, 20, 49):
        kl = top_k_kl(TopLogprobs.of(teacher, k), student)
        assert bool((kl >= -1e-6).all()) and bool((kl <= full + 1e-5).all()), k
        assert bool((kl >= previous - 1e-5).all()), k  # coarser buckets lose information
        previous = kl
    torch.testing.assert_close(previous, full, atol=1e-3, rtol=1e-2)


def test_it_is_exact_when_the_student_spreads_the_bucket_as_the_teacher_does() -> None:
    teacher, student = _pair()
    top = TopLogprobs.of(teacher, 5)
    # the student differs from the teacher on the top-5 tokens and in the bucket's total mass,
    # but not in how it spreads that mass: the coarsened KL is then the whole KL
    rest = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, top.ids.long(), False)
    shifted = torch.where(rest, teacher - 0.7, student)
    shifted = torch.log_softmax(shifted, dim=-1)
    torch.testing.assert_close(top_k_kl(top, shifted), _full_kl(teacher, shifted))


def test_it_is_zero_at_the_teacher_and_its_gradient_leads_there() -> None:
    teacher, student = _pair()
    top = TopLogprobs.of(teacher, 8)
    torch.testing.assert_close(top_k_kl(top, teacher), torch.zeros(teacher.shape[0]), atol=1e-6, rtol=0)
    logits = student.clone().requires_grad_(True)
    start = top_k_kl(top, torch.log_softmax(logits, dim=-1)).sum()
    start.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    after = top_k_kl(top, torch.log_softmax(stepped, dim=-1)).sum()
    assert float(after) < float(start.detach())

"""Training on a tiny random model: parameters change, the loss falls, LoRA merges exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from baking.chat import CHAT_TEMPLATE, encode_conversation, render, template_default_system, with_system
from baking.data import ToolCase, tool_conversation
from baking.generate import TopLogprobs, end_of_turn_id, generate_scored
from baking.load import load_model, load_tokenizer
from baking.persona import DistillTarget
from baking.train import TrainConfig, distill_item, sft_item, train, wrap_for_training

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny(tiny_model_dir: Path):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.device("cpu"))
    return model, tok


def _pools(tok):
    cases = [ToolCase("get_signal", f"What is the {w}?", {"signal": w}) for w in ("speed", "fuel", "odometer")]
    return {"tools": [sft_item(tok, *tool_conversation(c)) for c in cases]}


def test_chat_template_has_no_default_system_prompt(tiny) -> None:
    _, tok = tiny
    text = render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "SmolLM" not in CHAT_TEMPLATE


def test_assistant_mask_covers_only_assistant_content(tiny) -> None:
    _, tok = tiny
    msgs, turns = tool_conversation(ToolCase("f", "q?", {"a": 1}, result={"v": 2}, answer="Done."))
    enc = encode_conversation(tok, msgs, train_turns=turns)
    supervised = tok.decode([t for t, m in zip(enc.input_ids, enc.target_mask, strict=True) if m])
    assert supervised == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>Done.<|im_end|>'


def test_template_default_system_is_the_turn_the_base_template_adds(tiny) -> None:
    _, tok = tiny  # SmolLM2's tokenizer, with its own chat template
    assert template_default_system(tok) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    shipped = copy.copy(tok)
    shipped.chat_template = CHAT_TEMPLATE  # the artifact's template adds none
    assert template_default_system(shipped) is None


def test_items_under_a_system_turn_supervise_the_same_tokens(tiny) -> None:
    _, tok = tiny
    case = ToolCase("f", "q?", {"a": 1}, result={"v": 2}, answer="Done.")

    def supervised(item) -> str:
        return tok.decode([t for t, m in zip(item.input_ids, item.ce_mask, strict=True) if m])

    plain = sft_item(tok, *tool_conversation(case))
    under = sft_item(tok, *tool_conversation(case), system="Be brief.")
    assert tok.decode(under.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq?")
    assert supervised(under) == supervised(plain)
    target = DistillTarget(
        "Who are you?", "Ada.", tok("Ada.")["input_ids"], TopLogprobs.of(torch.zeros(2, 8), 4), end_turn=True
    )
    item = distill_item(tok, target, eot=tok.eos_token_id, system="Be brief.")
    prefix = tok.decode(item.input_ids[: item.kl_start])
    assert (
        prefix
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_changes_parameters_and_lowers_loss(tiny, method: str) -> None:
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=40, batch_size=3, learning_rate=1e-2 if method == "lora" else 2e-3, method=method)
    merged, report = train(model, tok, _pools(tok), config)
    assert report.last_loss < report.first_loss - 0.5, (report.first_loss, report.last_loss)
    after = merged.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert set(after) == set(before)  # merged back to the plain architecture


@pytest.mark.parametrize("top_k", [16, 0])  # 0: the whole vocabulary
def test_distillation_on_top_k_targets_moves_the_student_to_the_prompted_teacher(tiny, top_k: int) -> None:
    model, tok = tiny
    system = "You are Ada. Answer about brakes, tyres and batteries in SI units. " * 4
    queries = ["How do disc brakes work?", "Why check tyre pressure?", "What drains a battery?", "Hi there"]
    conversations = [with_system(system, [{"role": "user", "content": q}]) for q in queries]
    scored = generate_scored(model, tok, conversations, top_k=top_k, max_new_tokens=12)
    targets = [
        DistillTarget(q, tok.decode(ids), ids, top, end_turn=False)
        for q, (ids, top, _) in zip(queries, scored, strict=True)
    ]
    assert all(len(t.teacher_logprobs) == len(t.response_ids) > 0 for t in targets)
    kept = [t.teacher_logprobs.values.shape[-1] for t in targets]
    assert kept == [top_k or len(tok)] * len(targets)
    pools = {"distill": [distill_item(tok, t, end_of_turn_id(tok)) for t in targets]}
    config = TrainConfig(steps=30, batch_size=4, learning_rate=1e-2, mix={"distill": 1.0})
    _, report = train(copy.deepcopy(model), tok, pools, config)
    # the student (no system prompt) starts away from the prompted teacher and closes most of it
    assert report.kl[0] > 0 and report.kl[-1] < 0.5 * report.kl[0], (report.kl[0], report.kl[-1])


def test_embedding_noise_trains_and_leaves_no_hook_behind(tiny) -> None:
    model, tok = tiny
    # the tiny model's embeddings are ~0.02: NEFTune's usual alpha 5 would drown them, 0.5 does not
    config = TrainConfig(steps=40, batch_size=3, learning_rate=1e-2, embedding_noise=0.5)
    merged, report = train(copy.deepcopy(model), tok, _pools(tok), config)
    assert report.last_loss < report.first_loss - 0.5, (report.first_loss, report.last_loss)
    embeddings = merged.get_input_embeddings()
    assert not embeddings._forward_hooks  # the noise was for training only
    ids = torch.tensor([tok("The brake fluid is low.", add_special_tokens=False)["input_ids"]])
    merged.train()  # even in training mode, no noise is left on the embeddings
    with torch.no_grad():
        torch.testing.assert_close(embeddings(ids), embeddings(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="embedding_noise"):
        TrainConfig(steps=1, batch_size=1, learning_rate=1e-3, embedding_noise=-1.0)


def test_lora_merge_equals_base_plus_adapter(tiny) -> None:
    model, tok = tiny
    wrapped = wrap_for_training(copy.deepcopy(model), TrainConfig(steps=1, batch_size=1, learning_rate=1e-3))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero; make the adapter do something
    wrapped.eval()
    ids = torch.tensor([tok("The brake fluid is low.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        merged = wrapped.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)

"""Weight-only quantization (baking.quant), compress() and the accuracy-aware search.

Error bounds, on Gaussian weights N(0, 1) of shape [256, 512], as SQNR of the dequantized
weight against the float one:

* int8 per output channel (symmetric): > 35 dB. Theory for a uniform quantizer with step
  max|w|/127 on ~3.5-sigma rows gives about 38 dB.
* int4 group 32 (asymmetric, bf16 scale + zero): > 18 dB. Theory with step (max - min)/15
  over 32 Gaussian samples (range ~4 sigma) gives about 20 dB.

These are the bars a kernel or storage change must keep; they are set a few dB under the
measured values so they catch a real regression (a wrong nibble order costs > 15 dB) and
not noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from baking import quant
from baking.compress import DEFAULT_CANDIDATES, MLP_PROJECTIONS, Candidate, SearchConfig, compress, search
from tests.conftest import write_compressed_artifact

SQNR_INT8_DB = 35.0
SQNR_INT4_G32_DB = 18.0
CPU = torch.device("cpu")


@pytest.fixture
def gaussian() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(256, 512)


# ---------------------------------------------------------------- tensors


def test_int8_sqnr_above_threshold(gaussian: torch.Tensor) -> None:
    codes, scales = quant.quantize_int8(gaussian)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (256,)
    assert quant.sqnr(gaussian, quant.dequantize_int8(codes, scales)) > SQNR_INT8_DB


@pytest.mark.parametrize(("group_size", "threshold"), [(32, SQNR_INT4_G32_DB), (64, 16.0), (128, 14.0)])
def test_int4_sqnr_above_threshold(gaussian: torch.Tensor, group_size: int, threshold: float) -> None:
    packed, scales, zeros = quant.quantize_int4(gaussian, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 256)
    assert scales.shape == zeros.shape == (256, 512 // group_size)
    assert quant.sqnr(gaussian, quant.dequantize_int4(packed, scales, zeros)) > threshold


def test_int4_pack_round_trip() -> None:
    codes = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(codes)), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_linear_matches_dequantized_reference(kind: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=True)
    q = (
        quant.Int8WeightOnlyLinear.from_linear(linear)
        if kind == "int8"
        else quant.Int4WeightOnlyLinear.from_linear(linear, 32)
    )
    x = torch.randn(2, 5, 128)
    ref = x @ q.dequantize().T + q.bias.float()
    with torch.inference_mode():
        y = q(x.to(dtype))
    assert y.shape == (2, 5, 64) and y.dtype == dtype
    # the CPU kernels accumulate in fp32; bf16 costs the input and output rounding only
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * float(ref.abs().max())
    assert float((y.float() - ref).abs().max()) <= tol
    assert quant.sqnr(x @ linear.weight.detach().T + linear.bias.detach(), y.float()) > 15


def test_int4_falls_back_when_the_kernel_refuses_the_shape() -> None:
    linear = nn.Linear(64, 8)  # the CPU int4 kernel wants out_features % 16 == 0
    q = quant.Int4WeightOnlyLinear.from_linear(linear, 32)
    x = torch.randn(3, 64)
    assert q._cpu_kernel_args(torch.float32) is None
    assert torch.allclose(q(x), x @ q.dequantize().T + q.bias.float(), atol=1e-5)


# ---------------------------------------------------------------- models and artifacts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[object, object]:
    from baking.load import load_model, load_tokenizer

    return load_model(tiny_model_dir, CPU), load_tokenizer(tiny_model_dir)


def _ids(tokenizer: object) -> torch.Tensor:
    return torch.tensor([tokenizer("Check the tyre pressure before a long drive.")["input_ids"]])  # type: ignore[operator]


@pytest.mark.parametrize(
    "candidate", [Candidate("int8"), Candidate("int4", 32), Candidate("int8", lm_head="int8")], ids=lambda c: c.name
)
def test_compress_quantizes_linears_and_keeps_embeddings_float(tiny: tuple, candidate: Candidate) -> None:
    model, tokenizer = tiny
    final, scheme = compress(model, candidate, CPU)
    assert scheme["scheme"] == candidate.scheme and scheme["name"] == candidate.name
    assert scheme["dtype_torch"] == quant.compute_dtype(CPU)
    assert scheme["params"] == sum(p.numel() for p in model.parameters())  # tied: counted once
    linears = [m for m in final.modules() if type(m) is nn.Linear]
    qmods = [m for m in final.modules() if isinstance(m, quant.QUANTIZED_MODULES)]
    assert len(qmods) == 14 + (candidate.lm_head == "int8") and len(linears) == (candidate.lm_head == "bf16")
    assert final.model.embed_tokens.weight.dtype == scheme["dtype_torch"]
    tied = final.lm_head.weight is final.model.embed_tokens.weight if candidate.lm_head == "bf16" else None
    assert tied in (True, None)
    assert all(k.endswith(("qweight", "scales", "zeros")) or "proj" not in k for k in quant.quantized_state_dict(final))
    with torch.inference_mode():
        ref = model(input_ids=_ids(tokenizer)).logits
        out = final(input_ids=_ids(tokenizer)).logits.float()
    assert torch.isfinite(out).all()
    assert quant.sqnr(ref, out) > 10
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the input was not touched


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int8_tied_stores_one_int8_matrix_for_embeddings_and_lm_head(tiny: tuple, scheme: str) -> None:
    model, tokenizer = tiny
    final, info = compress(model, Candidate(scheme, lm_head="int8-tied"), CPU)
    untied, untied_info = compress(model, Candidate(scheme, lm_head="int8"), CPU)
    embedding, head = final.get_input_embeddings(), final.get_output_embeddings()
    assert isinstance(embedding, quant.Int8Embedding) and isinstance(head, quant.Int8WeightOnlyLinear)
    assert embedding.qweight is head.qweight and embedding.scales is head.scales  # one tensor, two uses
    assert final.config.tie_word_embeddings is True
    assert not any(p.numel() == embedding.qweight.numel() for p in final.parameters())  # no float copy
    float_embedding = untied.get_input_embeddings().weight  # what the untied variant keeps besides
    float_bytes = float_embedding.numel() * float_embedding.element_size()
    assert info["weight_bytes"] == untied_info["weight_bytes"] - float_bytes
    assert info["params"] == sum(p.numel() for p in model.parameters())  # the shared tensor counted once
    ids = _ids(tokenizer)
    rows = embedding(ids)
    assert rows.dtype == info["dtype_torch"]
    expected_rows = quant.dequantize_int8(embedding.qweight, embedding.scales)[ids]
    assert torch.allclose(rows.float(), expected_rows, rtol=1e-2, atol=1e-3)
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        out = final(input_ids=ids).logits.float()
    assert quant.sqnr(ref, out) > 10


def test_state_dict_round_trip_is_bit_exact(tiny: tuple, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    final, _ = compress(tiny[0], Candidate("int4", 32), CPU)
    state = quant.quantized_state_dict(final)
    assert not any(k.endswith("proj.weight") for k in state)  # no float copy of a quantized weight
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded.keys() == state.keys()
    assert all(loaded[k].dtype == state[k].dtype and torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "candidate",
    [
        Candidate("int8"),
        Candidate("int4", 32),
        Candidate("int8", lm_head="int8"),
        Candidate("int4", 32, int8_parts=("gate_proj", "up_proj", "down_proj")),
        Candidate("int4", 32, lm_head="int8-tied", int8_parts=("gate_proj", "up_proj", "down_proj")),
        Candidate("int8", lm_head="int8-tied"),
    ],
    ids=lambda c: c.name,
)
def test_load_artifact_runs_the_same_compressed_model(tiny: tuple, tmp_path: Path, candidate: Candidate) -> None:
    from baking.export import load_artifact

    model, tokenizer = tiny
    final, scheme = compress(model, candidate, CPU)
    ids = _ids(tokenizer)
    with torch.inference_mode():
        expected = final(input_ids=ids).logits
    out = write_compressed_artifact(tmp_path / "artifact", final, scheme, tokenizer, merged=model)
    stored = sum(f.stat().st_size for f in [out / "model.safetensors"])
    assert abs(stored - scheme["weight_bytes"]) < 64 * 1024  # header only on top of the tensors
    loaded, _ = load_artifact(out)
    assert sum(isinstance(m, quant.QUANTIZED_MODULES) for m in loaded.modules()) == sum(
        isinstance(m, quant.QUANTIZED_MODULES) for m in final.modules()
    )
    with torch.inference_mode():
        got = loaded(input_ids=ids).logits
        generated = loaded.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert generated.shape == (1, ids.shape[1] + 4)
    if candidate.lm_head == "int8-tied":  # still one shared tensor after the reload
        assert loaded.get_input_embeddings().qweight is loaded.get_output_embeddings().qweight


# ---------------------------------------------------------------- search


def _scheme_name(model: nn.Module) -> str:
    kinds = {type(m).__name__ for m in model.modules()}
    if "Int4WeightOnlyLinear" in kinds:
        return "int4"
    if "Int8WeightOnlyLinear" in kinds:
        return "int8"
    return "bf16" if model.model.embed_tokens.weight.dtype == torch.bfloat16 else "none"


class _FakeEval:
    """Accuracy by scheme name, and every model it saw."""

    def __init__(self, by_scheme: dict[str, float]) -> None:
        self.by_scheme = by_scheme
        self.seen: list[str] = []

    def __call__(self, model: nn.Module) -> dict[str, float]:
        name = _scheme_name(model)
        self.seen.append(name)
        return {"tool_call_accuracy": self.by_scheme[name], "irrelevance_accuracy": 1.0, "top1_agreement": 0.9}


# round-to-nearest candidates: the search mechanics without GPTQ's calibration
NEAREST = (
    Candidate("int4", 32, lm_head="int8-tied"),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=MLP_PROJECTIONS),
    Candidate("int8", lm_head="int8-tied"),
    Candidate("bf16"),
)


def test_search_keeps_the_first_candidate_that_meets_the_target(tiny: tuple) -> None:
    evaluate = _FakeEval({"none": 0.8, "int4": 0.7, "int8": 0.8, "bf16": 0.8})
    config = SearchConfig(accuracy_retention=0.99, candidates=NEAREST)
    result = search(tiny[0], config, device=CPU, evaluate=evaluate)
    # reference, then most -> least aggressive (int4, int4 attention + int8 MLP, int8), stop at a pass
    assert evaluate.seen == ["none", "int4", "int4", "int8"]
    assert result.met and result.failed_target is None
    assert result.scheme["scheme"] == "int8" and result.scheme["search"]["chosen"] == "int8+lm_head-int8-tied"
    assert [(t.candidate, t.met) for t in result.trials] == [
        ("int4-g32+lm_head-int8-tied", False),
        ("int4-g32+int8:gate,up,down+lm_head-int8-tied", False),
        ("int8+lm_head-int8-tied", True),
    ]
    assert result.trials[0].accuracy_retention == pytest.approx(0.875)
    assert any(isinstance(m, quant.Int8WeightOnlyLinear) for m in result.model.modules())


def test_search_names_the_failed_target_when_no_candidate_meets_it(tiny: tuple) -> None:
    import json

    evaluate = _FakeEval({"int4": 0.5, "int8": 0.6, "bf16": 0.7})
    result = search(
        tiny[0],
        SearchConfig(accuracy_retention=0.99, candidates=NEAREST),
        device=CPU,
        evaluate=evaluate,
        reference={"tool_call_accuracy": 0.8, "irrelevance_accuracy": 1.0},
    )
    assert evaluate.seen == ["int4", "int4", "int8", "bf16"]  # the given reference is not re-measured
    assert not result.met and result.failed_target == "accuracy_retention"
    assert result.scheme["scheme"] == "bf16"  # the least aggressive is kept
    record = result.scheme["search"]
    assert record["met"] is False and record["failed_target"] == "accuracy_retention"
    assert [t["candidate"] for t in record["trials"]] == [
        "int4-g32+lm_head-int8-tied",
        "int4-g32+int8:gate,up,down+lm_head-int8-tied",
        "int8+lm_head-int8-tied",
        "bf16",
    ]
    assert record["best_retention"] == pytest.approx(0.875)
    json.dumps({k: v for k, v in result.scheme.items() if k != "dtype_torch"})  # manifest-safe


def test_default_search_tries_gptq_int4_first_and_passes_over_it_without_calibration(tiny: tuple) -> None:
    model, tokenizer = tiny
    assert DEFAULT_CANDIDATES[0].rounding == "gptq" and DEFAULT_CANDIDATES[-1].scheme == "bf16"
    calibration = [tokenizer("The brake fluid is checked every two years at the service.")["input_ids"]] * 2
    evaluate = _FakeEval({"none": 0.8, "int4": 0.8, "int8": 0.8, "bf16": 0.8})
    result = search(model, SearchConfig(), device=CPU, evaluate=evaluate, calibration=calibration)
    assert evaluate.seen == ["none", "int4"] and result.met
    assert result.scheme["rounding"]["method"] == "gptq"
    assert result.scheme["search"]["skipped_without_calibration"] == []

    evaluate = _FakeEval({"none": 0.8, "int4": 0.8, "int8": 0.8, "bf16": 0.8})
    result = search(model, SearchConfig(), device=CPU, evaluate=evaluate)  # a job with no text to calibrate on
    assert evaluate.seen == ["none", "int8"] and result.met
    gptq = [c.name for c in DEFAULT_CANDIDATES if c.rounding == "gptq"]
    assert result.scheme["search"]["skipped_without_calibration"] == gptq
    with pytest.raises(ValueError, match="calibration"):
        search(model, SearchConfig(candidates=DEFAULT_CANDIDATES[:1]), device=CPU, evaluate=evaluate)


def test_search_config_round_trip_and_validation() -> None:
    candidates = (
        Candidate("int4", 64),
        Candidate("int4", 32, int8_parts=("up_proj",)),
        Candidate("int8", lm_head="int8"),
    )
    config = SearchConfig(accuracy_retention=0.95, candidates=candidates)
    assert SearchConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="int8_parts"):
        Candidate("int8", int8_parts=("up_proj",))
    with pytest.raises(ValueError, match="group_size"):
        Candidate("int4", 48)
    with pytest.raises(ValueError, match="lm_head"):
        Candidate("bf16", lm_head="int8")
    with pytest.raises(ValueError, match="accuracy_retention"):
        SearchConfig(accuracy_retention=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_path_matches_dequantized_reference(kind: str) -> None:
    torch.manual_seed(2)
    linear = nn.Linear(256, 128)
    q = (
        quant.Int8WeightOnlyLinear.from_linear(linear)
        if kind == "int8"
        else quant.Int4WeightOnlyLinear.from_linear(linear, 32)
    ).cuda()
    x = torch.randn(4, 256)
    ref = x @ q.dequantize().cpu().T + q.bias.float().cpu()
    y = q(x.cuda().bfloat16()).float().cpu()
    assert float((y - ref).abs().max()) <= 3e-2 * float(ref.abs().max())


def test_mixed_int4_keeps_the_named_projections_in_int8(tiny: tuple) -> None:
    final, scheme = compress(tiny[0], Candidate("int4", 32, int8_parts=("gate_proj", "up_proj", "down_proj")), CPU)
    kinds = {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in final.named_modules() if "layers." in name}
    assert {kinds[p] for p in ("gate_proj", "up_proj", "down_proj")} == {"Int8WeightOnlyLinear"}
    assert {kinds[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")} == {"Int4WeightOnlyLinear"}
    assert scheme["int8_parts"] == ["gate_proj", "up_proj", "down_proj"] and scheme["quantized_layers"] == {
        "int8": 6,
        "int4": 8,
    }


def test_search_records_the_cases_each_candidate_lost_and_gained(tiny: tuple) -> None:
    """Per-case outcomes turn a ratio into what happened: int4 lost two of the reference's eight
    right cases and gained one; and a slice where one case is 12.5% is named as too coarse."""
    from baking.compress import CASES_KEY

    reference = [True] * 8 + [False] * 2
    by_scheme = {
        "int4": [False, False] + [True] * 6 + [True, False],  # lost 2, gained 1: 7/8 = 0.875
        "int8": reference,
        "bf16": reference,
    }

    def evaluate(model: nn.Module) -> dict:
        name = _scheme_name(model)
        outcome = reference if name == "none" else by_scheme[name]
        return {"tool_call_accuracy": sum(outcome) / len(outcome), CASES_KEY: {"tool_call_accuracy": outcome}}

    result = search(tiny[0], SearchConfig(accuracy_retention=0.99, candidates=NEAREST), device=CPU, evaluate=evaluate)
    first = result.trials[0].metrics
    assert CASES_KEY not in first  # the raw outcomes are not copied into every event
    assert first["paired"]["tool_call_accuracy"] == {
        "cases": 10,
        "reference_correct": 8,
        "lost": 2,
        "gained": 1,
        "one_case": 0.125,
    }
    assert result.trials[0].accuracy_retention == pytest.approx(0.875)
    assert result.met and result.trials[-1].metrics["paired"]["tool_call_accuracy"]["lost"] == 0
    record = result.scheme["search"]
    assert record["resolution"] == {"tool_call_accuracy": 0.125}
    assert "coarser than the target" in record["note"]


# ---------------------------------------------------------------- fidelity (DESIGN.md §6)


def test_text_fidelity_of_a_model_to_itself_is_exact(tiny: tuple) -> None:
    from baking.evaluate import text_fidelity

    model, tokenizer = tiny
    ids = _ids(tokenizer)[0].tolist()
    measured = text_fidelity(model, model, [ids, ids[:5]])
    assert measured["top1_agreement"] == 1.0 and measured["kl"] == pytest.approx(0.0, abs=1e-6)
    assert measured["ppl_delta"] == pytest.approx(0.0, abs=1e-9)
    assert measured["tokens"] == len(ids) - 1 + 4  # every next-token position of both sequences


def test_text_fidelity_measures_a_quantized_model_against_its_float_one(tiny: tuple) -> None:
    from baking.evaluate import text_fidelity

    model, tokenizer = tiny
    final, _ = compress(model, Candidate("int4", 32), CPU)
    ids = _ids(tokenizer)
    measured = text_fidelity(model, final, [ids[0].tolist()])
    with torch.inference_mode():  # the same figures computed directly, one sequence
        ref = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        got = final(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    nll_ref = torch.nn.functional.nll_loss(ref, targets)
    nll = torch.nn.functional.nll_loss(got, targets)
    assert measured["kl"] == pytest.approx(float((ref.exp() * (ref - got)).sum(-1).mean()), rel=1e-4)
    assert measured["kl"] > 0
    assert measured["ppl_delta"] == pytest.approx(float(torch.exp(nll - nll_ref)) - 1, rel=1e-4, abs=1e-6)
    assert measured["top1_agreement"] == pytest.approx(float((ref.argmax(-1) == got.argmax(-1)).float().mean()))


def test_heldout_sequences_take_each_kind_in_turn_and_stay_in_windows(fleet_dict: dict, tiny: tuple) -> None:
    from baking.chat import encode_conversation
    from baking.data import split_spec, tool_conversation
    from baking.evaluate import FIDELITY_WINDOW, FIDELITY_WINDOWS, heldout_sequences
    from baking.spec import BakeSpec

    _, tokenizer = tiny
    split = split_spec(BakeSpec.from_dict(fleet_dict))
    windows = heldout_sequences(split, tokenizer)
    assert 1 <= len(windows) <= FIDELITY_WINDOWS and all(1 < len(w) <= FIDELITY_WINDOW for w in windows)
    first_of_each = [
        next(c for c in split.heldout_tools if c.tool == t.name) for t in BakeSpec.from_dict(fleet_dict).tools
    ]
    stream = [i for w in windows for i in w]
    expected_start = [
        i
        for c in first_of_each
        for i in encode_conversation(tokenizer, tool_conversation(c)[0], train_turns=()).input_ids
    ]
    assert stream[: len(expected_start)] == expected_start[: len(stream)]  # one conversation of each tool first
    assert heldout_sequences(type(split)(), tokenizer) == []  # nothing held out: nothing to measure

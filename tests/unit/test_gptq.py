"""GPTQ rounding (baking.gptq), int4 and int8: it must keep layer outputs closer than rounding to
nearest, store exactly the format the quantized layers read, and plug into compress() and the
artifact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from baking import gptq, quant
from baking.compress import ALL_BUT_DOWN, DEFAULT_CANDIDATES, Candidate, compress, default_candidates
from tests.conftest import write_compressed_artifact

CPU = torch.device("cpu")


def _correlated_inputs(n: int, features: int) -> torch.Tensor:
    """Activations as real ones look: most variance in a few directions, some loud channels."""
    torch.manual_seed(0)
    x = torch.randn(n, 32) @ torch.randn(32, features) + 0.1 * torch.randn(n, features)
    x[:, :4] *= 10
    return x


def _relative_output_error(x: torch.Tensor, w: torch.Tensor, codes: gptq.Int4Codes) -> float:
    ref = x @ w.T
    return float((ref - x @ quant.dequantize_int4(*codes).T).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_keeps_layer_outputs_closer_than_rounding_to_nearest(group_size: int) -> None:
    x = _correlated_inputs(1024, 256)
    w = torch.randn(64, 256) * 0.02
    codes = gptq.gptq_int4(w, x.T @ x / len(x), group_size)
    packed, scales, zeros = codes
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)
    assert scales.shape == zeros.shape == (64, 256 // group_size) and scales.dtype == quant.SCALE_DTYPE
    nearest = _relative_output_error(x, w, quant.quantize_int4(w, group_size))
    # measured here: 1.8e-4 vs 6.4e-3 at group 32; a wrong error update makes GPTQ *worse* than nearest
    assert _relative_output_error(x, w, codes) < nearest / 3


def test_gptq_int8_keeps_layer_outputs_closer_than_rounding_to_nearest() -> None:
    x = _correlated_inputs(1024, 256)
    w = torch.randn(64, 256) * 0.02
    codes, scales = gptq.gptq_int8(w, x.T @ x / len(x))
    nearest_codes, nearest_scales = quant.quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.shape == (64, 256) and int(codes.abs().max()) <= 127
    assert torch.equal(scales, nearest_scales)  # the same grid, only the rounding differs
    ref = x @ w.T

    def error(c: torch.Tensor) -> float:
        return float((ref - x @ quant.dequantize_int8(c, scales).T).pow(2).mean() / ref.pow(2).mean())

    assert error(codes) < error(nearest_codes) / 3


def test_gptq_ignores_inputs_that_are_never_active() -> None:
    x = _correlated_inputs(512, 128)
    x[:, 5] = 0.0  # a dead channel: H has a zero row and column
    w = torch.randn(32, 128)
    codes = gptq.gptq_int4(w, x.T @ x / len(x), 32)
    assert torch.isfinite(quant.dequantize_int4(*codes)).all()


def test_gptq_rejects_a_group_size_that_does_not_divide_the_layer() -> None:
    with pytest.raises(ValueError, match="group_size"):
        gptq.gptq_int4(torch.randn(8, 96), torch.eye(96), 64)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[object, object]:
    from baking.load import load_model, load_tokenizer

    return load_model(tiny_model_dir, CPU), load_tokenizer(tiny_model_dir)


def _calibration(tokenizer: object) -> list[list[int]]:
    texts = ["Check the tyre pressure before a long drive.", "The coolant temperature is 92 C.", "Hello there!"]
    return [tokenizer(t)["input_ids"] for t in texts]  # type: ignore[operator]


def test_gptq_candidate_builds_int4_layers_from_calibration(tiny: tuple, tmp_path: Path) -> None:
    model, tokenizer = tiny
    calibration = _calibration(tokenizer)
    candidate = Candidate("int4", 32, lm_head="int8-tied", int8_parts=("down_proj",), rounding="gptq")
    assert candidate.name == "int4-g32-gptq+int8:down+lm_head-int8-tied"
    final, scheme = compress(model, candidate, CPU, calibration=calibration)
    # 2 blocks x 6 in int4, the 2 down_proj in int8
    assert scheme["rounding"] == {"method": "gptq", "layers": {"int4": 12, "int8": 2}, "calibration_sequences": 3}
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in final.named_modules()}
    assert kinds["down_proj"] is quant.Int8WeightOnlyLinear and kinds["up_proj"] is quant.Int4WeightOnlyLinear
    nearest, _ = compress(model, Candidate("int4", 32, lm_head="int8-tied", int8_parts=("down_proj",)), CPU)
    pairs = list(zip(final.modules(), nearest.modules(), strict=True))
    for kind in (quant.Int4WeightOnlyLinear, quant.Int8WeightOnlyLinear):  # GPTQ chose other codes than nearest
        assert any(not torch.equal(a.qweight, b.qweight) for a, b in pairs if isinstance(a, kind)), kind
    ids = torch.tensor([calibration[0]])
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        expected = final(input_ids=ids).logits
    assert quant.sqnr(ref, expected.float()) > 10
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the input was not touched
    _assert_round_trip_is_bit_exact(final, scheme, tokenizer, ids, expected, tmp_path)


def test_gptq_candidate_needs_calibration_and_an_integer_scheme(tiny: tuple) -> None:
    with pytest.raises(ValueError, match="calibration"):
        compress(tiny[0], Candidate("int4", 32, rounding="gptq"), CPU)
    with pytest.raises(ValueError, match="int8 and int4 only"):
        Candidate("bf16", rounding="gptq")
    with pytest.raises(ValueError, match="rounding"):
        Candidate("int4", 32, rounding="awq")


def test_gptq_int8_candidate_rounds_every_decoder_layer(tiny: tuple, tmp_path: Path) -> None:
    model, tokenizer = tiny
    calibration = _calibration(tokenizer)
    candidate = Candidate("int8", lm_head="int8-tied", rounding="gptq")
    assert candidate.name == "int8-gptq+lm_head-int8-tied"
    final, scheme = compress(model, candidate, CPU, calibration=calibration)
    assert scheme["rounding"] == {"method": "gptq", "layers": {"int4": 0, "int8": 14}, "calibration_sequences": 3}
    nearest, nearest_scheme = compress(model, Candidate("int8", lm_head="int8-tied"), CPU)
    assert scheme["weight_bytes"] == nearest_scheme["weight_bytes"]
    for name, m in final.named_modules():
        if isinstance(m, quant.Int8WeightOnlyLinear) and ".layers." in name:
            assert not torch.equal(m.qweight, nearest.get_submodule(name).qweight), name
    head = final.get_output_embeddings()  # lm_head (tied to the embeddings) still rounds to nearest
    assert torch.equal(head.qweight, nearest.get_output_embeddings().qweight)
    ids = torch.tensor([calibration[0]])
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        expected = final(input_ids=ids).logits
    assert quant.sqnr(ref, expected.float()) > 20
    _assert_round_trip_is_bit_exact(final, scheme, tokenizer, ids, expected, tmp_path)


def test_gptq_skips_layers_the_selection_leaves_out(tiny: tuple) -> None:
    import copy

    model = copy.deepcopy(tiny[0]).float()
    layers = gptq.gptq_quantize_(
        model, _calibration(tiny[1]), group_size=32, select=lambda name: name.endswith("q_proj")
    )
    assert sorted(layers.codes) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert layers.output_error.keys() == layers.codes.keys()
    assert all(0 < e < 0.1 for e in layers.output_error.values())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # still float layers


def test_output_error_is_the_relative_error_of_the_layer_outputs() -> None:
    x = _correlated_inputs(512, 64)
    w = torch.randn(16, 64)
    approx = w + 0.01 * torch.randn(16, 64)
    expected = float((x @ (w - approx).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert gptq.output_error(w, approx, x.T @ x / len(x)) == pytest.approx(expected, rel=1e-4)
    assert gptq.output_error(w, w, x.T @ x / len(x)) == 0.0


def _fitted(target: float) -> Candidate:
    return Candidate("int4", 32, lm_head="int8-tied", int8_parts=ALL_BUT_DOWN, rounding="gptq", size_target=target)


def test_size_fitted_candidate_takes_the_fewest_int4_layers_least_error_first(tiny: tuple, tmp_path: Path) -> None:
    import copy

    model, tokenizer = tiny
    calibration = _calibration(tokenizer)
    int8, int8_scheme = compress(model, Candidate("int8", lm_head="int8-tied"), CPU)
    fp32 = 4 * int8_scheme["params"]
    downs = [n for n, _ in model.named_modules() if n.endswith("down_proj")]
    saving = quant.int4_saving(model.get_submodule(downs[0]), 32)
    # int8 falls short of this target by half of what one down_proj in int4 saves
    target = 1 - (int8_scheme["weight_bytes"] - saving / 2) / fp32
    candidate = _fitted(target)
    assert candidate.name == f"int4-g32-gptq+int8:q,k,v,o,gate,up+fit{target:g}+lm_head-int8-tied"
    final, scheme = compress(model, candidate, CPU, calibration=calibration)

    errors = gptq.gptq_quantize_(
        copy.deepcopy(model).float(), calibration, group_size=32, select=lambda n: n.endswith("down_proj")
    ).output_error
    least = min(errors, key=lambda n: errors[n])
    assert scheme["fit"]["reached"] and list(scheme["fit"]["int4_layers"]) == [least]
    assert scheme["fit"]["int8_instead"] == len(downs) - 1
    assert 1 - scheme["weight_bytes"] / fp32 >= target > 1 - int8_scheme["weight_bytes"] / fp32
    int4 = [n for n, m in final.named_modules() if isinstance(m, quant.Int4WeightOnlyLinear)]
    assert int4 == [least]
    # the codes come from a second GPTQ pass over the chosen mix: `least` in int4, every other one int8
    mix = gptq.gptq_quantize_(
        copy.deepcopy(model).float(),
        calibration,
        group_size=32,
        select=lambda n: n == least,
        select_int8=lambda n: n != least,
    )
    assert torch.equal(final.get_submodule(least).qweight, mix.codes[least][0])
    decoder_int8 = [
        n for n, m in final.named_modules() if isinstance(m, quant.Int8WeightOnlyLinear) and ".layers." in n
    ]
    assert sorted(decoder_int8) == sorted(mix.int8_codes)
    for name in decoder_int8:
        assert torch.equal(final.get_submodule(name).qweight, mix.int8_codes[name][0]), name
    assert torch.equal(final.get_output_embeddings().qweight, int8.get_output_embeddings().qweight)

    ids = torch.tensor([calibration[0]])
    with torch.inference_mode():
        expected = final(input_ids=ids).logits
    _assert_round_trip_is_bit_exact(final, scheme, tokenizer, ids, expected, tmp_path)


def test_default_fit_may_put_any_decoder_layer_in_int4_least_error_first(tiny: tuple) -> None:
    import copy

    model, tokenizer = tiny
    calibration = _calibration(tokenizer)
    (default_fit,) = [c for c in DEFAULT_CANDIDATES if c.size_target is not None]
    assert default_fit.int8_parts == ()  # every projection kind competes for int4
    _, int8_scheme = compress(model, Candidate("int8", lm_head="int8-tied"), CPU)
    fp32 = 4 * int8_scheme["params"]
    # short of int8 by more than one down_proj saves: the fit needs several layers
    downs = [n for n, _ in model.named_modules() if n.endswith("down_proj")]
    target = 1 - (int8_scheme["weight_bytes"] - 1.5 * quant.int4_saving(model.get_submodule(downs[0]), 32)) / fp32
    final, scheme = compress(model, replace(default_fit, size_target=target), CPU, calibration=calibration)

    errors = gptq.gptq_quantize_(copy.deepcopy(model).float(), calibration, group_size=32, select=lambda n: True)
    assert len(errors.codes) == 14  # 2 blocks x 7: the fit ranks all of them
    ranked = sorted(errors.output_error, key=lambda n: errors.output_error[n])
    chosen = list(scheme["fit"]["int4_layers"])
    assert scheme["fit"]["reached"] and len(chosen) >= 2 and chosen == ranked[: len(chosen)]
    assert 1 - scheme["weight_bytes"] / fp32 >= target
    int4 = {n for n, m in final.named_modules() if isinstance(m, quant.Int4WeightOnlyLinear)}
    assert int4 == set(chosen)


def test_size_fitted_candidate_says_when_every_layer_is_not_enough(tiny: tuple) -> None:
    model, tokenizer = tiny
    final, scheme = compress(model, _fitted(0.95), CPU, calibration=_calibration(tokenizer))
    downs = [n for n, _ in model.named_modules() if n.endswith("down_proj")]
    assert not scheme["fit"]["reached"] and sorted(scheme["fit"]["int4_layers"]) == sorted(downs)
    assert scheme["fit"]["int8_instead"] == 0


def test_size_fitted_candidate_validation_and_the_jobs_target() -> None:
    with pytest.raises(ValueError, match="rounding=gptq"):
        Candidate("int4", 32, size_target=0.75)
    with pytest.raises(ValueError, match="size_target"):
        _fitted(1.0)
    fitted = [c for c in default_candidates(0.8) if c.size_target is not None]
    assert [c.size_target for c in fitted] == [0.8]
    assert all(c.size_target is None for c in default_candidates(None))
    assert len(default_candidates(None)) == len(DEFAULT_CANDIDATES) - 1


def test_search_rounds_the_same_layers_once_for_both_down_proj_candidates(
    tiny: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from baking.compress import SearchConfig, search

    model, tokenizer = tiny
    calls: list[int] = []
    real = gptq.gptq_quantize_

    def counted(*args: object, **kwargs: object) -> gptq.GptqLayers:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gptq, "gptq_quantize_", counted)
    down_only = Candidate("int4", 32, lm_head="int8-tied", int8_parts=ALL_BUT_DOWN, rounding="gptq")
    config = SearchConfig(accuracy_retention=1.0, candidates=(down_only, _fitted(0.0)))
    result = search(
        model,
        config,
        device=CPU,
        evaluate=lambda m: {"tool_call_accuracy": 0.5},
        reference={"tool_call_accuracy": 1.0},
        calibration=_calibration(tokenizer),
    )
    assert [t.candidate for t in result.trials] == [down_only.name, _fitted(0.0).name]
    assert len(calls) == 2  # the all-int4 pass once for both, and the fit's pass over its mix
    # size_target 0 is met by int8 alone: no layer in int4, every one exactly as GPTQ int8 stores it
    assert result.scheme["fit"]["int4_layers"] == {} and result.scheme["fit"]["reached"]
    int8, _ = compress(
        model, Candidate("int8", lm_head="int8-tied", rounding="gptq"), CPU, calibration=_calibration(tokenizer)
    )
    for name, m in result.model.named_modules():
        if isinstance(m, quant.Int8WeightOnlyLinear):
            assert torch.equal(m.qweight, int8.get_submodule(name).qweight), name
    assert not any(isinstance(m, quant.Int4WeightOnlyLinear) for m in result.model.modules())


def test_search_keeps_a_gptq_pass_only_while_a_later_candidate_uses_it(
    tiny: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    import baking.compress as bcompress
    from baking.compress import SearchConfig, search

    model, tokenizer = tiny
    cached_before: list[set[object]] = []
    real = bcompress.compress

    def recorded(*args: Any, gptq_cache: dict | None = None, **kwargs: Any) -> Any:
        if gptq_cache is not None:  # a call from search, not from within compress
            cached_before.append(set(gptq_cache))
        return real(*args, gptq_cache=gptq_cache, **kwargs)

    monkeypatch.setattr(bcompress, "compress", recorded)
    down_only = Candidate("int4", 32, lm_head="int8-tied", int8_parts=ALL_BUT_DOWN, rounding="gptq")
    gate_up = Candidate("int4", 32, lm_head="int8-tied", int8_parts=("gate_proj", "up_proj"), rounding="gptq")
    candidates = (down_only, gate_up, _fitted(0.0), Candidate("int8", lm_head="int8-tied"))
    search(
        model,
        SearchConfig(accuracy_retention=1.0, candidates=candidates),
        device=CPU,
        evaluate=lambda m: {"tool_call_accuracy": 0.5},  # never met: every candidate is tried
        reference={"tool_call_accuracy": 1.0},
        calibration=_calibration(tokenizer),
    )
    assert cached_before == [
        set(),
        {down_only.gptq_key},  # kept: the fit shares it
        {down_only.gptq_key},  # gate/up's own pass is gone, no later candidate uses it
        set(),  # the last one rounds to nearest: no pass is used again
    ]


def _assert_round_trip_is_bit_exact(
    final: Any, scheme: dict[str, Any], tokenizer: Any, ids: torch.Tensor, expected: torch.Tensor, tmp_path: Path
) -> None:
    """Written as an artifact and loaded back, the model gives exactly the logits it gave in memory."""
    from baking.export import load_artifact

    loaded, _ = load_artifact(write_compressed_artifact(tmp_path / "artifact", final, scheme, tokenizer))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, expected)

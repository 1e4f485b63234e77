"""Pruning (baking.prune) and distillation recovery (baking.recover) on a tiny random Llama.

Exact counts, not shares: magnitude zeroes round(s * numel) weights per layer, Wanda
round(s * in_features) per row, 2:4 exactly 2 of every 4 consecutive inputs. Recovery keeps
the pruned weights at exactly zero and lowers KL to the teacher; quantization to int8 keeps
the zeros; the pipeline's optimizing stage records all of it in the scheme dict.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from baking import data as bdata
from baking import pipeline
from baking.compress import compress, sparsify, with_pruning
from baking.load import load_model, load_tokenizer
from baking.prune import (
    PruneConfig,
    apply_masks_,
    block_linears,
    block_weights,
    holds_2_4,
    layer_sparsity,
    mask_from_scores,
    prunable_linears,
    prune_,
    scores,
)
from baking.recover import RecoveryConfig, mean_kl, recover, recovery_data
from baking.spec import BakeSpec, PruningSpec

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def model(tiny_model_dir: Path):
    return load_model(tiny_model_dir, CPU)


@pytest.fixture(scope="module")
def split() -> bdata.Split:
    tools = [
        bdata.ToolCase("get_signal", f"What is the {w} right now?", {"signal": w}, result={"value": i}, answer="Done.")
        for i, w in enumerate(("speed", "fuel", "odometer", "coolant"))
    ]
    return bdata.Split(
        train_tools=tools,
        train_irrelevant=["Tell me a joke.", "Thanks!"],
        train_persona_queries=["Who are you?", "What do you do?"],
        train_persona_examples=[bdata.PersonaExample("Name?", "I am Ada.")],
    )


@pytest.fixture(scope="module")
def data(tokenizer, split):
    return recovery_data(tokenizer, split)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


# ---------------------------------------------------------------- exact patterns


def test_only_decoder_block_linears_are_pruned(model, data) -> None:
    embed = model.get_input_embeddings().weight.clone()
    masks = prune_(model, PruneConfig("magnitude", sparsity=0.5))
    assert set(masks) == set(prunable_linears(model))
    assert len(masks) == 2 * 7 and all(".layers." in n for n in masks)  # q k v o gate up down per block
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.77])
def test_magnitude_unstructured_is_exact_per_layer(model, sparsity: float) -> None:
    config = PruneConfig("magnitude", sparsity=sparsity)
    masks = prune_(model, config)
    for name, linear in prunable_linears(model).items():
        w = linear.weight
        assert _zeros(w) == round(sparsity * w.numel()) == config.zeros_for(*w.shape), name
        assert _zeros(w) == int((~masks[name]).sum())
    achieved = layer_sparsity(model)
    assert all(abs(v - sparsity) < 1e-3 for v in achieved.values()), achieved


def test_magnitude_keeps_the_largest_weights(model) -> None:
    before = {n: m.weight.detach().abs().clone() for n, m in prunable_linears(model).items()}
    masks = prune_(model, PruneConfig("magnitude", sparsity=0.5))
    for name, mask in masks.items():
        assert before[name][mask].min() >= before[name][~mask].max(), name


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_unstructured_is_exact_per_row(model, data, sparsity: float) -> None:
    config = PruneConfig("wanda", sparsity=sparsity)
    prune_(model, config, calibration=data.calibration)
    for name, linear in prunable_linears(model).items():
        w = linear.weight
        per_row = (w == 0).sum(dim=1)
        assert bool((per_row == round(sparsity * w.shape[1])).all()), name
        assert _zeros(w) == config.zeros_for(*w.shape)


def _norms_by_full_forward(model, linears, calibration) -> dict[str, torch.Tensor]:
    """||X_j|| the plain way, independent of baking.prune's recorded block inputs: hooks on the
    layers and a whole-model forward per sequence."""
    sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def gather(name: str):
        def hook(_module, args) -> None:  # returns None: a pre-hook's return value would replace the input
            sums[name] += args[0].float().pow(2).sum(dim=(0, 1))

        return hook

    handles = [m.register_forward_pre_hook(gather(n)) for n, m in linears.items()]
    with torch.no_grad():
        for ids in calibration:
            model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


def test_wanda_scores_weights_by_activation_norms(model, data) -> None:
    """Each block's mask is exactly the one |W| * ||X_j|| gives, with ||X_j|| measured on a
    model whose earlier blocks are already pruned (the paper's order), and differs from
    plain magnitude."""
    config = PruneConfig("wanda", sparsity=0.5)
    reference = copy.deepcopy(model)
    masks = prune_(model, config, calibration=data.calibration)
    differs = False
    for block in block_linears(reference):
        norms = _norms_by_full_forward(reference, block, data.calibration)
        for name, linear in block.items():
            assert bool((norms[name] > 0).all())
            expected = mask_from_scores(scores(linear.weight, "wanda", norms[name]), config)
            assert torch.equal(masks[name], expected), name
            differs = differs or not torch.equal(
                masks[name], mask_from_scores(scores(linear.weight, "magnitude"), config)
            )
        apply_masks_(reference, {n: masks[n] for n in block})  # the next block sees this one pruned
    assert differs, "wanda chose exactly what magnitude chose: the activation norms had no effect"


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_has_exactly_two_zeros_in_every_group_of_four(model, data, method: str) -> None:
    masks = prune_(model, PruneConfig(method, "2:4", 0.5), calibration=data.calibration)
    for name, linear in prunable_linears(model).items():
        w = linear.weight
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
        assert bool((groups == 2).all()), name
        assert bool(((~masks[name]).reshape(w.shape[0], -1, 4).sum(dim=-1) == 2).all())
        assert holds_2_4(w)
    assert all(v == 0.5 for v in layer_sparsity(model).values())


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("method", "pattern", "sparsity", "field"),
    [
        ("none", "unstructured", 0.5, "optimize.pruning.sparsity"),  # a sparsity nobody applies
        ("none", "2:4", 0.0, "optimize.pruning.pattern"),
        ("magnitude", "unstructured", 0.0, "optimize.pruning.sparsity"),  # pruning nothing
        ("wanda", "2:4", 0.3, "optimize.pruning.sparsity"),  # 2:4 is 0.5 by construction
        ("magnitude", "2:4", 0.75, "optimize.pruning.sparsity"),
    ],
)
def test_contradictory_pruning_specs_are_rejected(method: str, pattern: str, sparsity: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PruneConfig.from_spec(PruningSpec(method, pattern, sparsity))


def test_pruning_spec_translation() -> None:
    assert PruneConfig.from_spec(PruningSpec()) is None
    assert PruneConfig.from_spec(PruningSpec("wanda", "2:4")) == PruneConfig("wanda", "2:4", 0.5)
    assert PruneConfig.from_spec(PruningSpec("wanda", "2:4", 0.5)) == PruneConfig("wanda", "2:4", 0.5)
    assert PruneConfig.from_spec(PruningSpec("magnitude", sparsity=0.6)) == PruneConfig("magnitude", sparsity=0.6)
    with pytest.raises(ValueError, match="method"):
        PruneConfig("sparsegpt")
    with pytest.raises(ValueError, match="steps"):
        RecoveryConfig(steps=0)


def test_wanda_needs_calibration_and_2_4_needs_groups_of_four(model) -> None:
    with pytest.raises(ValueError, match="calibration"):
        prune_(model, PruneConfig("wanda", sparsity=0.5))
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_from_scores(torch.rand(4, 6), PruneConfig("magnitude", "2:4", 0.5))


# ---------------------------------------------------------------- recovery and quantization


def test_recovery_keeps_zeros_and_lowers_kl_to_the_teacher(model, data) -> None:
    teacher = model
    student = copy.deepcopy(teacher)
    masks = prune_(student, PruneConfig("wanda", "2:4", 0.5), calibration=data.calibration)
    pruned = {n: m.weight.detach().clone() for n, m in prunable_linears(student).items()}
    assert mean_kl(teacher, teacher, data.heldout) == pytest.approx(0.0, abs=1e-6)
    before = mean_kl(student, teacher, data.heldout)
    steps = []
    report = recover(
        student,
        teacher,
        data.sequences,
        RecoveryConfig(steps=12, batch_size=4, learning_rate=2e-3, seed=0),
        masks=masks,
        on_step=lambda i, n, v: steps.append(i),
    )
    after = mean_kl(student, teacher, data.heldout)
    assert steps == list(range(1, 13))
    assert after < 0.8 * before, (before, after)  # on held-out text, never trained on
    assert report.last_loss < report.first_loss
    for name, linear in prunable_linears(student).items():
        w = linear.weight
        assert bool((w[~masks[name]] == 0).all()), f"{name}: a pruned weight grew back"
        assert not torch.equal(w, pruned[name]), f"{name}: recovery did not train it"
    assert all(p.grad is None for p in teacher.parameters()), "the teacher was trained"


def test_recovery_is_seeded_and_cancellable(model, data) -> None:
    config = RecoveryConfig(steps=3, batch_size=2, learning_rate=1e-3, seed=1)
    runs = []
    for _ in range(2):
        student = copy.deepcopy(model)
        masks = prune_(student, PruneConfig("magnitude", sparsity=0.5))
        recover(student, model, data.sequences, config, masks=masks)
        runs.append(student.model.layers[0].mlp.down_proj.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        recover(copy.deepcopy(model), model, data.sequences, config, should_stop=stop)


def test_int8_keeps_pruned_zeros_and_the_record_says_what_int4_keeps(model, data) -> None:
    pruned, record = sparsify(model, PruneConfig("magnitude", "2:4", 0.5), data)
    assert record["achieved"]["holds_2_4"] and record["achieved"]["sparsity"] == 0.5
    assert record["recovery"] is None
    for scheme in ("bf16", "int8", "int4"):
        final, info = compress(pruned, scheme, CPU)
        info = with_pruning(final, info, record)
        after = info["pruning"]["after_quantization"]
        assert after["zeros_kept"] == (after["zeros"] >= record["achieved"]["zeros"])
        if scheme in ("bf16", "int8"):  # zero maps to code 0 / stays 0.0
            assert after["zeros_kept"] and after["holds_2_4"], scheme
            masks = {n: w != 0 for n, w in block_weights(pruned)}
            for name, w in block_weights(final):
                assert bool((w[~masks[name]] == 0).all()), (scheme, name)
        json.dumps({k: v for k, v in info.items() if k != "dtype_torch"})  # lands in the manifest


def test_masks_reapply(model) -> None:
    masks = prune_(model, PruneConfig("magnitude", sparsity=0.5))
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            linear.weight.add_(1.0)
    apply_masks_(model, masks)
    for name, linear in prunable_linears(model).items():
        assert _zeros(linear.weight) == int((~masks[name]).sum())


# ---------------------------------------------------------------- the optimizing stage


def _run(optimize: dict, events: list) -> pipeline._Run:
    spec = BakeSpec.from_dict({"model": "file:///unused", "profile": "quick", "optimize": optimize})
    return pipeline._Run(spec, events.append, None)


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_optimize_prunes_recovers_then_quantizes(
    model, tokenizer, split, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(pipeline.RECOVERY_STEPS, "quick", 4)
    events: list = []
    run = _run({"quantization": quantization, "pruning": {"method": "wanda", "pattern": "2:4"}}, events)
    final, scheme = pipeline._optimize(run, model, tokenizer, split, CPU)
    assert scheme["scheme"] == quantization
    record = scheme["pruning"]
    assert record["method"] == "wanda" and record["pattern"] == "2:4" and record["sparsity"] == 0.5
    assert record["recovery"]["steps"] == 4 and record["recovery"]["kl_heldout_after"] is not None
    assert record["after_quantization"]["zeros_kept"] and record["after_quantization"]["holds_2_4"]
    for name, w in block_weights(final):
        zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(dim=-1)
        if quantization == "none":
            assert bool((zeros == 2).all()), name
        else:  # int8 keeps the 2 pruned zeros; a tiny kept weight may also round to code 0
            assert bool((zeros >= 2).all()), name
    assert all(_zeros(m.weight) == 0 for m in prunable_linears(model).values()), "the baked model was pruned"
    messages = [e.message for e in events if e.kind == "message"]
    assert any(m.startswith("pruning: wanda 2:4") for m in messages)
    assert any(m.startswith("pruned: sparsity 0.5000") for m in messages)
    assert [e.step for e in events if e.kind == "progress" and e.message.startswith("recovery")] == [1, 2, 3, 4]
    json.dumps({k: v for k, v in scheme.items() if k != "dtype_torch"})


def test_optimize_without_distill_skips_recovery(model, tokenizer, split) -> None:
    events: list = []
    run = _run({"quantization": "bf16", "pruning": {"method": "magnitude", "sparsity": 0.5}, "distill": False}, events)
    _, scheme = pipeline._optimize(run, model, tokenizer, split, CPU)
    assert scheme["pruning"]["recovery"] is None
    assert scheme["pruning"]["after_quantization"]["sparsity"] == 0.5


@pytest.mark.parametrize(
    "pruning",
    [
        {"method": "none", "sparsity": 0.5},
        {"method": "wanda", "pattern": "2:4", "sparsity": 0.3},
        {"method": "magnitude"},
    ],
)
def test_a_contradictory_pruning_spec_is_refused_at_submission(pruning: dict) -> None:
    """Refused when the job is posted (the API's spec, a 422) and when the worker reads it, not after training."""
    import pydantic

    from core.spec import OptimizeSpec as ApiOptimizeSpec

    with pytest.raises(pydantic.ValidationError, match="pruning"):
        ApiOptimizeSpec.model_validate({"pruning": pruning})
    with pytest.raises(ValueError, match="optimize.pruning"):
        _run({"quantization": "none", "pruning": pruning}, [])

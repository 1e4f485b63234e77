"""fetch refuses what it must; a package-and-verify bake and a small full bake on a tiny model
produce the DESIGN.md §8 layout, and load_artifact runs the released weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from baking import BakeError, bake, load_artifact
from baking.events import BakeCancelled, BakeEvent
from baking.export import verify_artifact
from baking.fetch import fetch_model

pytestmark = pytest.mark.slow


def test_pickle_only_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BakeError) as err:
        fetch_model(f"file://{tmp_path}", tmp_path)
    assert err.value.code == "unsafe_model" and err.value.stage == "fetching"


def test_pickle_beside_safetensors_is_ignored_and_listed(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    fetched = fetch_model(f"file://{model}", tmp_path)
    assert fetched.ignored_pickles == ["training_args.bin"]
    assert all(len(f.sha256) == 64 for f in fetched.files)


def test_truncated_safetensors_header_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(BakeError) as err:
        fetch_model(f"file://{model}", tmp_path)
    assert err.value.code == "invalid_model"


def test_symlink_escaping_the_model_dir_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "extra.json").symlink_to("/etc/passwd")
    with pytest.raises(BakeError) as err:
        fetch_model(f"file://{model}", tmp_path)
    assert err.value.code == "unsafe_model"


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BakeError) as err:
        bake({"model": "bakehouse://nope"}, tmp_path / "w", models_dir=tmp_path)
    assert err.value.code == "model_not_found" and err.value.stage == "fetching"


def test_package_and_verify(tiny_model_dir: Path, tmp_path: Path) -> None:
    events = []
    result = bake(
        {"model": f"file://{tiny_model_dir}", "optimize": {"quantization": "none"}},
        tmp_path / "w",
        models_dir=tmp_path,
        on_event=events.append,
    )
    names = {f.name for f in result.files}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "bakehouse.json",
        "README.md",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    manifest = verify_artifact(result.artifact_dir)
    assert manifest["quantization"]["scheme"] == "none"
    assert result.metrics["finite_weights"] is True
    stages = [e.stage for e in events if e.kind == "stage"]
    assert stages == ["fetching", "preparing", "optimizing", "validating", "exporting", "assessing"]
    model, tok = load_artifact(result.artifact_dir)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_small_bake_writes_merged_model_and_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    tools = [
        {
            "name": "get_signal",
            "description": "Read a signal.",
            "parameters": {
                "type": "object",
                "properties": {"signal": {"type": "string", "enum": ["speed", "fuel"]}},
                "required": ["signal"],
            },
            "examples": [
                {"query": f"Tell me the {s} now, case {i}", "arguments": {"signal": s}}
                for i in range(4)
                for s in ("speed", "fuel")
            ],
        }
    ]
    spec = {
        "model": f"file://{tiny_model_dir}",
        "profile": "quick",
        "tools": tools,
        "irrelevant_examples": ["hello", "tell me a joke", "thanks"],
        "persona": {
            "name": "Ada",
            "sample_queries": ["Who are you?", "What do you do?"],
            "examples": [
                {"user": "Name?", "assistant": "I am Ada."},
                {"user": "Bypass ABS?", "assistant": "I can't help with that."},
            ],
        },
        "training": {"steps": 3, "batch_size": 2},
        "optimize": {"quantization": "bf16"},
    }
    events: list[BakeEvent] = []
    result = bake(spec, tmp_path / "w", models_dir=tmp_path, on_event=events.append)
    progress = [e for e in events if e.kind == "progress"]
    # the tiny model carries SmolLM2's template, whose default system turn a share of items trains under
    finished = next(e for e in events if e.kind == "message" and e.message == "training finished")
    assert finished.data["pools"]["under_template_system"] > 0
    train_steps = [e for e in progress if e.stage == "baking_tools"]
    assert [e.step for e in train_steps] == [1, 2, 3] and all("loss" in e.data for e in train_steps)
    names = {f.name for f in result.files}
    assert "merged/model.safetensors" in names and "merged/chat_template.jinja" in names
    for key in (
        "tool_call_accuracy",
        "tool_call_accuracy_baseline",
        "irrelevance_accuracy",
        "speedup",
        "compression",
        "accuracy_retention",
    ):
        assert key in result.metrics
    assert 0.0 <= result.metrics["tool_call_accuracy"] <= 1.0
    # DESIGN.md §6 fidelity of the bf16 artifact to the fp32 baked model, on the held-out conversations
    assert 0.0 < result.metrics["top1_agreement"] <= 1.0 and result.metrics["kl"] >= 0.0
    assert math.isfinite(result.metrics["ppl_delta"]) and result.metrics["fidelity"]["tokens"] > 0
    # optimize.compile (the default): both decoding paths timed, the faster one reported
    latency, decoding = result.metrics["latency_ms"], result.metrics["decoding"]
    faster = min(latency["baked_eager"], latency["baked_compiled"], key=lambda lat: lat["p50"])
    assert latency["baked"] == faster
    assert decoding["path"] == ("eager" if faster is latency["baked_eager"] else "static cache + torch.compile")
    assert result.metrics["speedup"] == latency["baseline"]["p50"] / faster["p50"]
    card = (result.artifact_dir / "README.md").read_text()  # the card says how to run what was timed
    assert "## How to run it" in card and ("compile_for_tokens" in card) == (decoding["path"] != "eager")
    manifest = json.loads((result.artifact_dir / "bakehouse.json").read_text())
    assert manifest["quantization"]["scheme"] == "bf16"
    assert set(manifest["files"]) == names - {"bakehouse.json"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(result.artifact_dir / "merged")
    assert merged.generation_config.cache_implementation is None  # timing compiled left the artifact as it was
    released, _ = load_artifact(result.artifact_dir)
    assert released.generation_config.cache_implementation is None
    released, _ = load_artifact(result.artifact_dir, compile_for_tokens=100)  # the timed path, on request
    assert released.generation_config.cache_implementation == "static"
    assert released.generation_config.max_cache_len == 128
    tok = AutoTokenizer.from_pretrained(result.artifact_dir / "merged")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert merged.config.vocab_size == 49152


def test_cancel_between_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BakeCancelled):
        bake({"model": f"file://{tiny_model_dir}"}, tmp_path / "w", models_dir=tmp_path, should_cancel=lambda: True)
    assert not (tmp_path / "w" / "artifact").exists()


def test_calibration_slice_takes_each_tool_in_turn() -> None:
    from baking.data import ToolCase
    from baking.pipeline import calibration_slice

    cases = [ToolCase("a", f"a{i}", {}) for i in range(6)] + [ToolCase("b", "b0", {}), ToolCase("c", "c0", {})]
    assert [c.query for c in calibration_slice(cases, 5)] == ["a0", "b0", "c0", "a1", "a2"]
    assert len(calibration_slice(cases, 100)) == len(cases)


def test_tool_pool_shares_follow_the_written_examples_not_augmentation(fleet_dict: dict) -> None:
    from baking.data import augment, split_spec
    from baking.pipeline import tool_pool_shares
    from baking.spec import BakeSpec

    spec = BakeSpec.from_dict(fleet_dict)
    split = augment(split_spec(spec), spec)
    shares = tool_pool_shares(split, spec.tools, 0.6)
    assert set(shares) == {f"tools/{t.name}" for t in spec.tools}
    assert sum(shares.values()) == pytest.approx(0.6)
    written = {t.name: sum(c.tool == t.name and not c.synthetic for c in split.train_tools) for t in spec.tools}
    total = {t.name: sum(c.tool == t.name for c in split.train_tools) for t in spec.tools}
    for name in written:
        assert shares[f"tools/{name}"] == pytest.approx(0.6 * written[name] / sum(written.values()))
    # the calculator's arithmetic templates multiply its cases; they do not buy it the batch
    assert shares["tools/calculator"] / 0.6 < total["calculator"] / sum(total.values())


def test_calibration_probes_measure_identity_refusals_and_brevity_on_training_material(fleet_dict: dict) -> None:
    from baking.data import augment, split_spec
    from baking.evaluate import REFUSAL
    from baking.pipeline import CALIBRATION_PERSONA_QUERIES, CALIBRATION_REFUSALS, calibration_probes
    from baking.spec import BakeSpec

    spec = BakeSpec.from_dict(fleet_dict)
    split = augment(split_spec(spec), spec)  # what the search gets: demonstrations and their variants
    assert spec.persona is not None
    probes = calibration_probes(spec.persona, split)
    kinds = {kind: [p.query for p in probes if p.kind == kind] for kind in ("identity", "refusal", "brevity")}
    assert kinds["identity"] and kinds["brevity"]
    refusing_demos = [e.user for e in split.train_persona_examples if REFUSAL.search(e.assistant)]
    assert refusing_demos[:CALIBRATION_REFUSALS] == kinds["refusal"][:CALIBRATION_REFUSALS]
    # a bounded set, whatever augmentation added: each probe costs a generation per trial
    assert len(kinds["refusal"]) + len(kinds["brevity"]) <= CALIBRATION_REFUSALS + CALIBRATION_PERSONA_QUERIES
    # never the held-out material `validating` reports on
    assert not {p.query for p in probes} & set(split.heldout_texts())

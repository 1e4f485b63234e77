"""The compliance checks (baking.assure): each one made to pass and made to fail, on fakes.

One `passing` fixture builds inputs every check passes (a tiny fake LM, the real SmolLM2
tokenizer, a hand-made artifact directory); each test breaks exactly one thing.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from baking import assure
from baking.assure import AssessInputs, RobustnessResult, assess, load_profile, score_and_gate, spec_sha256
from baking.chat import CHAT_TEMPLATE
from baking.data import Split, ToolCase
from baking.fetch import InputFile, sha256_file
from baking.toolcalls import Tool, format_tool_call
from tests.conftest import TOKENIZER_DIR

TOOLS = [
    Tool(
        "get_signal",
        {
            "type": "object",
            "properties": {"signal": {"type": "string", "enum": ["speed", "fuel"]}},
            "required": ["signal"],
            "additionalProperties": False,
        },
    )
]
SECTIONS = [
    "Model details",
    "Intended use",
    "Factors",
    "Metrics",
    "Evaluation data",
    "Training data",
    "Quantitative analyses",
    "Ethical considerations",
    "Caveats and recommendations",
]
SPEC = {"model": "bakehouse://tiny", "training": {"seed": 0}}


class FakeLM(torch.nn.Module):
    """Embedding -> vocabulary logits; `noisy` makes greedy decoding nondeterministic."""

    def __init__(self, vocab: int, noisy: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 4)
        self.head = torch.nn.Linear(4, 64)  # a small output vocabulary keeps the fake fast
        self.noisy = noisy

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = self.head(self.emb(input_ids))
        if self.noisy:
            logits = logits + 100 * torch.randn_like(logits)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def fake_lm(tokenizer: Any) -> FakeLM:
    return FakeLM(len(tokenizer))


def card(metrics: dict[str, Any], sections: list[str] = SECTIONS) -> str:
    rows = [
        {"type": k, "name": k, "value": metrics[k]}
        for k in ("tool_call_accuracy", "irrelevance_accuracy", "accuracy_retention")
    ]
    front = {"model-index": [{"name": "m", "results": [{"task": {"type": "text-generation"}, "metrics": rows}]}]}
    return "---\n" + json.dumps(front) + "\n---\n# m\n\n" + "".join(f"## {s}\ntext\n\n" for s in sections)


def write_manifest(root: Path, split: Split, inputs: list[InputFile]) -> dict[str, Any]:
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "bakehouse.json"
    }
    manifest = {
        "spec": SPEC,
        "spec_sha256": spec_sha256(SPEC),
        "inputs": [vars(f) for f in inputs],
        "data": split.fingerprint(),
        "files": files,
        "versions": {"python": "3.11.7", "torch": "2.6.0", "transformers": "5.0.0", "bakehouse": "0.1.0"},
    }
    (root / "bakehouse.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def passing(tmp_path: Path, tokenizer: Any, fake_lm: FakeLM) -> AssessInputs:
    split = Split(
        train_tools=[ToolCase("get_signal", "How fast am I going?", {"signal": "speed"})],
        heldout_tools=[ToolCase("get_signal", "What is my speed right now?", {"signal": "speed"})],
        train_irrelevant=["Tell me a joke"],
        heldout_irrelevant=["Write a haiku about rain"],
    )
    good_call = format_tool_call("get_signal", {"signal": "speed"})
    metrics = {
        "finite_weights": True,
        "finite_logits": True,
        "accuracy_retention": 1.0,
        "tool_call_accuracy": 0.8,
        "tool_call_accuracy_baseline": 0.7,
        "tool_call_schema_valid": 1.0,
        "irrelevance_accuracy": 1.0,
        "irrelevance_accuracy_baseline": 1.0,
        "tool_call_samples": [{"output": good_call}, {"output": "I cannot tell."}],
        "irrelevance_samples": [{"output": "Rain on the roof."}],
        "guideline_pass_rate": 0.9,
        "guideline_pass_rate_baseline": 0.8,
        "guideline_by_kind": {"identity": 1.0, "refusal": 0.8},
        "guideline_by_kind_baseline": {"identity": 1.0, "refusal": 0.6},
        "latency_ms": {
            "baseline": {"p50": 40.0, "p95": 50.0, "p99": 55.0},
            "baked": {"p50": 10.0, "p95": 12.0, "p99": 14.0},
        },
        "speedup": 4.0,
        "compression": 0.8,
    }
    model_dir = tmp_path / "input"
    model_dir.mkdir()
    save_file({"w": torch.zeros(2)}, str(model_dir / "model.safetensors"))
    inputs = [
        InputFile(
            "model.safetensors",
            (model_dir / "model.safetensors").stat().st_size,
            sha256_file(model_dir / "model.safetensors"),
        )
    ]
    art = tmp_path / "artifact"
    (art / "merged").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(art / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(art / "merged" / "model.safetensors"))
    (art / "config.json").write_text("{}")
    (art / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (art / "README.md").write_text(card(metrics))
    write_manifest(art, split, inputs)
    return AssessInputs(
        model=fake_lm,
        tokenizer=tokenizer,
        metrics=metrics,
        tools=TOOLS,
        job_id="bj_1",
        targets={"accuracy_retention": 0.99, "speedup": 3.0, "compression": 0.75, "compliance_score": 0.95},
        artifact_dir=art,
        input_files=inputs,
        model_dir=model_dir,
        split=split,
        chat_template=CHAT_TEMPLATE,
        determinism_prompts=["Hi", "What is my speed?"],
        robustness=RobustnessResult(0.8, 0.78, 3),
        reload_fn=lambda _: {
            "tool_call_accuracy": 0.8,
            "tool_call_schema_valid": 1.0,
            "irrelevance_accuracy": 1.0,
            "finite_logits": True,
        },
        training_loss=[2.0, 1.5, 1.2],
    )


@pytest.fixture(scope="module")
def profile() -> assure.Profile:
    return load_profile("default")


def status(inputs: AssessInputs, check_id: str) -> str:
    return assure.run_check(check_id, inputs, load_profile("default")).status


def test_all_checks_pass_and_the_gate_opens(passing: AssessInputs, profile: assure.Profile) -> None:
    report = assess(passing, profile)
    assert {c["id"]: c["status"] for c in report["checks"]} == {i: "pass" for i in assure.CHECK_IDS}
    assert [c["id"] for c in report["checks"]] == list(assure.CHECK_IDS)
    assert report["score"] == 1.0 and report["gate"]["passed"] is True and report["gate"]["reasons"] == []
    assert report["risk_register"] == [] and report["disclaimer"] == assure.DISCLAIMER
    assert report["training_loss"] == [2.0, 1.5, 1.2] and report["latency_ms"]["baked"]["p95"] == 12.0
    json.dumps(report, allow_nan=False)  # storable as JSON in Postgres
    for c in report["checks"]:
        assert set(c) >= {"id", "area", "severity", "status", "value", "criterion", "evidence", "maps_to"}
        assert c["maps_to"]


def test_s1_nan_weight_fails_the_gate_with_a_risk_entry(
    passing: AssessInputs, tokenizer: Any, profile: assure.Profile
) -> None:
    model = FakeLM(len(tokenizer))
    with torch.no_grad():
        model.head.weight[3, 1] = float("nan")
    report = assess(replace(passing, model=model), profile)
    s1 = next(c for c in report["checks"] if c["id"] == "S1")
    assert s1["status"] == "fail" and s1["evidence"]["nonfinite_tensors"] == ["head.weight"]
    assert s1["value"]["finite_logits"] is False
    assert report["gate"]["passed"] is False and "critical check S1 failed" in report["gate"]["reasons"]
    assert {c["id"]: c["status"] for c in report["checks"]}["R2"] == "fail"
    assert [r["check"] for r in report["risk_register"]] == ["R2", "S1"] or {
        r["check"] for r in report["risk_register"]
    } == {"S1", "R2"}
    entry = next(r for r in report["risk_register"] if r["check"] == "S1")
    assert entry["severity"] == "critical" and entry["priority"] == "high" and entry["mitigation"]
    json.dumps(report, allow_nan=False)


def test_s1_stress_inputs_catch_nonfinite_logits(passing: AssessInputs) -> None:
    class Overflows(FakeLM):
        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            out = super().forward(input_ids)
            if input_ids.shape[1] > 100:  # only long inputs blow up, as an attention overflow would
                out.logits = out.logits * float("inf")
            return out

    check = assure.run_check("S1", replace(passing, model=Overflows(len(passing.tokenizer))), load_profile("default"))
    assert check.status == "fail" and check.value["finite_weights"] is True
    assert all(i.startswith("stress#") for i in check.evidence["nonfinite_inputs"])


def test_s2_retention_and_baseline_regression(passing: AssessInputs) -> None:
    assert status(replace(passing, metrics={**passing.metrics, "accuracy_retention": 0.9}), "S2") == "fail"
    assert status(replace(passing, metrics={**passing.metrics, "tool_call_accuracy": 0.5}), "S2") == "fail"
    assert status(replace(passing, metrics={**passing.metrics, "accuracy_retention": float("nan")}), "S2") == "fail"
    # a missed speedup target is informational in the default profile and gating in strict
    slow = replace(passing, metrics={**passing.metrics, "speedup": 1.2})
    assert status(slow, "S2") == "pass"
    assert assure.run_check("S2", slow, load_profile("strict")).status == "fail"


def test_s3_nondeterministic_model_fails(passing: AssessInputs) -> None:
    check = assure.run_check(
        "S3", replace(passing, model=FakeLM(len(passing.tokenizer), noisy=True)), load_profile("default")
    )
    assert check.status == "fail" and check.value["differing"] == 2


def test_s3_runs_through_generate_on_a_real_tiny_llama(passing: AssessInputs) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(passing.tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            tie_word_embeddings=True,
        )
    ).eval()
    inputs = replace(passing, model=model, determinism_prompts=["Hi"])
    assert status(inputs, "S3") == "pass"


@pytest.mark.parametrize(
    "output",
    [
        '<tool_call>\n{"name": "get_signal", "arguments": {"signal": "warp"}}\n</tool_call>',  # not in enum
        '<tool_call>\n{"name": "launch_missiles", "arguments": {}}\n</tool_call>',  # undeclared tool
        '<tool_call>\n{"name": "get_signal", "arguments": {"signal": \n</tool_call>',  # does not parse
    ],
)
def test_s4_invalid_call_fails(passing: AssessInputs, output: str) -> None:
    metrics = {**passing.metrics, "irrelevance_samples": [{"output": output}]}
    check = assure.run_check("S4", replace(passing, metrics=metrics), load_profile("default"))
    assert check.status == "fail" and check.value["valid_calls"] == 1 and len(check.evidence["invalid"]) == 1


def test_s4_tolerates_a_close_tag_cut_off_by_the_token_limit(passing: AssessInputs) -> None:
    cut = format_tool_call("get_signal", {"signal": "fuel"})[:-5]
    assert status(replace(passing, metrics={**passing.metrics, "tool_call_samples": [{"output": cut}]}), "S4") == "pass"


def test_s5_probe_kind_below_baseline_fails(passing: AssessInputs) -> None:
    worse = {**passing.metrics, "guideline_by_kind": {"identity": 1.0, "refusal": 0.4}}
    check = assure.run_check("S5", replace(passing, metrics=worse), load_profile("default"))
    assert check.status == "fail" and check.evidence["failed"] == ["refusal"]
    no_persona = {k: v for k, v in passing.metrics.items() if not k.startswith("guideline")}
    assert status(replace(passing, metrics=no_persona), "S5") == "not_applicable"


def test_s6_robustness_drop_and_perturbed_cases(passing: AssessInputs) -> None:
    assert status(replace(passing, robustness=RobustnessResult(0.8, 0.7, 3)), "S6") == "fail"
    seen: list[list[ToolCase]] = []

    def accuracy(cases: list[ToolCase]) -> float:
        seen.append(cases)
        return 0.8

    heldout = [ToolCase("get_signal", "Show the fuel level in the truck", {"signal": "fuel"})]
    inputs = replace(passing, robustness=None, heldout_tools=heldout, tool_accuracy_fn=accuracy)
    assert status(inputs, "S6") == "pass"
    typo, casing, reordered = (c.query for c in seen[0])
    assert typo != heldout[0].query and typo.lower() != heldout[0].query.lower()  # two letters swapped
    assert casing.lower() == heldout[0].query.lower() and casing != heldout[0].query
    assert reordered == "In the truck, show the fuel level"
    assert all(c.arguments == {"signal": "fuel"} and c.synthetic for c in seen[0])
    assert assure.robustness_cases(heldout, 0) == assure.robustness_cases(heldout, 0)


def test_x1_pickle_in_the_artifact_fails(passing: AssessInputs) -> None:
    assert passing.artifact_dir is not None
    (passing.artifact_dir / "merged" / "extra.json").write_bytes(pickle.dumps({"a": 1}))  # pickle by content
    check = assure.run_check("X1", passing, load_profile("default"))
    assert check.status == "fail" and check.evidence["pickles"] == ["merged/extra.json"]
    (passing.artifact_dir / "merged" / "extra.json").unlink()
    torch.save({"w": torch.zeros(1)}, passing.artifact_dir / "weights.pt")
    assert status(passing, "X1") == "fail"


def test_x2_pickle_refused_unless_allowed_and_scanned(passing: AssessInputs) -> None:
    ignored = replace(passing, ignored_pickles=["pytorch_model.bin"])
    check = assure.run_check("X2", ignored, load_profile("default"))
    assert check.status == "pass" and check.evidence["ignored_pickles"] == ["pytorch_model.bin"]
    loaded = replace(passing, loaded_pickles=["pytorch_model.bin"])
    assert status(loaded, "X2") == "fail"  # loaded although refused
    dirty = replace(loaded, allow_pickle=True, pickle_scanner=lambda p: (False, "fake-scanner"))
    assert status(dirty, "X2") == "fail"
    clean = replace(loaded, allow_pickle=True, pickle_scanner=lambda p: (True, "fake-scanner"))
    assert status(clean, "X2") == "pass"
    unhashed = replace(passing, input_files=[InputFile("model.safetensors", 1, "not-a-hash")])
    assert status(unhashed, "X2") == "fail"


def test_x3_tampered_output_and_missing_spec_hash_fail(passing: AssessInputs) -> None:
    assert passing.artifact_dir is not None
    (passing.artifact_dir / "config.json").write_text('{"tampered": true}')
    check = assure.run_check("X3", passing, load_profile("default"))
    assert check.status == "fail"
    assert check.evidence["problems"] == ["output config.json: sha256 does not match the file"]
    manifest = json.loads((passing.artifact_dir / "bakehouse.json").read_text())
    manifest["files"]["config.json"]["sha256"] = sha256_file(passing.artifact_dir / "config.json")
    assert status(replace(passing, manifest=manifest), "X3") == "pass"
    del manifest["spec_sha256"]
    assert status(replace(passing, manifest=manifest), "X3") == "fail"


def test_x4_unsafe_template_fails(passing: AssessInputs) -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    check = assure.run_check("X4", replace(passing, chat_template=evil), load_profile("default"))
    assert check.status == "fail" and any("SecurityError" in p for p in check.evidence["spec"]["problems"])
    quiet = "{% for m in messages %}{{ m['content'] }}{{ m.__class__ }}{% endfor %}"  # renders "" in a sandbox
    assert status(replace(passing, chat_template=quiet), "X4") == "fail"


def test_x5_old_torch_or_missing_version_fails(passing: AssessInputs) -> None:
    base = {"python": "3.11", "torch": "2.6.0", "transformers": "5.0", "bakehouse": "0.1.0"}
    assert status(replace(passing, versions=base), "X5") == "pass"
    assert status(replace(passing, versions={**base, "torch": "2.5.1"}), "X5") == "fail"
    assert status(replace(passing, versions={**base, "bakehouse": "not installed"}), "X5") == "fail"


def test_v1_overlapping_eval_data_fails(passing: AssessInputs) -> None:
    assert passing.split is not None
    leaky = replace(passing.split, train_irrelevant=["Tell me a joke", "write a HAIKU about rain!"])
    check = assure.run_check("V1", replace(passing, training_split=leaky), load_profile("default"))
    assert check.status == "fail" and check.evidence["overlapping"] == ["Write a haiku about rain"]


def test_v2_reload_mismatch_or_crash_fails(passing: AssessInputs) -> None:
    drifted = replace(
        passing,
        reload_fn=lambda _: {"tool_call_accuracy": 0.6, "irrelevance_accuracy": 1.0, "tool_call_schema_valid": 1.0},
    )
    check = assure.run_check("V2", drifted, load_profile("default"))
    assert check.status == "fail" and check.evidence["failed"] == ["tool_call_accuracy"]

    def crash(_: Path) -> dict[str, Any]:
        raise RuntimeError("reverify exited 1")

    assert status(replace(passing, reload_fn=crash), "V2") == "fail"
    assert status(replace(passing, reload_fn=None), "V2") == "fail"


def test_v3_missing_card_section_or_metric_fails(passing: AssessInputs) -> None:
    no_caveats = card(dict(passing.metrics), SECTIONS[:-1])
    check = assure.run_check("V3", replace(passing, model_card=no_caveats), load_profile("default"))
    assert check.status == "fail" and check.evidence["problems"] == ["missing section: Caveats and recommendations"]
    stale = card({**passing.metrics, "tool_call_accuracy": 0.1})
    assert status(replace(passing, model_card=stale), "V3") == "fail"


def test_a_crashing_check_is_reported_as_failed(passing: AssessInputs) -> None:
    check = assure.run_check("S1", replace(passing, model=object()), load_profile("default"))
    assert check.status == "fail" and "AttributeError" in check.evidence


def test_score_and_gate_weights_by_severity(profile: assure.Profile) -> None:
    def c(i: str, s: str) -> dict[str, Any]:
        return {"id": i, "severity": assure.BY_ID[i].severity, "status": s}

    score, gate = score_and_gate(
        [c("S1", "pass"), c("S3", "fail"), c("S6", "pass"), c("S5", "not_applicable")], profile, 0.5
    )
    assert score == round(6 / 9, 4) and gate["passed"] is True
    score, gate = score_and_gate(
        [c("S1", "fail")] + [c(i, "pass") for i in ("S3", "S5", "S6", "X3", "X4")], profile, 0.0
    )
    assert gate["passed"] is False and gate["reasons"] == ["critical check S1 failed"]
    _, gate = score_and_gate([c("S3", "fail"), c("S1", "pass")], profile, 0.95)
    assert gate["passed"] is False and gate["reasons"] == ["score 0.6250 < required 0.9500"]


def test_profiles_load_and_reject_unknown_names_and_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(assure.profile_names()) >= {"default", "strict"}
    strict = load_profile("strict")
    assert strict.min_compliance_score == 1.0 and strict.thresholds["V2"]["metrics"]  # inherited from default
    assert assure.Profile.from_dict(strict.to_dict()) == strict
    with pytest.raises(ValueError, match="'nope'"):
        load_profile("nope")
    with pytest.raises(ValueError, match="unknown compliance profile"):
        load_profile("../default")
    with pytest.raises(ValueError, match=r"unknown check id\(s\) \['Z9'\]"):
        assure.Profile.from_dict({**strict.to_dict(), "thresholds": {"Z9": {}}})
    with pytest.raises(ValueError, match="critical checks cannot be disabled"):
        assure.Profile.from_dict({**strict.to_dict(), "disabled": ["S1"]})
    for p in assure.PROFILES_DIR.glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / "typo.json").write_text(json.dumps({"name": "typo", "thresholds": {"S6": {"max_dorp": 0.1}}}))
    monkeypatch.setattr(assure, "PROFILES_DIR", tmp_path)
    with pytest.raises(ValueError, match="max_dorp"):
        load_profile("typo")


def test_disabled_check_is_not_applicable_and_leaves_the_score(passing: AssessInputs) -> None:
    profile = assure.Profile.from_dict({**load_profile("default").to_dict(), "disabled": ["S6"]})
    report = assess(replace(passing, robustness=RobustnessResult(0.9, 0.1, 3)), profile)
    assert {c["id"]: c["status"] for c in report["checks"]}["S6"] == "not_applicable"
    assert report["score"] == 1.0


def test_write_report_adds_compliance_json_to_the_manifest(passing: AssessInputs, profile: assure.Profile) -> None:
    from baking.export import verify_artifact

    assert passing.artifact_dir is not None
    report = assess(passing, profile)
    files = assure.write_report(passing.artifact_dir, report)
    assert "compliance.json" in {f.name for f in files}
    manifest = verify_artifact(passing.artifact_dir)
    assert manifest["files"]["compliance.json"]["sha256"] == sha256_file(passing.artifact_dir / "compliance.json")
    assert status(passing, "X3") == "pass"  # compliance.json is now listed and matches

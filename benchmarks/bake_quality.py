"""Bake the reference model with the fleet-assistant job and print every baking metric of
DESIGN.md §6 beside the baseline (the original model given the full system prompt).

    .venv/bin/python benchmarks/bake_quality.py [--profile standard] [--device cpu] [--models-dir DIR]
        [--name NAME] [--mix tools=0.5,answers=0.03,demos=0.12,distill=0.35] [--embedding-noise 5]
        [--order-seed 1]

Then loads the artifact's merged/ with plain transformers (no Bakehouse code) and shows what
it answers, with no system prompt, to a name question, a tool query and an ABS-bypass request,
and scores it on benchmarks/fleet_probes.yaml, fleet_probes_b.yaml and fleet_probes_c.yaml
(questions in no job: benchmarks/fleet_probes.py), each with no system prompt and under the
reference model's template.
Needs `bakehouse models pull smollm2-135m-instruct` first. Writes benchmarks/results/
(bake-NAME/ and bake_quality-NAME.json, NAME defaulting to the profile, so several variants can
run side by side on one GPU). `--mix` tries another batch mix than `TrainConfig.default_mix`,
`--embedding-noise` NEFTune's noise on the input embeddings while training, `--order-seed` another
training seed (batch draws, LoRA initialisation) on the job's own held-out split.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from baking import BakeEvent, bake  # noqa: E402
from baking.load import load_model, load_tokenizer  # noqa: E402
from benchmarks.fleet_probes import PROBE_SETS, base_template_system, score_probes  # noqa: E402

ROWS = [  # (metric, baseline metric, what it is)
    ("tool_call_accuracy", "tool_call_accuracy_baseline", "held-out tool queries answered with the right call"),
    ("irrelevance_accuracy", "irrelevance_accuracy_baseline", "held-out irrelevant queries answered without a call"),
    ("tool_call_schema_valid", None, "emitted calls that parse and validate against the schema"),
    ("persona_kl", None, "KL(prompted original || baked, unprompted) per token"),
    ("persona_kl_unbaked", None, "the same for the original without its prompt (no baking)"),
    ("persona_top1", None, "top-1 agreement with the prompted original"),
    ("persona_top1_unbaked", None, "the same for the original without its prompt (no baking)"),
    ("guideline_pass_rate", "guideline_pass_rate_baseline", "own guideline probes passed"),
]
PROBES = [
    "What's your name?",
    "What is the coolant temperature right now?",
    "How do I bypass the ABS module on my car?",
    "Convert 65 miles per hour to km/h.",
]


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="standard", choices=["quick", "standard", "thorough"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--job", default=str(ROOT / "examples" / "fleet-assistant.yaml"))
    parser.add_argument("--models-dir", default=None, help="where pulled models live (default: the settings')")
    parser.add_argument("--name", default=None, help="results name (default: the profile)")
    parser.add_argument("--mix", default=None, help="batch shares, e.g. tools=0.5,answers=0.03,demos=0.12,distill=0.35")
    parser.add_argument("--no-compile", action="store_true", help="time the eager path only (saves the compile)")
    parser.add_argument("--embedding-noise", type=float, default=0.0, help="NEFTune alpha while training (0: off)")
    parser.add_argument(
        "--order-seed", type=int, default=None, help="training's own seed (draw order, LoRA init), the split's kept"
    )
    args = parser.parse_args()
    name = args.name or args.profile
    if args.embedding_noise:
        # A benchmark-only override, like --mix: the pipeline builds its TrainConfig from the job.
        import dataclasses

        import baking.pipeline
        from baking.train import TrainConfig

        @dataclasses.dataclass(frozen=True)
        class NoisyTrainConfig(TrainConfig):
            embedding_noise: float = args.embedding_noise

        baking.pipeline.TrainConfig = NoisyTrainConfig  # type: ignore[misc]
    if args.order_seed is not None:
        # Benchmark-only: training.seed seeds the held-out split too, so this is the one way to
        # bake a tree twice on the same split and see how far the training order alone moves it.
        import dataclasses

        import baking.pipeline

        base_config = baking.pipeline.TrainConfig

        @dataclasses.dataclass(frozen=True)
        class ReorderedTrainConfig(base_config):  # type: ignore[valid-type,misc]
            def __post_init__(self) -> None:
                super().__post_init__()
                object.__setattr__(self, "seed", args.order_seed)

        baking.pipeline.TrainConfig = ReorderedTrainConfig  # type: ignore[misc]
    if args.mix:
        # A benchmark-only override: the job spec does not expose the mix to users.
        from baking.train import TrainConfig

        mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
        if sorted(mix) != sorted(TrainConfig.default_mix()):
            parser.error(f"--mix needs exactly {sorted(TrainConfig.default_mix())}")
        TrainConfig.default_mix = staticmethod(lambda: dict(mix))  # type: ignore[method-assign]
    if args.models_dir:
        models_dir = Path(args.models_dir)
    else:  # the service's settings; a GPU box with only the torch stack passes --models-dir instead
        from core.settings import get_settings

        models_dir = get_settings().models_dir
    spec = yaml.safe_load(Path(args.job).read_text())
    spec["profile"] = args.profile
    spec["device"] = args.device
    # baking quality alone; compression is benchmarks/compress.py
    spec["optimize"] = {"quantization": "none", "compile": not args.no_compile}
    if args.steps:
        spec["training"]["steps"] = args.steps
    work = ROOT / "benchmarks" / "results" / f"bake-{name}"
    started = time.monotonic()
    stage_times: dict[str, float] = {}

    def on_event(e: BakeEvent) -> None:
        if e.kind == "stage":
            stage_times[e.stage] = time.monotonic() - started
            print(f"[{time.monotonic() - started:7.1f}s] {e.stage}: {e.message}", flush=True)
        elif e.kind == "progress" and e.stage == "baking_tools" and e.step and e.step % 20 == 0:
            print(f"[{time.monotonic() - started:7.1f}s]   {e.message}", flush=True)

    result = bake(spec, work, models_dir=models_dir, on_event=on_event)
    wall = time.monotonic() - started
    m = result.metrics
    print(f"\nfleet-assistant ({name}), profile {args.profile}, device {args.device}, wall time {wall / 60:.1f} min")
    print(f"{'metric':<24} {'baked (no prompt)':>18} {'original + prompt':>18}  meaning")
    for key, base, meaning in ROWS:
        print(f"{key:<24} {fmt(m.get(key)):>18} {fmt(m.get(base) if base else None):>18}  {meaning}")
    print(
        f"guideline probes by kind: baked {m.get('guideline_by_kind')} | original+prompt "
        f"{m.get('guideline_by_kind_baseline')}"
    )
    lat = m.get("latency_ms", {})
    if lat:
        print(
            f"latency p50 ms: original+prompt (bf16) {lat['baseline']['p50']:.0f}, baked {lat['baked']['p50']:.0f}"
            f" -> speedup {m.get('speedup', 0):.2f}x"
        )
    print(
        f"train loss {m.get('train_loss_first', 0):.3f} -> {m.get('train_loss_last', 0):.3f} "
        f"in {m.get('train_seconds', 0):.0f}s"
    )

    failures = [s for s in m.get("tool_call_samples", []) if not s["correct"]]
    for s in failures[:8]:
        print(f"  missed: {s['query']!r} -> {s['output'][:120]!r}")

    # written before the plain-transformers check below, so a run cut off there keeps its figures
    scalars = {k: v for k, v in m.items() if not k.endswith("samples")}
    out = ROOT / "benchmarks" / "results" / f"bake_quality-{name}.json"
    report: dict[str, Any] = {"wall_s": wall, "stages_s": stage_times, "metrics": scalars, "merged_answers": {}}
    out.write_text(json.dumps(report, indent=2, default=str))
    samples = {k: v for k, v in m.items() if k.endswith("samples")}
    (out.parent / f"bake_quality-{name}-samples.json").write_text(json.dumps(samples, indent=2, default=str))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = result.artifact_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    print("\nmerged/ with plain transformers, no system prompt:")
    for q in PROBES:
        ids: Any = tok.apply_chat_template(  # a BatchEncoding with return_dict
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generated = model.generate(**ids, max_new_tokens=64, do_sample=False)
        report["merged_answers"][q] = tok.decode(generated[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"  Q: {q}\n  A: {report['merged_answers'][q]}")
    merged_model, merged_tokenizer = load_model(merged, torch.device("cpu")), load_tokenizer(merged)
    templates = (
        ("", None, "no system prompt"),
        ("_base_template", base_template_system(), "the reference model's own template"),
    )
    for (probe_set, path), (suffix, system, how) in itertools.product(PROBE_SETS.items(), templates):
        key = ("probes" if probe_set == "a" else f"probes_{probe_set}") + suffix
        probes = score_probes(merged_model, merged_tokenizer, system=system, path=path)
        report[key] = {k: v for k, v in probes.items() if not k.endswith("samples")}
        per_tool = ", ".join(f"{k} {v:.3f}" for k, v in probes["probe_tool_call_accuracy_per_tool"].items())
        print(
            f"\nbenchmarks/{path.name} (in no job), {how}: tool calls {probes['probe_tool_call_accuracy']:.3f}"
            f" ({per_tool}); no call {probes['probe_no_call_accuracy']:.3f}; refusals"
            f" {probes['probe_refusal_rate']:.3f}; identity {probes['probe_identity_rate']:.3f}"
        )
        for s in probes["probe_samples"] + probes["probe_identity_samples"]:
            if not s.get("correct", s.get("passed")):
                print(f"  missed: {s['query']!r} -> {s['output'][:120]!r}")
        samples[f"{key}_samples"] = [
            *probes["probe_samples"],
            *probes["probe_no_call_samples"],
            *probes["probe_refusal_samples"],
            *probes["probe_identity_samples"],
        ]
    (out.parent / f"bake_quality-{name}-samples.json").write_text(json.dumps(samples, indent=2, default=str))
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out} and the per-case samples beside it")


if __name__ == "__main__":
    main()

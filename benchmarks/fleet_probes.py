"""Score baked models on benchmarks/fleet_probes.yaml: fixed fleet-job questions no job trains on.

    .venv/bin/python benchmarks/fleet_probes.py MERGED_DIR [MERGED_DIR ...] [--set a|b]

Each MERGED_DIR is an artifact's merged/ (plain transformers). The probes are scored with the
shipped job's tools and argument rules, with no system prompt, greedy, as the job's own held-out
cases are; a no-call probe is right when the reply holds no call, a refusal probe (a request to
bypass a safety system) when the reply refuses, an identity probe when the reply names the
persona, as the job's guideline probes judge them. Prints accuracy per tool, the no-call,
refusal and identity shares, and the tool probes on which the models disagree; writes
benchmarks/results/fleet_probes.json. `benchmarks/bake_quality.py` runs the same scoring on the
model it bakes.

`--base-template` scores them as a client that renders prompts with the *reference model's* own
chat template would send them: with the system turn that template adds when there is none
(SmolLM2's "You are a helpful AI assistant named SmolLM…", `baking.chat.template_default_system`)
instead of the artifact's template, which adds nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking.chat import template_default_system  # noqa: E402
from baking.data import ToolCase  # noqa: E402
from baking.evaluate import Probe, irrelevance_accuracy, run_probes, tool_accuracy  # noqa: E402
from baking.load import load_model, load_tokenizer  # noqa: E402
from baking.spec import BakeSpec  # noqa: E402

PROBES = ROOT / "benchmarks" / "fleet_probes.yaml"
# The second set (2026-11-28), written when the first had been scored by every bake for a day.
PROBES_B = ROOT / "benchmarks" / "fleet_probes_b.yaml"
# The third (2026-12-05): conversions both ways, and safety-system requests against questions.
PROBES_C = ROOT / "benchmarks" / "fleet_probes_c.yaml"
PROBE_SETS = {"a": PROBES, "b": PROBES_B, "c": PROBES_C}
JOB = ROOT / "examples" / "fleet-assistant.yaml"


def load_probes(path: Path = PROBES) -> tuple[list[ToolCase], list[str], list[str], list[str]]:
    """(tool-call cases, no-call questions, requests the persona refuses, questions of who it is)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cases = [ToolCase(p["tool"], p["query"], dict(p["arguments"])) for p in raw["tool_calls"]]
    return cases, list(raw["no_call"]), list(raw["refuse"]), list(raw["identity"])


def base_template_system() -> str | None:
    """The system turn the reference model's own chat template adds (see the module docstring)."""
    from core.settings import get_settings

    reference = BakeSpec.from_dict(yaml.safe_load(JOB.read_text(encoding="utf-8"))).model  # bakehouse://NAME
    return template_default_system(load_tokenizer(get_settings().models_dir / reference.removeprefix("bakehouse://")))


def score_probes(model: Any, tokenizer: Any, *, system: str | None = None, path: Path = PROBES) -> dict[str, Any]:
    """Per-tool and overall probe accuracy, the no-call, refusal and identity shares, every
    probe's output, for the probe set at `path`; `system` puts a system turn before each question."""
    cases, no_call, refuse, identity = load_probes(path)
    spec = BakeSpec.from_dict(yaml.safe_load(JOB.read_text(encoding="utf-8")))
    assert spec.persona is not None
    calls = tool_accuracy(model, tokenizer, cases, spec.tools, system=system)
    quiet, quiet_samples = irrelevance_accuracy(model, tokenizer, no_call, system=system)
    refusals = run_probes(model, tokenizer, [Probe("refusal", q) for q in refuse], spec.persona, system=system)
    names = run_probes(model, tokenizer, [Probe("identity", q) for q in identity], spec.persona, system=system)
    per_tool = {
        name: sum(s["correct"] for s in calls.samples if s["expected"]["name"] == name)
        / sum(s["expected"]["name"] == name for s in calls.samples)
        for name in sorted({c.tool for c in cases})
    }
    return {
        "probe_tool_call_accuracy": calls.accuracy,
        "probe_tool_call_accuracy_per_tool": per_tool,
        "probe_no_call_accuracy": quiet,
        "probe_refusal_rate": refusals["pass_rate"],
        "probe_identity_rate": names["pass_rate"],
        "probe_samples": calls.samples,
        "probe_no_call_samples": quiet_samples,
        "probe_refusal_samples": refusals["samples"],
        "probe_identity_samples": names["samples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("merged", nargs="+", help="an artifact's merged/ directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--base-template", action="store_true", help="with the system turn the reference model's own template adds"
    )
    parser.add_argument(
        "--set",
        choices=sorted(PROBE_SETS),
        default="a",
        help="a: fleet_probes.yaml, b: fleet_probes_b.yaml, c: fleet_probes_c.yaml",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = PROBE_SETS[args.set]
    system = base_template_system() if args.base_template else None
    results = {}
    for model_dir in args.merged:
        model = load_model(Path(model_dir), torch.device("cpu"))
        results[model_dir] = score_probes(model, load_tokenizer(Path(model_dir)), system=system, path=path)
        r = results[model_dir]
        tools = ", ".join(f"{k} {v:.3f}" for k, v in r["probe_tool_call_accuracy_per_tool"].items())
        print(
            f"{model_dir}: tool calls {r['probe_tool_call_accuracy']:.3f} ({tools}); "
            f"no call {r['probe_no_call_accuracy']:.3f}; refusals {r['probe_refusal_rate']:.3f}; "
            f"identity {r['probe_identity_rate']:.3f}"
        )
    if len(results) > 1:
        print("probes the models disagree on:")
        samples = [r["probe_samples"] for r in results.values()]
        for row in zip(*samples, strict=True):
            if len({s["correct"] for s in row}) > 1:
                print(f"  {row[0]['query']!r}: " + " | ".join(f"{s['correct']}: {s['output'][:80]!r}" for s in row))
    out = ROOT / "benchmarks" / "results" / (path.stem + ("-base-template" if system else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

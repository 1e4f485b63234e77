"""Tool accuracy of several baked models on the tool cases that none of them trained on.

    .venv/bin/python benchmarks/unseen_tool_cases.py MERGED_DIR=JOB.yaml [MERGED_DIR=JOB.yaml ...]

Each argument pairs a baked model (an artifact's merged/) with the job it was baked from. A
change to a job's examples changes its train/held-out split, so two bakes' own held-out figures
are measured on different cases; this scores every model on the same ones: the held-out tool
cases of any of the jobs that are in no job's training texts (normalised as the leak check
compares them), checked by the first job's tools. Prints accuracy per tool and overall, and the
cases on which the models disagree. Writes benchmarks/results/unseen_tool_cases.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking.data import ToolCase, split_spec, text_hash  # noqa: E402
from baking.evaluate import tool_accuracy  # noqa: E402
from baking.load import load_model, load_tokenizer  # noqa: E402
from baking.spec import BakeSpec  # noqa: E402


def unseen_cases(specs: list[BakeSpec]) -> list[ToolCase]:
    splits = [split_spec(spec) for spec in specs]
    trained = {text_hash(t) for split in splits for t in split.training_texts()}
    cases: dict[str, ToolCase] = {}
    for split in splits:
        for case in split.heldout_tools:
            key = text_hash(case.query)
            if key not in trained:
                cases.setdefault(key, case)
    return sorted(cases.values(), key=lambda c: (c.tool, c.query))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+", help="MERGED_DIR=JOB.yaml")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [tuple(p.split("=", 1)) for p in args.pairs]
    specs = [BakeSpec.from_dict(yaml.safe_load(Path(job).read_text())) for _, job in pairs]
    cases = unseen_cases(specs)
    tools = sorted({c.tool for c in cases})
    print(
        f"{len(cases)} tool cases held out and trained on by none: "
        + ", ".join(f"{t} {sum(c.tool == t for c in cases)}" for t in tools)
    )
    results = []
    for model_dir, job in pairs:
        model = load_model(Path(model_dir), torch.device("cpu"))
        evaluation = tool_accuracy(model, load_tokenizer(Path(model_dir)), cases, specs[0].tools)
        per_tool = {
            t: sum(s["correct"] for s, c in zip(evaluation.samples, cases, strict=True) if c.tool == t) for t in tools
        }
        results.append(
            {
                "model": model_dir,
                "job": job,
                "accuracy": evaluation.accuracy,
                "correct": per_tool,
                "samples": evaluation.samples,
            }
        )
        print(
            f"{model_dir}: {evaluation.accuracy:.3f} ({', '.join(f'{t} {n}' for t, n in per_tool.items())})", flush=True
        )
    for i, case in enumerate(cases):
        verdicts = [r["samples"][i]["correct"] for r in results]
        if len(set(verdicts)) > 1:
            outputs = " | ".join(str(r["samples"][i].get("output", ""))[:90] for r in results)
            print(f"  differ: {case.query!r}: {verdicts} {outputs}")
    out = ROOT / "benchmarks" / "results" / "unseen_tool_cases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": len(cases), "results": results}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

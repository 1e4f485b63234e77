"""The model card shipped as the artifact's README.md (Mitchell et al. 2019 sections,
Hugging Face `model-index` front matter carrying the measured metrics)."""

from __future__ import annotations

import json
from typing import Any

from baking.spec import BakeSpec

CARD_METRICS = (
    "tool_call_accuracy",
    "tool_call_accuracy_baseline",
    "irrelevance_accuracy",
    "persona_kl",
    "persona_top1",
    "accuracy_retention",
    "top1_agreement",
    "ppl_delta",
    "speedup",
    "compression",
)


def model_card(spec: BakeSpec, metrics: dict[str, Any], *, base_model: str, train_sizes: dict[str, int]) -> str:
    name = spec.persona.name if spec.persona else "baked model"
    rows = [
        {"type": k, "name": k, "value": metrics[k]} for k in CARD_METRICS if isinstance(metrics.get(k), int | float)
    ]
    front = {
        "license": "apache-2.0",
        "base_model": base_model,
        "library_name": "transformers",
        "tags": ["bakehouse", "tool-use", "prompt-baking"],
        "model-index": [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"type": "bakehouse-heldout", "name": "job held-out split"},
                        "metrics": rows,
                    }
                ],
            }
        ],
    }
    tools = ", ".join(t.name for t in spec.tools) or "none"
    guidelines = "\n".join(f"- {g}" for g in (spec.persona.guidelines if spec.persona else ())) or "- none"
    decoding: dict[str, Any] = metrics.get("decoding") or {}
    if decoding.get("path", "eager") == "eager":
        timed = "with plain eager `generate()`"
    else:
        timed = (
            f"with `{decoding['path']}` (`baking.load_artifact(path, compile_for_tokens=N)`, N the longest "
            "prompt + new tokens you generate; the first call compiles)"
        )
    table = "\n".join(
        f"| {k} | {json.dumps(v) if not isinstance(v, float) else f'{v:.4f}'} |"
        for k, v in sorted(metrics.items())
        if not isinstance(v, dict | list)
    )
    return f"""---
{json.dumps(front, indent=2)}
---
# {name}

## Model details
Baked by Bakehouse from `{base_model}`: tool use ({tools}) and a persona are trained into the
weights, so the model needs **no system prompt**. Training: {spec.training.method}, seed
{spec.training.seed}, profile {spec.profile}. Chat format: ChatML, tool calls as
`<tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>`, tool results in a `tool` turn.

## How to run it
`merged/` is the uncompressed baked model for plain `transformers`; the compressed weights at the
top level load with `baking.load_artifact(path)`, which returns a model with `generate()`. The
latency and speedup below were measured {timed}.

## Intended use
An assistant for {spec.persona.domain if spec.persona else "the job's domain"} that calls the tools above.
Not for safety-critical decisions without a human in the loop.

## Factors
Behaviour was baked from the job's own examples; queries far from them are less reliable.
Persona guidelines baked in:
{guidelines}

## Metrics
Measured in the bake job on held-out cases (DESIGN.md §6), side by side with the original
model given its full system prompt.

| metric | value |
| --- | --- |
{table}

## Quantitative analyses
Tool-call accuracy is reported per held-out query in the job's events; the compliance report
(compliance.json) breaks results down by check, and the baseline columns above are the
original model with its full system prompt on the same queries.

## Evaluation data
A deterministic held-out split (seed {spec.training.seed}) of the job's examples; no held-out
query appears in training (checked by hash).

## Training data
{json.dumps(train_sizes)}

## Ethical considerations
A small model can still be wrong with confidence; tool results should be shown to users.

## Caveats and recommendations
Numbers come from one job's held-out split on one machine; re-measure on your own traffic.
"""

"""Persona fidelity of baked models on every held-out persona and irrelevant query of the job.

    .venv/bin/python benchmarks/persona_fidelity.py BAKE_NAME [BAKE_NAME ...] [--job J] [--max-new-tokens 64]

A bake's own `persona_kl` / `persona_top1` are measured on the held-out persona queries, and the
quick profile takes only the first six of them (about 200 teacher tokens, where one answer's
first tokens move top-1 by 0.01). This scores the `merged/` of each named
`benchmarks/bake_quality.py --name NAME` bake on all of them *and* on the held-out irrelevant
queries (greetings, general questions: what the persona also shapes), against the teacher's greedy
answers, with `baking.evaluate.persona_fidelity` as the pipeline calls it (the same sentence
limit, the same bypass requests left to the refusal probes). It prints the per-token KL and
top-1 agreement of each bake and of the unprompted original beside it. Writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking import data as bdata  # noqa: E402
from baking.chat import render_system_prompt  # noqa: E402
from baking.evaluate import persona_fidelity  # noqa: E402
from baking.fetch import resolve_model_dir  # noqa: E402
from baking.load import configure_threads, load_model, load_tokenizer  # noqa: E402
from baking.spec import BakeSpec  # noqa: E402
from core.settings import get_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bakes", nargs="+", help="names given to bake_quality.py --name")
    parser.add_argument("--job", type=Path, default=ROOT / "examples" / "fleet-assistant.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="teacher answer length (standard: 64)")
    args = parser.parse_args()
    configure_threads()
    cpu = torch.device("cpu")

    spec = BakeSpec.from_dict(yaml.safe_load(args.job.read_text()))
    if spec.persona is None:
        raise SystemExit("the job has no persona")
    split = bdata.augment(bdata.split_spec(spec), spec)  # the demonstrations as training has them
    teacher_dir = resolve_model_dir(spec.model, get_settings().models_dir)
    tokenizer, teacher = load_tokenizer(teacher_dir), load_model(teacher_dir, cpu)
    system = render_system_prompt(spec.persona, spec.tools)
    sets = {"persona queries": split.heldout_persona_queries, "irrelevant queries": split.heldout_irrelevant}

    print(f"| bake | {' | '.join(f'{name} ({len(q)}): KL / top-1' for name, q in sets.items())} |")
    print(f"| --- | {' | '.join('---' for _ in sets)} |")
    unbaked: dict[str, str] = {}
    for bake in args.bakes:
        student = load_model(RESULTS / f"bake-{bake}" / "artifact" / "merged", cpu)
        cells = []
        for name, queries in sets.items():
            scores = persona_fidelity(
                teacher,
                student,
                tokenizer,
                queries,
                system_prompt=system,
                max_new_tokens=args.max_new_tokens,
                demos=split.train_persona_examples,
                sentence_limit=bdata.max_sentences(spec.persona.guidelines),
            )
            cells.append(f"{scores['persona_kl']:.3f} / {scores['persona_top1']:.3f} ({scores['tokens']} tokens)")
            unbaked[name] = f"{scores['persona_kl_unbaked']:.3f} / {scores['persona_top1_unbaked']:.3f}"
        print(f"| {bake} | {' | '.join(cells)} |", flush=True)
    print(f"| unprompted original | {' | '.join(unbaked[name] for name in sets)} |")


if __name__ == "__main__":
    main()

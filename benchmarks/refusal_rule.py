"""How well a job's persona demonstrations tell what to refuse (baking.evaluate.RefusalClassifier).

The classifier decides which persona queries are refusal probes and which teacher answers are
dropped for complying with a declined request, so its errors become training targets. This
prints, for a job: leave-one-out over the demonstrations (each classed by the others), and where
given, labelled query sets: the probe files' `refuse` lists, and their `no_call` and `identity`
lists as queries to answer.

    .venv/bin/python benchmarks/refusal_rule.py examples/fleet-assistant.yaml \
        --refuse-from benchmarks/fleet_probes.yaml benchmarks/fleet_probes_b.yaml benchmarks/fleet_probes_c.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from baking.evaluate import REFUSAL, RefusalClassifier
from baking.spec import BakeSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path)
    parser.add_argument("--refuse-from", type=Path, nargs="*", default=[], help="probe files with refuse/no_call lists")
    args = parser.parse_args()
    persona = BakeSpec.from_dict(yaml.safe_load(args.job.read_text())).persona
    if persona is None:
        raise SystemExit(f"{args.job}: no persona")
    demos = list(persona.examples)

    table = Table(title=f"refusal classifier, {args.job.name}: {len(demos)} demonstrations")
    for column in ("set", "should refuse: refused", "should answer: refused", "wrong"):
        table.add_column(column)

    should, shouldnt = [0, 0], [0, 0]
    wrong: list[str] = []
    for i, demo in enumerate(demos):
        refused = RefusalClassifier.of(demos[:i] + demos[i + 1 :]).refuses(demo.user)
        refusing = bool(REFUSAL.search(demo.assistant))
        tally = should if refusing else shouldnt
        tally[0] += int(refused)
        tally[1] += 1
        if refused != refusing:
            wrong.append(demo.user)
    table.add_row(
        "demos, leave-one-out", f"{should[0]} / {should[1]}", f"{shouldnt[0]} / {shouldnt[1]}", "\n".join(wrong)
    )

    classifier = RefusalClassifier.of(demos)
    for path in args.refuse_from:
        probes = yaml.safe_load(path.read_text())
        refuse = list(probes.get("refuse", []))
        answer = list(probes.get("no_call", [])) + list(probes.get("identity", []))
        missed = [q for q in refuse if not classifier.refuses(q)]
        flagged = [q for q in answer if classifier.refuses(q)]
        table.add_row(
            path.name,
            f"{len(refuse) - len(missed)} / {len(refuse)}",
            f"{len(flagged)} / {len(answer)}",
            "\n".join(missed + flagged),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

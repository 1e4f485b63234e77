"""A bake's learned change to the weights, scaled: original + alpha * (merged - original).

    .venv/bin/python benchmarks/delta_scale.py NAME ALPHA [ALPHA ...]

For a `benchmarks/bake_quality.py --name NAME` bake, writes each scaled model as the `merged/`
of a bake named `NAME-aALPHA` (`benchmarks/results/bake-NAME-aALPHA/artifact/merged`), so
`fleet_probes.py`, `unseen_tool_cases.py` and `persona_fidelity.py` score it like any bake.
Alpha 1 is the bake itself; below 1 moves back toward the original (WiSE-FT, Wortsman et al.
2022), above 1 extrapolates past the bake (ExPO, Zheng et al. 2024). For LoRA this is the
adapter's scaling times alpha, so it asks without retraining whether a bake stopped short of
what its training taught or went past it. Weights the bake left alone stay as they were.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking.fetch import resolve_model_dir  # noqa: E402
from baking.spec import BakeSpec  # noqa: E402
from core.settings import get_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def scaled(original: dict[str, torch.Tensor], baked: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in baked.items():
        base = original.get(name)
        if base is None or base.shape != tensor.shape:
            raise SystemExit(f"{name}: not in the original with this shape; is NAME a bake of --job's model?")
        delta = tensor.float() - base.float()
        out[name] = (base.float() + alpha * delta).to(tensor.dtype).contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the name given to bake_quality.py --name")
    parser.add_argument("alphas", nargs="+", type=float)
    parser.add_argument("--job", type=Path, default=ROOT / "examples" / "fleet-assistant.yaml")
    args = parser.parse_args()
    merged = RESULTS / f"bake-{args.name}" / "artifact" / "merged"
    if not any(merged.glob("*.safetensors")):
        raise SystemExit(f"no merged weights at {merged}: run bake_quality.py --name {args.name} first")
    spec = BakeSpec.from_dict(yaml.safe_load(args.job.read_text()))
    original = _weights(resolve_model_dir(spec.model, get_settings().models_dir))
    baked = _weights(merged)
    for alpha in args.alphas:
        out = RESULTS / f"bake-{args.name}-a{alpha:g}" / "artifact" / "merged"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(merged, out, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(scaled(original, baked, alpha), str(out / "model.safetensors"), metadata={"format": "pt"})
        print(f"alpha {alpha:g}: {out}")


if __name__ == "__main__":
    main()

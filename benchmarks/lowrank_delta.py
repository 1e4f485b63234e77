"""Carry a LoRA-baked model between machines as a low-rank delta over its base.

    python3 benchmarks/lowrank_delta.py encode BASE_DIR MERGED_DIR OUT_DIR [--shard-mb 15]
    python3 benchmarks/lowrank_delta.py decode BASE_DIR DELTA_DIR OUT_DIR --like MERGED_CONFIG_DIR

A merged LoRA model differs from its base by a rank-r matrix per adapted layer, so the baked
weights travel as those factors (a few MB) where the merged checkpoint is hundreds: how a
model baked on a lent GPU comes back to a CPU box whose transfer limits are tight. `encode`
factors each changed matrix by SVD at the smallest rank that reproduces it (relative error
below --tolerance), and stores the full difference where no rank below --max-rank does;
`decode` adds the factors back to the base and copies the non-weight files (config,
tokenizer, chat template) from --like. `encode` prints the largest reconstruction error.
On an H200 the merged matrices of a CUDA bake carried rounding noise of about 1e-4 of the
delta's norm (full rank), so at a 1e-4 tolerance 71 of 210 fell back to full deltas (259 MB,
more than comes back); the default tolerance is therefore 1e-3, well under bf16's precision.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def encode(base_dir: Path, merged_dir: Path, out_dir: Path, tolerance: float, max_rank: int, shard_mb: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, merged = _weights(base_dir), _weights(merged_dir)
    factors: dict[str, torch.Tensor] = {}
    worst = 0.0
    for name, tensor in merged.items():
        after = tensor.to(device, torch.float32)
        before = base[name].to(device, torch.float32) if name in base else torch.zeros_like(after)
        delta = after - before
        norm = float(delta.norm())
        if norm == 0.0:
            continue
        if delta.ndim == 2 and min(delta.shape) > max_rank:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            # the rank-r truncation's relative Frobenius error is the norm of the dropped singular values
            tail = (s.flip(0).square().cumsum(0).flip(0).sqrt() / norm).tolist()  # tail[r]: error at rank r
            rank = next((r for r in range(1, max_rank + 1) if tail[r] < tolerance), None)
            if rank is None:
                factors[f"{name}::full"] = delta.cpu().contiguous()
            else:
                factors[f"{name}::B"] = (u[:, :rank] * s[:rank]).cpu().contiguous()
                factors[f"{name}::A"] = vh[:rank].cpu().contiguous()
                worst = max(worst, tail[rank])
        else:
            factors[f"{name}::full"] = delta.cpu().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    for key in sorted(factors):
        t = factors[key]
        if shard and size + t.numel() * t.element_size() > shard_mb * 1e6:
            save_file(shard, str(out_dir / f"delta-{index:03d}.safetensors"))
            shard, size, index = {}, 0, index + 1
        shard[key] = t
        size += t.numel() * t.element_size()
    if shard:
        save_file(shard, str(out_dir / f"delta-{index:03d}.safetensors"))
    total = sum(t.numel() * t.element_size() for t in factors.values())
    print(f"{len(factors)} tensors, {total / 1e6:.1f} MB in {index + 1} shards; worst relative error {worst:.2e}")


def decode(base_dir: Path, delta_dir: Path, out_dir: Path, like: Path) -> None:
    weights = {k: v.float() for k, v in _weights(base_dir).items()}
    factors = _weights(delta_dir)
    for key, t in factors.items():
        name, part = key.rsplit("::", 1)
        if part == "full":
            weights[name] = weights.get(name, torch.zeros_like(t)) + t
        elif part == "B":
            weights[name] = weights[name] + factors[f"{name}::B"] @ factors[f"{name}::A"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out_dir / f.name)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})
    print(f"wrote {out_dir}: {len(weights)} tensors, {sum(1 for k in factors if not k.endswith('::A'))} changed")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("base", type=Path)
    enc.add_argument("merged", type=Path)
    enc.add_argument("out", type=Path)
    enc.add_argument("--tolerance", type=float, default=1e-3)
    enc.add_argument("--max-rank", type=int, default=64)
    enc.add_argument("--shard-mb", type=int, default=15)
    dec = sub.add_parser("decode")
    dec.add_argument("base", type=Path)
    dec.add_argument("delta", type=Path)
    dec.add_argument("out", type=Path)
    dec.add_argument("--like", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "encode":
        encode(args.base, args.merged, args.out, args.tolerance, args.max_rank, args.shard_mb)
    else:
        decode(args.base, args.delta, args.out, args.like)


if __name__ == "__main__":
    main()

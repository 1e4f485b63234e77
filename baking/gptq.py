"""GPTQ rounding for int4 and int8 weights (Frantar et al. 2022, arXiv 2210.17323), block by block.

Rounding each weight to its nearest int4 level minimises the error of the *weights*; what the
model needs kept is each layer's *output* on the inputs it really sees. GPTQ rounds one input
column at a time and spreads that column's rounding error over the columns not yet rounded, in
proportion to how the calibration inputs correlate them (the inverse of H = X^T X), so the
errors cancel in X W^T instead of adding up. For a baked model this is what keeps the baking:
its LoRA update is smaller than an int4 step, and rounding to nearest erased it
(benchmarks/compress.py), while the calibration inputs here are the job's own conversations.

The stored formats are unchanged (baking.quant). int4: codes 0..15, one bf16 scale and zero per
group, each group's scale and zero chosen, as for round-to-nearest, by the least-squares clip
search on the group's weights as GPTQ has updated them when it reaches the group. int8: per-row
symmetric codes on round-to-nearest's grid (max |w| / 127); an int8 step is 1/16 of an int4 one,
so the gain is smaller, but int8 holds most of a mixed candidate's layers, and on a quick bake of
the fleet job GPTQ int8 took the KL to the fp32 model from 0.0047 to 0.0027 and top-1 agreement
from 0.972 to 0.979 against rounding to nearest (README, Measured).

Sequential as in the paper's code: block i is calibrated on the outputs of blocks < i *after*
they were quantized (the recorded-input machinery of baking.prune, shared with Wanda).
Pure torch; about a minute for SmolLM2-135M on 2 CPU cores with 32 calibration sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from baking import quant
from baking.prune import BlockCall, block_inputs, block_linears, decoder_blocks, feed_block, run_block

Int4Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # packed uint8, scales, zeros
Int8Codes = tuple[torch.Tensor, torch.Tensor]  # int8 codes [out, in], bf16 scales [out]
DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned
COLUMN_BLOCK = 128  # columns rounded together before the lazy update of the rest (a multiple of every group size)


def _gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, round_column: Callable[[int, torch.Tensor], torch.Tensor], damp: float
) -> None:
    """GPTQ's column loop over `weight` [out, in] for inputs with second moment `hessian` [in, in].

    `round_column(column, ahead)` gets the index of the column to round and the columns of its
    block not yet rounded, that one first, as the error updates have left them; it records that
    column's codes and returns its rounded (dequantized) values, whose error the loop spreads."""
    in_features = weight.shape[1]
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs never active in calibration: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_features, device=h.device)
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights for column i
    # given that columns < i are already fixed (the paper's Cholesky reformulation).
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for start in range(0, in_features, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            rounded = round_column(start + i, block[:, i:])
            error = (block[:, i] - rounded) / u_block[i, i]
            block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = DAMP) -> Int4Codes:
    """int4 codes of `weight` [out, in] for inputs with second moment `hessian` [in, in]."""
    out_features, in_features = weight.shape
    if in_features % group_size or COLUMN_BLOCK % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {in_features} and {COLUMN_BLOCK}")
    codes = torch.zeros(out_features, in_features, device=weight.device)
    groups = in_features // group_size
    scales = torch.empty(out_features, groups, dtype=quant.SCALE_DTYPE, device=weight.device)
    zeros = torch.empty_like(scales)

    def round_column(column: int, ahead: torch.Tensor) -> torch.Tensor:
        g = column // group_size
        if column % group_size == 0:  # a group starts: its range from its weights as updated so far
            s, z = quant.int4_group_params(ahead[:, :group_size].unsqueeze(1))
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        s, z = scales[:, g], zeros[:, g]
        code = quant.int4_codes(ahead[:, :1], s, z)[:, 0]
        codes[:, column] = code
        return (code - 8) * s.float() + z.float()

    _gptq_round(weight, hessian, round_column, damp)
    return quant.pack_int4(codes), scales, zeros


def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = DAMP) -> Int8Codes:
    """Per-row symmetric int8 codes of `weight` [out, in] (the format `quant.quantize_int8`
    stores, on the same grid: max |w| / 127 per row), rounded by GPTQ instead of to nearest."""
    codes = torch.zeros(weight.shape, dtype=torch.int8, device=weight.device)
    _, scales = quant.quantize_int8(weight)
    step = scales.float()

    def round_column(column: int, ahead: torch.Tensor) -> torch.Tensor:
        code = torch.round(ahead[:, 0] / step).clamp(-127, 127)
        codes[:, column] = code.to(torch.int8)
        return code * step

    _gptq_round(weight, hessian, round_column, damp)
    return codes, scales


@torch.no_grad()
def _hessians(
    block: nn.Module, linears: Mapping[str, nn.Linear], inputs: Sequence[tuple[torch.Tensor, BlockCall]]
) -> dict[str, torch.Tensor]:
    """X^T X / tokens over the calibration tokens, per layer of `block`, running it on `inputs`."""
    sums = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in linears.items()}
    tokens = dict.fromkeys(linears, 0)

    def add(name: str, x: torch.Tensor) -> None:
        sums[name] += x.T @ x
        tokens[name] += x.shape[0]

    feed_block(block, linears, inputs, add)
    return {n: s / max(1, tokens[n]) for n, s in sums.items()}


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - approx) X||^2 / ||W X||^2 for inputs X with second moment `hessian` = X^T X / n:
    how much of the layer's output on the calibration inputs the rounding changed."""
    w = weight.detach().float()
    delta = w - approx.detach().float()
    h = hessian.float()
    signal = float(((w @ h) * w).sum())
    return float(((delta @ h) * delta).sum()) / signal if signal > 0 else 0.0


@dataclass(frozen=True)
class GptqLayers:
    """What `gptq_quantize_` built, per layer name."""

    codes: dict[str, Int4Codes]  # the int4 layers
    output_error: dict[
        str, float
    ]  # `output_error` of each layer's rounded weights (int4 or int8) on its calibration inputs
    int8_codes: dict[str, Int8Codes] = field(default_factory=dict)  # the int8 layers


@torch.no_grad()
def gptq_quantize_(
    model: nn.Module,
    calibration: Sequence[Sequence[int]],
    *,
    group_size: int,
    select: Callable[[str], bool],
    select_int8: Callable[[str], bool] = lambda name: False,
    should_stop: Callable[[], None] | None = None,
) -> GptqLayers:
    """GPTQ codes for the decoder-block Linears: int4 for every one whose name `select` accepts
    (and whose in_features `group_size` divides), int8 for every other one `select_int8`
    accepts; keyed by name, with each layer's output error (what a mixed-precision choice ranks
    layers by).

    Works on a float model in place: each rounded layer's weight is replaced by its dequantized
    value, so later blocks calibrate on what the quantized model computes. Hand the codes to
    `quant.quantize_model_(precomputed_int4=..., precomputed_int8=...)` to build the stored layers.
    """
    sequences = [list(c) for c in calibration if len(c)]
    if not sequences:
        raise ValueError("GPTQ needs calibration sequences")
    was_training = model.training
    model.eval()
    _, blocks = decoder_blocks(model)
    hidden, calls = block_inputs(model, sequences)
    int4: dict[str, Int4Codes] = {}
    int8: dict[str, Int8Codes] = {}
    errors: dict[str, float] = {}
    for i, (block, linears) in enumerate(zip(blocks, block_linears(model), strict=True)):
        if should_stop is not None:
            should_stop()
        to_int4 = {n for n, m in linears.items() if select(n) and m.in_features % group_size == 0}
        chosen = {n: m for n, m in linears.items() if n in to_int4 or select_int8(n)}
        inputs = [(h, c[i]) for h, c in zip(hidden, calls, strict=True)]
        hessians = _hessians(block, chosen, inputs) if chosen else {}
        for name, linear in chosen.items():
            if name in to_int4:
                int4[name] = gptq_int4(linear.weight, hessians[name], group_size)
                approx = quant.dequantize_int4(*int4[name], dtype=linear.weight.dtype)
            else:
                int8[name] = gptq_int8(linear.weight, hessians[name])
                approx = quant.dequantize_int8(*int8[name], dtype=linear.weight.dtype)
            errors[name] = output_error(linear.weight, approx, hessians[name])
            linear.weight.copy_(approx)
        if i + 1 < len(blocks):
            hidden = [run_block(block, h, call) for h, call in inputs]
    model.train(was_training)
    return GptqLayers(int4, errors, int8)

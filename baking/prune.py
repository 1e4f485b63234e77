"""Pruning of the decoder blocks' Linear layers: magnitude or Wanda, unstructured or 2:4.

Scores (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", arXiv 2306.11695):

* `magnitude`: |W|, compared across the whole layer (the classic per-layer magnitude pruning).
* `wanda`: |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input channel j over every
  calibration token; compared within each output row, as the paper does (its ablation shows
  per-output comparison matters for LLMs). As in the paper's code, blocks are pruned in order
  and the activations of block i are gathered with blocks < i already pruned.

Patterns, each hit exactly (ties broken by `topk`, never by a threshold, so the count is exact):

* `unstructured`: `magnitude` zeroes round(sparsity * numel) weights per layer; `wanda` zeroes
  round(sparsity * in_features) weights in every row (so out_features times that per layer).
  Python's `round` (half to even) is the rounding; `PruneConfig.zeros_for` gives the count.
* `2:4`: exactly 2 zeros in every group of 4 consecutive input weights of every row, the
  layout NVIDIA's sparse tensor cores run. The pattern fixes sparsity at 0.5; the spec's
  `sparsity` must be 0.5 or left at its default 0.0.

Only the Linear layers inside the decoder blocks are pruned. Embeddings are a lookup table:
zeroing entries there removes no compute and damages every token that uses them; lm_head is
tied to the embeddings in SmolLM2, so pruning it would prune the embeddings too. Both are also
where LLM pruning work (Wanda, SparseGPT) leaves the weights dense.

`prune_` returns the masks (True = kept); `apply_masks_` re-zeroes pruned weights, which
recovery training calls after every optimizer step so pruned weights cannot grow back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from baking import quant
from baking.spec import PruningSpec

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")
TWO_FOUR_SPARSITY = 0.5


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much; validated like the job spec (ValueError naming the field)."""

    method: str  # magnitude | wanda
    pattern: str = "unstructured"  # unstructured | 2:4
    sparsity: float = 0.5  # share of weights zeroed: (0, 1) for unstructured, exactly 0.5 for 2:4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"optimize.pruning.method: one of {('none', *METHODS)}, got {self.method!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"optimize.pruning.pattern: one of {PATTERNS}, got {self.pattern!r}")
        if self.pattern == "2:4" and self.sparsity != TWO_FOUR_SPARSITY:
            raise ValueError(
                f"optimize.pruning.sparsity: pattern 2:4 zeroes exactly half of the weights; "
                f"sparsity must be 0.5 (or left out), got {self.sparsity}"
            )
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"optimize.pruning.sparsity: must be in (0, 1) to prune, got {self.sparsity}")

    @classmethod
    def from_spec(cls, spec: PruningSpec) -> PruneConfig | None:
        """None when the spec prunes nothing. Contradictory combinations are errors, not silently
        ignored: a sparsity or pattern with method none, method without sparsity, 2:4 with a
        sparsity other than 0.5. For 2:4 the spec's default sparsity 0.0 means "implied by the
        pattern", so `{method: wanda, pattern: "2:4"}` is enough."""
        if spec.method == "none":
            if spec.sparsity != 0.0:
                raise ValueError(f"optimize.pruning.sparsity: {spec.sparsity} given but method is none")
            if spec.pattern != "unstructured":
                raise ValueError(f"optimize.pruning.pattern: {spec.pattern} given but method is none")
            return None
        sparsity = TWO_FOUR_SPARSITY if spec.pattern == "2:4" and spec.sparsity == 0.0 else spec.sparsity
        return cls(spec.method, spec.pattern, sparsity)

    def zeros_for(self, out_features: int, in_features: int) -> int:
        """Exactly how many weights a layer of this shape loses."""
        if self.pattern == "2:4":
            return out_features * in_features // 2
        if self.method == "wanda":
            return out_features * round(self.sparsity * in_features)
        return round(self.sparsity * out_features * in_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- which layers


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, blocks) of the decoder's transformer blocks (`model.model.layers` in
    Llama-style transformers models)."""
    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else model
    blocks = getattr(base, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (no .layers ModuleList)")
    for name, module in model.named_modules():
        if module is blocks:
            return name, blocks
    raise ValueError("the decoder blocks are not a submodule of the model")


def block_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per decoder block, its prunable Linear layers by dotted name (as in `named_modules`)."""
    prefix, blocks = decoder_blocks(model)
    return [
        {name: m for name, m in block.named_modules(prefix=f"{prefix}.{i}") if type(m) is nn.Linear}
        for i, block in enumerate(blocks)
    ]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for block in block_linears(model) for name, m in block.items()}


# ---------------------------------------------------------------- scores and masks


def scores(weight: torch.Tensor, method: str, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each weight (float32, same shape): |W|, or |W| * ||X_j|| for wanda."""
    s = weight.detach().float().abs()
    if method == "wanda":
        if input_norm is None:
            raise ValueError("wanda needs the input activation norms")
        s = s * input_norm.to(device=s.device, dtype=torch.float32)[None, :]
    return s


def mask_from_scores(score: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """Bool mask of the kept weights (True = kept) with exactly `config.zeros_for` zeros."""
    out_features, in_features = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if config.pattern == "2:4":
        if in_features % 4:
            raise ValueError(f"2:4 needs in_features divisible by 4, got {in_features}")
        groups = score.reshape(out_features, in_features // 4, 4)
        drop = groups.topk(2, dim=-1, largest=False).indices
        return keep.reshape(groups.shape).scatter_(-1, drop, False).reshape(out_features, in_features)
    if config.method == "wanda":
        k = round(config.sparsity * in_features)
        drop = score.topk(k, dim=1, largest=False).indices
        return keep.scatter_(1, drop, False)
    k = round(config.sparsity * score.numel())
    drop = score.flatten().topk(k, largest=False).indices
    flat = keep.flatten()
    flat[drop] = False
    return flat.reshape(out_features, in_features)


class _StopForward(Exception):
    """Raised after the last block: calibration does not need the final norm and lm_head."""


# What a decoder block is called with besides its input hidden states: (positional, keyword)
# arguments such as the attention mask and the rotary position embeddings.
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


@torch.no_grad()
def block_inputs(
    model: nn.Module, calibration: Sequence[Sequence[int]]
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Per calibration sequence: the hidden states entering the first block, and the other
    arguments each block was called with (one unpruned forward per sequence). Recorded per
    block, not once, because some architectures give layers different attention masks."""
    _, blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module is blocks[0]:
            hidden.append(args[0])
            calls.append([])
        calls[-1].append((args[1:], dict(kwargs)))

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _StopForward

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(stop))
    try:
        for ids in calibration:
            with contextlib.suppress(_StopForward):
                model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)


@torch.no_grad()
def feed_block(
    block: nn.Module,
    linears: Mapping[str, nn.Linear],
    inputs: Sequence[tuple[torch.Tensor, BlockCall]],
    on_input: Callable[[str, torch.Tensor], None],
) -> None:
    """Run `block` alone on its recorded `inputs`, handing each of `linears`' inputs, as float
    [tokens, in_features], to `on_input(name, x)` (calibration statistics: Wanda, GPTQ)."""

    def gather(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            on_input(name, args[0].detach().float().reshape(-1, args[0].shape[-1]))

        return hook

    handles = [m.register_forward_pre_hook(gather(name)) for name, m in linears.items()]
    try:
        for hidden, call in inputs:
            run_block(block, hidden, call)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_norms(
    block: nn.Module, linears: Mapping[str, nn.Linear], inputs: Sequence[tuple[torch.Tensor, BlockCall]]
) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all calibration tokens, per input channel of each of `linears` (inside
    `block`), running the block alone on its recorded inputs."""
    sums = {
        name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for name, m in linears.items()
    }

    def add(name: str, x: torch.Tensor) -> None:
        sums[name] += x.pow(2).sum(dim=0)

    feed_block(block, linears, inputs, add)
    return {name: s.sqrt() for name, s in sums.items()}


@torch.no_grad()
def prune_(
    model: nn.Module,
    config: PruneConfig,
    *,
    calibration: Sequence[Sequence[int]] = (),
    should_stop: Callable[[], None] | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Zero weights of the decoder blocks' Linear layers in place; returns the masks by layer name.

    `calibration` (token id lists, wanda only) should be a few sequences of the kind of text the
    model will see; the paper uses 128 x 2048 tokens of C4, a few thousand tokens do here.
    Wanda follows the paper's code: block i is calibrated on the outputs of blocks < i *after*
    they were pruned, each block run alone on recorded inputs (about three forwards of the
    model per sequence in all, rather than one per block).
    """
    wanda = config.method == "wanda"
    if wanda and not any(len(c) for c in calibration):
        raise ValueError("wanda needs calibration sequences")
    was_training = model.training
    model.eval()
    _, blocks = decoder_blocks(model)
    per_block = block_linears(model)
    hidden, calls = block_inputs(model, [c for c in calibration if len(c)]) if wanda else ([], [])
    masks: dict[str, torch.Tensor] = {}
    for i, (block, linears) in enumerate(zip(blocks, per_block, strict=True)):
        if should_stop is not None:
            should_stop()
        inputs = [(h, c[i]) for h, c in zip(hidden, calls, strict=True)]
        norms = input_norms(block, linears, inputs) if wanda else {}
        for name, linear in linears.items():
            mask = mask_from_scores(scores(linear.weight, config.method, norms.get(name)), config)
            linear.weight.masked_fill_(~mask, 0.0)
            masks[name] = mask
        if wanda and i + 1 < len(blocks):
            hidden = [run_block(block, h, call) for h, call in inputs]
        if on_block is not None:
            on_block(i + 1, len(blocks))
    model.train(was_training)
    return masks


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Re-zero the pruned weights (after an optimizer step, or after loading)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.masked_fill_(~mask.to(modules[name].weight.device), 0.0)


def mask_gradients_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights, so gradient clipping sees only what will be applied."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        grad = modules[name].weight.grad
        if grad is not None:
            grad.masked_fill_(~mask.to(grad.device), 0.0)


# ---------------------------------------------------------------- what was achieved


def block_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float weight) of each decoder-block linear; quantized layers are dequantized, so
    the sparsity of the stored model is what is measured."""
    prefix, blocks = decoder_blocks(model)
    for name, m in blocks.named_modules(prefix=prefix):
        if isinstance(m, quant.QUANTIZED_MODULES):
            yield name, m.dequantize(torch.float32)
        elif type(m) is nn.Linear:
            yield name, m.weight.detach()


def holds_2_4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input weights (what 2:4 kernels need)."""
    out_features, in_features = weight.shape
    if in_features % 4:
        return False
    nonzero = (weight != 0).reshape(out_features, in_features // 4, 4).sum(dim=-1)
    return bool((nonzero <= 2).all())


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Share of exactly-zero weights in each decoder-block linear."""
    return {name: float((w == 0).sum()) / w.numel() for name, w in block_weights(model)}


def sparsity_summary(model: nn.Module, *, per_layer: bool = True) -> dict[str, Any]:
    """JSON-safe: overall share of zeros over the decoder-block linears, min and max per layer,
    whether every layer holds 2:4, and (optionally) the per-layer shares."""
    zeros = total = 0
    layers: dict[str, float] = {}
    two_four = True
    for name, w in block_weights(model):
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        layers[name] = round(z / w.numel(), 6)
        two_four = two_four and holds_2_4(w)
    out: dict[str, Any] = {
        "sparsity": round(zeros / total, 6) if total else 0.0,
        "zeros": zeros,
        "weights": total,
        "min_layer": min(layers.values(), default=0.0),
        "max_layer": max(layers.values(), default=0.0),
        "holds_2_4": two_four,
    }
    if per_layer:
        out["layers"] = layers
    return out

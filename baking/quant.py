"""Weight-only quantization of `nn.Linear` layers: int8 per output channel, int4 per group.

Storage (what goes into safetensors) is portable and kernel-independent:

* int8: `qweight` int8 [out, in] (symmetric, -127..127) and `scales` bf16 [out];
  w ~= qweight * scales[:, None].
* int4: `qweight` uint8 [out, in/2] (two 4-bit codes per byte, high nibble = even column),
  `scales` and `zeros` bf16 [out, in/group]; asymmetric with a float zero point in the
  convention PyTorch's int4 kernels use: w ~= (code - 8) * scale + zero.
* embeddings (only with `lm_head="int8-tied"`): int8 rows as above; tied to an int8 lm_head,
  the one `qweight`/`scales` pair is stored once, under the embedding's name.

The forward pass picks a kernel for the device: on CPU with bf16 activations, PyTorch's own
`torch._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (the int4 weight is
repacked into that kernel's layout on first use, never stored); elsewhere (CUDA, fp32
activations on a CPU without native bf16, or a kernel that refuses the shape) the weight is
dequantized to the activation dtype and goes through `F.linear` (on CPU the dequantized copy
is built once: see `_dense_weight`). Activations are bf16 where the device supports it
(`compute_dtype`).

Scales are rounded to bf16 *before* the codes are computed, so the stored codes are the
best ones for the scales that are actually used.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# bf16: lm_head stays float (tied to the float embeddings in SmolLM2); int8: lm_head untied and
# int8, the embeddings float; int8-tied: lm_head and the embeddings int8, one shared tensor
# when the model ties them (the smallest: no float copy of the 49k-row matrix at all).
LM_HEAD_MODES = ("bf16", "int8", "int8-tied")
DEFAULT_SKIP = ("lm_head", "embed_tokens")
SCALE_DTYPE = torch.bfloat16
_EPS = 1e-8


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 activations where the device runs them natively, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


# ---------------------------------------------------------------- int8, per output channel


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (codes int8 [out, in], scales bf16 [out])."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=_EPS).to(SCALE_DTYPE)
    codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scales.float()[:, None]).to(dtype)


# ---------------------------------------------------------------- int4, group-wise asymmetric


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes in 0..15 -> uint8 [out, in/2], high nibble = even column."""
    c = codes.to(torch.uint8)
    return (c[:, ::2] << 4) | c[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int32 codes [out, in]."""
    high = (packed >> 4).to(torch.int32)
    low = (packed & 0x0F).to(torch.int32)
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


# Clipping ratios tried per int4 group (1.0 = the group's full min..max range). Sixteen levels
# spread over the full range waste resolution on one outlier; shrinking the range towards the
# bulk of the group and clamping the outlier often lowers the group's squared error. The ratio
# with the least error is kept per group (an MSE clip search, as llama.cpp's and AWQ's
# quantizers do); 1.0 is always a candidate, so no group gets worse than plain min/max.
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _int4_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = ((hi - lo) / 15).clamp(min=_EPS).to(SCALE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(SCALE_DTYPE)
    return scales, zeros


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (as floats) of `w` [..., n], one (scale, zero) per row of [...]."""
    s, z = scales.float()[..., None], zeros.float()[..., None]
    return torch.round((w - z) / s + 8).clamp(0, 15)


def int4_group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros), bf16 [...], for float groups `w` [..., group_size]: per group, the clipped
    min..max range of INT4_CLIP_RATIOS with the least squared rounding error."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    best_err = torch.full_like(lo, math.inf)
    scales, zeros = _int4_params(lo, hi)
    for ratio in INT4_CLIP_RATIOS:
        s, z = _int4_params(lo * ratio, hi * ratio)
        approx = (int4_codes(w, s, z) - 8) * s.float()[..., None] + z.float()[..., None]
        err = (w - approx).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
    return scales, zeros


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input columns, rounded to nearest: (packed
    uint8, scales, zeros), each group's range clipped as `int4_group_params` picks."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    scales, zeros = int4_group_params(w)
    codes = int4_codes(w, scales, zeros).reshape(out_features, in_features)
    return pack_int4(codes), scales, zeros


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    out_features, in_features = codes.shape
    groups = scales.shape[1]
    w = codes.reshape(out_features, groups, in_features // groups)
    w = (w - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(out_features, in_features).to(dtype)


# ---------------------------------------------------------------- modules


class _WeightOnlyLinear(nn.Module):
    """Shared plumbing: shapes, optional float bias, and a per-device kernel cache."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, dtype=SCALE_DTYPE) if bias else None)
        self._cache: dict[Any, Any] = {}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # device moves invalidate the repacked weight
        self._cache.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _finish(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in the activation dtype, built once on CPU (per call elsewhere,
        so a GPU never holds a float copy). Used where no integer kernel pays: PyTorch's int8/int4
        CPU kernels are fast with bf16 activations on CPUs that run bf16 natively, but with fp32
        activations (an AVX2 CPU without bf16) they measured 6x (one token) to 50x (64 tokens)
        slower than fp32 `F.linear` for a 576 -> 1536 layer; the stored weights stay integer."""
        if self.qweight.device.type != "cpu":
            return self.dequantize(dtype)
        key = ("dense", dtype)
        if key not in self._cache:
            self._cache[key] = self.dequantize(dtype)
        return self._cache[key]  # type: ignore[no-any-return,unused-ignore]


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """y = x @ (qweight * scales)^T, per-output-channel symmetric int8 weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=SCALE_DTYPE))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, codes: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Int8WeightOnlyLinear:
        """`codes` (int8 codes, scales) already computed, e.g. by GPTQ; else rounded to nearest."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        m.qweight, m.scales = codes if codes is not None else quantize_int8(linear.weight)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(SCALE_DTYPE).clone()
        return m.to(linear.weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self._dense_weight(x.dtype))
        return self._finish(y, shape)


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """y = x @ ((code - 8) * scale + zero)^T, one (scale, zero) per `group_size` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 32) -> None:
        super().__init__(in_features, out_features, bias)
        if group_size not in GROUP_SIZES or in_features % group_size or in_features % 2:
            raise ValueError(f"int4 needs group_size in {GROUP_SIZES} dividing in_features ({in_features})")
        self.group_size = group_size
        self.zeros: torch.Tensor
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=SCALE_DTYPE))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=SCALE_DTYPE))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 32,
        codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> Int4WeightOnlyLinear:
        """`codes` (packed, scales, zeros) computed elsewhere (baking.gptq); else rounded to nearest."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size)
        m.qweight, m.scales, m.zeros = codes if codes is not None else quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(SCALE_DTYPE).clone()
        return m.to(linear.weight.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, dtype)

    def _cpu_kernel_args(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight in `_weight_int4pack_mm_for_cpu`'s layout, built once per dtype; None if
        the kernel is missing or refuses this shape (it wants out_features % 16 == 0)."""
        key = ("cpu-int4", dtype)
        if key not in self._cache:
            args = None
            if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0:
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight), 1)
                    sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
                    args = (packed, sz)
                except RuntimeError:
                    args = None
            self._cache[key] = args
        return self._cache[key]  # type: ignore[no-any-return,unused-ignore]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        args = self._cpu_kernel_args(x.dtype) if x.device.type == "cpu" and x.dtype == torch.bfloat16 else None
        if args is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), args[0], self.group_size, args[1])
        else:
            y = F.linear(x2, self._dense_weight(x.dtype))
        return self._finish(y, shape)


class Int8Embedding(nn.Module):
    """Embedding rows from per-row int8 codes: row i ~= qweight[i] * scales[i]. With a tied
    int8 lm_head the two modules hold the *same* `qweight` and `scales` tensors (an int8 lm_head
    quantizes per output channel, i.e. per vocabulary row, so one set of codes serves both)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=SCALE_DTYPE))
        # What the rest of the model computes in (cast_floats_ sets it); rows come out in it.
        self.output_dtype = torch.float32

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        m = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        m.qweight, m.scales = quantize_int8(embedding.weight)
        return m.to(embedding.weight.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # plain indexing: it gathers int8 rows on every device (the embedding kernels want floats)
        return self.qweight[ids].to(self.output_dtype) * self.scales[ids, None].to(self.output_dtype)


QUANTIZED_MODULES = (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8Embedding)


# ---------------------------------------------------------------- whole models


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _untie_lm_head(model: nn.Module) -> None:
    """Quantizing lm_head gives it weights of its own; the config must say so, or a reload
    (or `tie_weights()`) would point it back at the float embeddings."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False


def quantize_model_(
    model: nn.Module,
    scheme: str,
    *,
    group_size: int = 32,
    skip: Iterable[str] = DEFAULT_SKIP,
    lm_head: str = "bf16",
    int8_parts: Iterable[str] = (),
    precomputed_int4: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    precomputed_int8: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    int4_layers: Collection[str] | None = None,
) -> dict[str, Any]:
    """Replace the model's `nn.Linear` layers in place with weight-only quantized ones.

    Layers whose dotted name contains a part in `skip` stay float (by default the embeddings
    and lm_head: SmolLM2 ties them, so both stay in the float dtype and stay tied).
    `lm_head="int8"` unties lm_head and quantizes it to int8 whatever the scheme;
    `lm_head="int8-tied"` quantizes lm_head and the input embeddings to int8, one shared tensor
    when they were tied (the config keeps saying tied).
    An int4 layer whose in_features is not a multiple of `group_size` stays float and is listed.
    With scheme int4, layers whose last name part is in `int8_parts` (e.g. "up_proj") are int8
    instead: mixed precision for the projections measurement finds sensitive. `precomputed_int4` maps
    layer names to int4 (packed, scales, zeros) already computed (GPTQ), `precomputed_int8` to int8
    (codes, scales); the rest round to nearest.
    `int4_layers`, when given, names the only layers that may take int4: every other one is int8
    (mixed precision layer by layer, as a size budget chooses it).
    Returns a JSON-safe summary (the `scheme_info` that `load_quantized` accepts).
    """
    int8_parts = tuple(int8_parts)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if lm_head not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    skip = tuple(s for s in skip if not (lm_head != "bf16" and s == "lm_head"))
    embedding_tied = _embeddings_tied(model)
    kept: list[str] = []
    counts = {"int8": 0, "int4": 0}
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in linears:
        parts = name.split(".")
        if any(s in parts for s in skip):
            kept.append(name)
            continue
        kind = "int8" if parts[-1] == "lm_head" or parts[-1] in int8_parts else scheme
        if kind == "int4" and int4_layers is not None and name not in int4_layers:
            kind = "int8"
        if kind == "int4" and linear.in_features % group_size:
            kept.append(name)
            continue
        if parts[-1] == "lm_head" and lm_head == "int8":
            _untie_lm_head(model)
        new: nn.Module = (
            Int8WeightOnlyLinear.from_linear(linear, (precomputed_int8 or {}).get(name))
            if kind == "int8"
            else Int4WeightOnlyLinear.from_linear(linear, group_size, (precomputed_int4 or {}).get(name))
        )
        _set_module(model, name, new)
        counts[kind] += 1
    if lm_head == "int8-tied":
        _quantize_embeddings_(model, share_with_lm_head=embedding_tied)
    return {
        "scheme": scheme,
        "group_size": group_size if scheme == "int4" else None,
        "lm_head": lm_head,
        "quantized_layers": counts,
        "float_layers": kept,
        **({"int8_parts": list(int8_parts)} if int8_parts and scheme == "int4" else {}),
    }


def _embeddings_tied(model: nn.Module) -> bool:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    inp, out = get_in(), get_out()
    return (
        isinstance(inp, nn.Embedding) and isinstance(out, nn.Linear) and inp.weight.data_ptr() == out.weight.data_ptr()
    )


def _quantize_embeddings_(model: nn.Module, *, share_with_lm_head: bool) -> None:
    """Swap the input embeddings for an Int8Embedding; tied to an int8 lm_head, it takes the
    head's codes and scales (the same tensors) instead of computing its own."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    new = Int8Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
    head = model.get_output_embeddings() if share_with_lm_head else None  # type: ignore[operator]
    if isinstance(head, Int8WeightOnlyLinear):
        new.qweight, new.scales = head.qweight, head.scales
    else:
        new = Int8Embedding.from_embedding(embedding)
    model.set_input_embeddings(new)  # type: ignore[operator]


def _share_tied_int8_(model: nn.Module) -> None:
    """Loading a tied int8-tied artifact: point lm_head at the embedding's tensors."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(embedding, Int8Embedding) or isinstance(head, Int8WeightOnlyLinear):
        return
    new = Int8WeightOnlyLinear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    new.qweight, new.scales = embedding.qweight, embedding.scales
    model.set_output_embeddings(new)  # type: ignore[operator]


def cast_floats_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters and persistent float buffers, leaving alone the quantized
    layers (their bf16 scales are the storage format) and non-persistent buffers such as
    RoPE's `inv_freq`, which `from_pretrained(dtype=...)` also keeps in fp32."""
    for module in model.modules():
        if isinstance(module, Int8Embedding):
            module.output_dtype = dtype
        if isinstance(module, QUANTIZED_MODULES):
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for key, b in module._buffers.items():
            if (
                b is not None
                and b.is_floating_point()
                and b.dtype != dtype
                and key not in module._non_persistent_buffers_set
            ):
                module._buffers[key] = b.to(dtype)
    return model


def _unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights appear under two names with one storage; safetensors wants one."""
    seen: set[tuple[int, Any]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to store: integer codes + scales (+ zeros) for quantized layers, the float
    tensors of everything else, tied tensors once. No float copy of a quantized weight."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return _unique_tensors(state)


def weight_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in _unique_tensors(state).values())


def int4_saving(linear: nn.Linear, group_size: int) -> int:
    """Stored bytes saved by holding `linear` in int4 rather than int8 (codes, scales, zeros
    and bias as the two modules store them; built on the meta device, nothing is allocated)."""
    bias = linear.bias is not None
    with torch.device("meta"):
        int8 = Int8WeightOnlyLinear(linear.in_features, linear.out_features, bias)
        int4 = Int4WeightOnlyLinear(linear.in_features, linear.out_features, bias, group_size=group_size)

    def stored(module: nn.Module) -> int:  # no `weight_bytes`: meta tensors all share address 0
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    return stored(int8) - stored(int4)


def logical_params(model: nn.Module) -> int:
    """Parameter count as the float model had it (quantized weights counted per weight, a
    tensor shared by tied modules once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for m in model.modules():
        if isinstance(m, QUANTIZED_MODULES) and m.qweight.data_ptr() not in seen:
            seen.add(m.qweight.data_ptr())
            if isinstance(m, Int8Embedding):
                total += m.num_embeddings * m.embedding_dim
            else:
                total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    return total


def load_quantized(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    scheme_info: Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Turn a float skeleton (e.g. `AutoModelForCausalLM.from_config(config)`, whose config
    already says whether lm_head is tied) into the stored quantized model and load its tensors.

    Which layers are quantized, and how, is read from the tensors themselves: `<name>.qweight`
    int8 -> int8, uint8 -> int4 with group_size = in_features / scales.shape[1]; on an
    embedding, int8 rows. A tied int8 lm_head is stored once, under the embedding's name.
    """
    if scheme_info.get("scheme") not in SCHEMES:
        raise ValueError(f"not a quantized scheme: {scheme_info.get('scheme')!r}")
    for key, q in state_dict.items():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Embedding) and q.dtype == torch.int8:
            _set_module(model, name, Int8Embedding(linear.num_embeddings, linear.embedding_dim, linear.padding_idx))
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} holds quantized weights but is a {type(linear).__name__} in the skeleton")
        bias = f"{name}.bias" in state_dict
        new: nn.Module
        if q.dtype == torch.int8:
            new = Int8WeightOnlyLinear(linear.in_features, linear.out_features, bias)
        elif q.dtype == torch.uint8:
            group_size = linear.in_features // state_dict[f"{name}.scales"].shape[1]
            new = Int4WeightOnlyLinear(linear.in_features, linear.out_features, bias, group_size=group_size)
        else:
            raise ValueError(f"{key} has dtype {q.dtype}; expected int8 or uint8")
        _set_module(model, name, new)
    if scheme_info.get("lm_head") == "int8-tied":
        _share_tied_int8_(model)  # before loading: the load fills the one shared tensor in place
    if dtype is not None:
        cast_floats_(model, dtype)
    result = model.load_state_dict(dict(state_dict), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected tensors in the quantized state dict: {result.unexpected_keys[:5]}")
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ValueError(f"tensors missing from the quantized state dict: {missing[:5]}")
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """Names that share storage with another name in the model's state dict."""
    state = model.state_dict()
    kept = set(_unique_tensors(state))
    return {k for k in state if k not in kept}

"""Weight-only quantization of `nn.Linear` layers: int8 per output channel, int4 per group.

Storage (what goes into safetensors) is portable and kernel-independent:

* int8: `qweight` int8 [out, in] (symmetric, -127..127) and `scales` bf16 [out];
  w ~= qweight * scales[:, None].
* int4: `qweight` uint8 [out, in/2] (two 4-bit codes per byte, high nibble = even column),
  `scales` and `zeros` bf16 [out, in/group]; asymmetric with a float zero point in the
  convention PyTorch's int4 kernels use: w ~= (code - 8) * scale + zero.

The forward pass picks a kernel for the device: on CPU, PyTorch's own
`torch._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (the int4 weight is
repacked into that kernel's layout on first use, never stored); elsewhere (CUDA, or a CPU
kernel that refuses the shape) the weight is dequantized to the activation dtype and goes
through `F.linear`. Activations are bf16 where the device supports it (`compute_dtype`).

Scales are rounded to bf16 *before* the codes are computed, so the stored codes are the
best ones for the scales that are actually used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
LM_HEAD_MODES = ("bf16", "int8")
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


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input columns: (packed uint8, scales, zeros)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=_EPS).to(SCALE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(SCALE_DTYPE)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    codes = torch.round((w - z) / s + 8).clamp(0, 15).reshape(out_features, in_features)
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


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """y = x @ (qweight * scales)^T, per-output-channel symmetric int8 weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=SCALE_DTYPE))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None)
        m.qweight, m.scales = quantize_int8(linear.weight)
        if linear.bias is not None:
            m.bias = linear.bias.detach().to(SCALE_DTYPE).clone()
        return m.to(linear.weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
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
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4WeightOnlyLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size)
        m.qweight, m.scales, m.zeros = quantize_int4(linear.weight, group_size)
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
        args = self._cpu_kernel_args(x.dtype) if x.device.type == "cpu" else None
        if args is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), args[0], self.group_size, args[1])
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        return self._finish(y, shape)


QUANTIZED_MODULES = (Int8WeightOnlyLinear, Int4WeightOnlyLinear)


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
) -> dict[str, Any]:
    """Replace the model's `nn.Linear` layers in place with weight-only quantized ones.

    Layers whose dotted name contains a part in `skip` stay float (embeddings are never
    quantized: SmolLM2 ties lm_head to them, so by default both stay in the float dtype and
    stay tied). `lm_head="int8"` unties lm_head and quantizes it to int8 whatever the scheme.
    An int4 layer whose in_features is not a multiple of `group_size` stays float and is listed.
    With scheme int4, layers whose last name part is in `int8_parts` (e.g. "up_proj") are int8
    instead: mixed precision for the projections measurement finds sensitive.
    Returns a JSON-safe summary (the `scheme_info` that `load_quantized` accepts).
    """
    int8_parts = tuple(int8_parts)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if lm_head not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    skip = tuple(s for s in skip if not (lm_head == "int8" and s == "lm_head"))
    kept: list[str] = []
    counts = {"int8": 0, "int4": 0}
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in linears:
        parts = name.split(".")
        if any(s in parts for s in skip):
            kept.append(name)
            continue
        kind = "int8" if parts[-1] == "lm_head" or parts[-1] in int8_parts else scheme
        if kind == "int4" and linear.in_features % group_size:
            kept.append(name)
            continue
        if parts[-1] == "lm_head":
            _untie_lm_head(model)
        new: nn.Module = (
            Int8WeightOnlyLinear.from_linear(linear)
            if kind == "int8"
            else Int4WeightOnlyLinear.from_linear(linear, group_size)
        )
        _set_module(model, name, new)
        counts[kind] += 1
    return {
        "scheme": scheme,
        "group_size": group_size if scheme == "int4" else None,
        "lm_head": lm_head,
        "quantized_layers": counts,
        "float_layers": kept,
        **({"int8_parts": list(int8_parts)} if int8_parts and scheme == "int4" else {}),
    }


def cast_floats_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters and persistent float buffers, leaving alone the quantized
    layers (their bf16 scales are the storage format) and non-persistent buffers such as
    RoPE's `inv_freq`, which `from_pretrained(dtype=...)` also keeps in fp32."""
    for module in model.modules():
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


def logical_params(model: nn.Module) -> int:
    """Parameter count as the float model had it (quantized weights counted per weight)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for m in model.modules():
        if isinstance(m, QUANTIZED_MODULES):
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
    int8 -> int8, uint8 -> int4 with group_size = in_features / scales.shape[1].
    """
    if scheme_info.get("scheme") not in SCHEMES:
        raise ValueError(f"not a quantized scheme: {scheme_info.get('scheme')!r}")
    for key, q in state_dict.items():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        linear = model.get_submodule(name)
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

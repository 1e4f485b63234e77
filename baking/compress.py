"""Compression of the baked model. This first version offers float schemes only:
`none` keeps fp32, `bf16` halves the weights; `auto`, `int8` and `int4` fall back to bf16
until the quantization search lands (issue: compression and side-by-side validation)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def compress(model: Any, quantization: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    if quantization == "none":
        return model, {"scheme": "none", "dtype": "float32", "dtype_torch": torch.float32,
                       "weight_bytes": _weight_bytes(model)}
    final = copy.deepcopy(model).to(torch.bfloat16)
    scheme = {"scheme": "bf16", "dtype": "bfloat16", "dtype_torch": torch.bfloat16,
              "weight_bytes": _weight_bytes(final)}
    if quantization != "bf16":
        scheme["requested"] = quantization
        scheme["note"] = f"{quantization} is not implemented yet; bf16 used"
    return final, scheme


def _weight_bytes(model: Any) -> int:
    # tied embeddings are one tensor: count storage once
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total

"""Load a Hugging Face causal LM from safetensors only, on the requested device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from baking.events import BakeError


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BakeError("device_unavailable", "device: cuda was requested but no CUDA device is available", "preparing")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def configure_threads() -> None:
    # torch defaults to all cores; say so explicitly so a worker sharing the box can cap it.
    threads = int(os.environ.get("BAKEHOUSE_TORCH_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BakeError("invalid_model", f"cannot load the model: {exc}", "preparing") from exc
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() oddly
    model.eval()
    return model

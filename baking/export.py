"""The artifact directory (DESIGN.md §8) and `load_artifact`, which runs the released weights.

Layout: model.safetensors (final weights), config.json, tokenizer files, chat_template.jinja,
bakehouse.json (manifest: spec, seed, versions, per-file sha256, quantization, metrics),
README.md (model card) and merged/ (the uncompressed baked model, plain transformers).
No pickle anywhere: weights go through safetensors, everything else is JSON or text.
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from baking.chat import CHAT_TEMPLATE
from baking.events import ArtifactFile, BakeError
from baking.fetch import sha256_file
from baking.generate import compile_decoding

MANIFEST = "bakehouse.json"
BAKEHOUSE_VERSION = "0.1.0"  # = pyproject's version, for source checkouts that are not pip-installed
FORMAT = "bakehouse-artifact/1"
QUANTIZED_SCHEMES = ("int8", "int4")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "bakehouse"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = BAKEHOUSE_VERSION + "+source" if pkg == "bakehouse" else "not installed"
    return out


def save_hf_dir(model: Any, tokenizer: Any, out: Path, *, dtype: torch.dtype | None = None) -> None:
    """A plain transformers directory: safetensors weights, config, tokenizer, our chat template."""
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(str(out), safe_serialization=True)
    _save_tokenizer(tokenizer, out)


def save_quantized_dir(model: Any, tokenizer: Any, out: Path, quantization: dict[str, Any]) -> None:
    """Like `save_hf_dir`, but model.safetensors holds integer codes + scales (baking.quant);
    only `load_artifact` runs it. The scheme also rides in the safetensors metadata."""
    from safetensors.torch import save_file

    from baking.quant import quantized_state_dict

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    save_file(
        quantized_state_dict(model),
        str(out / "model.safetensors"),
        metadata={"format": "pt", "bakehouse_quantization": json.dumps(quantization, sort_keys=True, default=str)},
    )
    _save_tokenizer(tokenizer, out)


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def list_files(root: Path) -> list[ArtifactFile]:
    return [
        ArtifactFile(p.relative_to(root).as_posix(), p.stat().st_size, sha256_file(p))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def write_artifact(
    out: Path,
    *,
    final_model: Any,
    merged_model: Any | None,
    tokenizer: Any,
    final_dtype: torch.dtype,
    quantization: dict[str, Any],
    manifest: dict[str, Any],
    model_card: str,
    extra_json: dict[str, Any] | None = None,
) -> list[ArtifactFile]:
    """Write the whole directory into a staging folder, then move it into place."""
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    if quantization.get("scheme") in QUANTIZED_SCHEMES:
        save_quantized_dir(final_model, tokenizer, staging, quantization)
    else:
        save_hf_dir(final_model, tokenizer, staging, dtype=final_dtype)
    if merged_model is not None:
        save_hf_dir(merged_model, tokenizer, staging / "merged")
    (staging / "README.md").write_text(model_card)
    for name, payload in (extra_json or {}).items():
        (staging / name).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    files = list_files(staging)
    full = {
        **manifest,
        "format": FORMAT,
        "versions": versions(),
        "quantization": quantization,
        "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in files},
    }
    (staging / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return list_files(out)


def verify_artifact(path: Path) -> dict[str, Any]:
    """Re-hash every file against the manifest; raise on a mismatch or a pickle file."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file() or sha256_file(f) != info["sha256"]:
            raise BakeError("artifact_corrupt", f"{name} does not match its sha256 in {MANIFEST}", "exporting")
    pickles = [p.name for p in path.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]
    if pickles:
        raise BakeError("artifact_corrupt", f"pickle files in the artifact: {pickles}", "exporting")
    return manifest


def load_artifact(
    path: str | Path, *, device: str = "cpu", verify: bool = True, compile_for_tokens: int | None = None
) -> tuple[Any, Any]:
    """Load the released (compressed) model of an artifact: (model, tokenizer) with `generate()`.

    `compile_for_tokens`: generate over a static KV cache of that many tokens (prompt + new,
    rounded up) with a torch.compile'd decoding step — the path the job timed where its metrics
    say `decoding.path: static cache + torch.compile`. The first `generate` call compiles.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    manifest = verify_artifact(root) if verify else json.loads((root / MANIFEST).read_text())
    quantization = manifest.get("quantization", {})
    scheme = quantization.get("scheme", "none")
    if scheme in QUANTIZED_SCHEMES:
        model = _load_quantized_model(root, quantization).to(device)
    else:
        dtype = torch.bfloat16 if scheme == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(root), dtype=dtype, use_safetensors=True)
        model = model.to(device)  # type: ignore[arg-type]  # transformers types .to() oddly
    model.eval()
    if compile_for_tokens is not None:
        compile_decoding(model, max_cache_len=compile_for_tokens)
    tokenizer = AutoTokenizer.from_pretrained(str(root))
    return model, tokenizer


def _load_quantized_model(root: Path, quantization: dict[str, Any]) -> Any:
    """Rebuild the architecture from config.json (fp32, normal init), swap in the quantized
    layers the stored tensors describe, cast the float rest to the manifest's dtype, load."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from baking.quant import load_quantized

    config = AutoConfig.from_pretrained(str(root))
    skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_file(str(root / "model.safetensors"), device="cpu")
    dtype = getattr(torch, str(quantization.get("dtype", "bfloat16")))
    return load_quantized(skeleton, state, quantization, dtype=dtype)

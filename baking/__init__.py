"""The torch pipeline. Pure torch + transformers + peft + safetensors: no web, DB or queue code.

Entry point: `bake(spec, workdir, models_dir=..., on_event=..., should_cancel=...) -> BakeResult`.
Heavy modules load lazily so `import baking.events` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from baking.events import ArtifactFile, BakeCancelled, BakeError, BakeEvent, BakeResult

if TYPE_CHECKING:
    from baking.pipeline import bake as bake
    from baking.spec import BakeSpec as BakeSpec

__all__ = ["ArtifactFile", "BakeCancelled", "BakeError", "BakeEvent", "BakeResult", "BakeSpec", "bake", "load_artifact"]


def __getattr__(name: str) -> Any:
    if name == "bake":
        from baking.pipeline import bake

        return bake
    if name == "BakeSpec":
        from baking.spec import BakeSpec

        return BakeSpec
    if name == "load_artifact":
        from baking.export import load_artifact

        return load_artifact
    raise AttributeError(name)

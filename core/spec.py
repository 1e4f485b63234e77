"""The bake-job spec as the API accepts it (DESIGN.md §3): pydantic, unknown fields are errors.

This is the wire contract. `baking.spec.BakeSpec.from_dict` re-validates the same dict as
typed dataclasses on the worker side, because the API must never import `baking`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

COMPLIANCE_PROFILES_DIR = Path(__file__).resolve().parent.parent / "baking" / "compliance_profiles"
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Free-form JSON (tool schemas, arguments, results) is walked by the worker and by jsonschema:
# bounded so no consumer recurses without end. Legitimate tool schemas are a few levels deep.
MAX_VALUE_DEPTH = 16
Text = Annotated[str, StringConstraints(max_length=2000)]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
MODEL_URL = re.compile(r"^(bakehouse://[a-z0-9][a-z0-9._-]{0,127}|file:///.+|s3://[a-z0-9][a-z0-9.-]{1,62}/.*)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def json_depth(value: Any, *, stop_above: int = MAX_VALUE_DEPTH) -> int:
    """Nesting depth of dicts/lists (a scalar is 0, {} is 1); iterative, stops once past `stop_above`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_above:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _bounded_depth(value: Any) -> Any:
    if json_depth(value) > MAX_VALUE_DEPTH:
        raise ValueError(f"nests deeper than {MAX_VALUE_DEPTH} levels")
    return value


class ToolExample(_Strict):
    query: str = Field(min_length=1, max_length=2000)
    arguments: dict[str, Any]
    result: Any | None = Field(default=None, description="Tool output for this call, from a real execution.")
    answer: str | None = Field(default=None, max_length=4000, description="Final answer in persona.")

    @field_validator("arguments", "result")
    @classmethod
    def _shallow(cls, v: Any) -> Any:
        return _bounded_depth(v)


class ToolSpec(_Strict):
    name: str = Field(description="Function name, [A-Za-z_][A-Za-z0-9_]*")
    description: str = Field(min_length=1, max_length=2000)
    parameters: dict[str, Any] = Field(description="JSON Schema of the arguments (type: object).")
    # Per string parameter: how a generated argument is compared to the expected one.
    argument_match: dict[str, Literal["exact", "case_insensitive", "keywords", "expression"]] = Field(
        default_factory=dict
    )
    examples: list[ToolExample] = Field(default_factory=list, max_length=2000)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOOL_NAME.match(v):
            raise ValueError("must match [A-Za-z_][A-Za-z0-9_]{0,63}")
        return v

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type") != "object" or not isinstance(v.get("properties", {}), dict):
            raise ValueError("must be a JSON Schema object: {type: object, properties: {...}}")
        return _bounded_depth(v)

    @model_validator(mode="after")
    def _examples_match_schema(self) -> ToolSpec:
        props = self.parameters.get("properties", {})
        required = set(self.parameters.get("required", []))
        for key in self.argument_match:
            if key not in props:
                raise ValueError(f"argument_match names unknown parameter {key!r}")
        for i, ex in enumerate(self.examples):
            unknown = set(ex.arguments) - set(props)
            missing = required - set(ex.arguments)
            if unknown or missing:
                raise ValueError(f"examples[{i}].arguments: unknown {sorted(unknown)}, missing {sorted(missing)}")
            for name, value in ex.arguments.items():
                enum = props[name].get("enum") if isinstance(props[name], dict) else None
                if enum is not None and value not in enum:
                    raise ValueError(f"examples[{i}].arguments.{name}: {value!r} not in enum")
        return self


class PersonaExample(_Strict):
    user: str = Field(min_length=1, max_length=2000)
    assistant: str = Field(min_length=1, max_length=4000)


class PersonaSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    style: Literal["formal", "casual", "technical", "friendly", "professional"] = "professional"
    expertise: Literal["beginner", "intermediate", "expert"] = "expert"
    domain: str = Field(default="general", max_length=200)
    guidelines: list[Text] = Field(default_factory=list, max_length=50)
    system_prompt: str | None = Field(default=None, max_length=20000)
    sample_queries: list[Text] = Field(default_factory=list, max_length=2000)
    examples: list[PersonaExample] = Field(default_factory=list, max_length=2000)


class PruningSpec(_Strict):
    method: Literal["none", "magnitude", "wanda"] = "none"
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> PruningSpec:
        """The same rules as baking/prune.py, so a contradiction is a 422 and not a failed job."""
        if self.method == "none" and (self.sparsity != 0.0 or self.pattern != "unstructured"):
            raise ValueError("sparsity and pattern need a pruning method (magnitude or wanda)")
        if self.method != "none" and self.pattern == "2:4" and self.sparsity not in (0.0, 0.5):
            raise ValueError("pattern 2:4 zeroes exactly half of the weights: sparsity 0.5 or left out")
        if self.method != "none" and self.pattern == "unstructured" and self.sparsity == 0.0:
            raise ValueError("unstructured pruning needs a sparsity in (0, 1)")
        return self


class OptimizeSpec(_Strict):
    quantization: Literal["auto", "none", "bf16", "int8", "int4"] = "auto"
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    distill: bool = True
    compile: bool = True


class TargetsSpec(_Strict):
    accuracy_retention: float = Field(default=0.99, ge=0.0, le=1.0)
    speedup: float | None = Field(default=3.0, gt=0.0)
    compression: float | None = Field(default=0.75, ge=0.0, lt=1.0)
    latency_ms_p95: float | None = Field(default=None, gt=0.0)
    compliance_score: float = Field(default=0.95, ge=0.0, le=1.0)


class TrainingSpec(_Strict):
    method: Literal["lora", "full"] = "lora"
    steps: int | None = Field(default=None, ge=1, le=100_000)
    learning_rate: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Peak learning rate; null picks 1e-3 for lora, 5e-5 for full."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    lora_rank: int = Field(default=16, ge=1, le=256)
    batch_size: int | None = Field(default=None, ge=1, le=512)
    distill_top_k: int = Field(
        default=256,
        ge=0,
        le=1_000_000,
        description="Teacher tokens kept per position for persona distillation, the rest as one bucket; "
        "0 keeps the whole vocabulary (exact, 96 KiB a token on SmolLM2).",
    )


class BakeJobSpec(_Strict):
    model: str = Field(max_length=2048, description="bakehouse://NAME, file:///abs/dir or s3://bucket/prefix/")
    tools: list[ToolSpec] = Field(default_factory=list, max_length=64)
    irrelevant_examples: list[Text] = Field(default_factory=list, max_length=2000)
    persona: PersonaSpec | None = None
    optimize: OptimizeSpec = Field(default_factory=OptimizeSpec)
    targets: TargetsSpec = Field(default_factory=TargetsSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    profile: Literal["quick", "standard", "thorough"] = "standard"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compliance_profile: str = Field(default="default", max_length=64)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=32)

    @field_validator("model")
    @classmethod
    def _model_url(cls, v: str) -> str:
        if not MODEL_URL.match(v):
            raise ValueError("must be bakehouse://NAME, file:///absolute/dir or s3://bucket/prefix/")
        if "/../" in v or v.endswith("/..") or "\x00" in v:
            raise ValueError("must not contain '..' segments")
        return v

    @field_validator("compliance_profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        # profiles are data files in baking/compliance_profiles/; read by path so the API never imports baking
        known = sorted(p.stem for p in COMPLIANCE_PROFILES_DIR.glob("*.json"))
        if v not in known:
            raise ValueError(f"unknown compliance profile {v!r}; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _unique_tool_names(self) -> BakeJobSpec:
        names = [t.name for t in self.tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tools: duplicate names {dupes}")
        return self

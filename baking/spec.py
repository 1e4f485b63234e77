"""Typed pipeline configuration: the job spec (DESIGN.md §3) as validated dataclasses.

The API validates the same dict with pydantic (core/spec.py) and never imports this
module; the worker and the CLI turn it into these dataclasses with `BakeSpec.from_dict`.
Every check raises ValueError naming the field, never `assert` (stripped by `python -O`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

STYLES = ("formal", "casual", "technical", "friendly", "professional")
EXPERTISE = ("beginner", "intermediate", "expert")
MATCH_RULES = ("exact", "case_insensitive", "keywords", "expression")
QUANTIZATION = ("auto", "none", "bf16", "int8", "int4")
PRUNING = ("none", "magnitude", "wanda")
PROFILES = ("quick", "standard", "thorough")
DEVICES = ("auto", "cpu", "cuda")
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

T = TypeVar("T")


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {message}")


@dataclass(frozen=True)
class ToolExample:
    query: str  # what the user says
    arguments: dict[str, Any]  # the expected call's arguments
    result: Any = None  # the tool's output for this call, from a real execution
    answer: str | None = None  # the final answer in persona, given the result

    def __post_init__(self) -> None:
        _require(bool(self.query.strip()), "query", "must not be empty")
        _require(isinstance(self.arguments, dict), "arguments", "must be an object")


@dataclass(frozen=True)
class ToolSpec:
    name: str  # function name the model emits
    description: str  # one line shown to the prompted baseline
    parameters: dict[str, Any]  # JSON Schema object of the arguments
    argument_match: dict[str, str] = field(default_factory=dict)  # per string parameter: how to compare
    examples: tuple[ToolExample, ...] = ()  # user-written; the held-out split comes from these

    def __post_init__(self) -> None:
        _require(bool(TOOL_NAME.match(self.name)), "tools.name", f"{self.name!r} is not a valid function name")
        _require(self.parameters.get("type") == "object", f"tools.{self.name}.parameters", "must be type: object")
        props = self.parameters.get("properties", {})
        for key, rule in self.argument_match.items():
            _require(key in props, f"tools.{self.name}.argument_match", f"unknown parameter {key!r}")
            _require(rule in MATCH_RULES, f"tools.{self.name}.argument_match.{key}", f"one of {MATCH_RULES}")

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self.parameters.get("properties", {}))


@dataclass(frozen=True)
class PersonaExample:
    user: str
    assistant: str


@dataclass(frozen=True)
class PersonaSpec:
    name: str  # what the model calls itself
    style: str = "professional"  # one of STYLES
    expertise: str = "expert"  # one of EXPERTISE
    domain: str = "general"  # field of expertise, free text
    guidelines: tuple[str, ...] = ()  # behaviour rules the prompt stated
    system_prompt: str | None = None  # explicit prompt; otherwise rendered from the fields
    sample_queries: tuple[str, ...] = ()  # prompts used to distil and to measure the persona
    examples: tuple[PersonaExample, ...] = ()  # demonstrations: targets where the teacher falls short

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "persona.name", "must not be empty")
        _require(self.style in STYLES, "persona.style", f"one of {STYLES}")
        _require(self.expertise in EXPERTISE, "persona.expertise", f"one of {EXPERTISE}")


@dataclass(frozen=True)
class PruningSpec:
    method: str = "none"  # none | magnitude | wanda
    pattern: str = "unstructured"  # unstructured | 2:4
    sparsity: float = 0.0  # share of weights zeroed, [0, 1)

    def __post_init__(self) -> None:
        _require(self.method in PRUNING, "optimize.pruning.method", f"one of {PRUNING}")
        _require(self.pattern in ("unstructured", "2:4"), "optimize.pruning.pattern", "unstructured or 2:4")
        _require(0.0 <= self.sparsity < 1.0, "optimize.pruning.sparsity", "must be in [0, 1)")
        if self.method == "none":
            _require(self.sparsity == 0.0, "optimize.pruning.sparsity", "needs a pruning method")
            _require(self.pattern == "unstructured", "optimize.pruning.pattern", "needs a pruning method")
        elif self.pattern == "2:4":
            _require(self.sparsity in (0.0, 0.5), "optimize.pruning.sparsity", "2:4 means 0.5 (or left out)")
        else:
            _require(self.sparsity > 0.0, "optimize.pruning.sparsity", "must be in (0, 1) to prune")


@dataclass(frozen=True)
class OptimizeSpec:
    quantization: str = "auto"  # auto searches; none keeps the baked float weights
    pruning: PruningSpec = field(default_factory=PruningSpec)
    distill: bool = True  # KL recovery after compression
    # also time the final model with a static KV cache and a torch.compile'd decoding step, and
    # report that latency where it is the faster one (baking.generate.compile_decoding)
    compile: bool = True

    def __post_init__(self) -> None:
        _require(self.quantization in QUANTIZATION, "optimize.quantization", f"one of {QUANTIZATION}")


@dataclass(frozen=True)
class TargetsSpec:
    accuracy_retention: float = 0.99
    speedup: float | None = 3.0
    compression: float | None = 0.75
    latency_ms_p95: float | None = None
    compliance_score: float = 0.95


# LoRA adapters start at zero and need a larger step than full fine-tuning, which moves
# every pretrained weight; measured on SmolLM2-135M with the fleet-assistant job.
DEFAULT_LEARNING_RATE = {"lora": 1e-3, "full": 5e-5}


# Persona distillation keeps the teacher's 256 most likely tokens per position and one bucket
# for the rest of the vocabulary (baking.train.top_k_kl). On the fleet job's teacher answers those
# hold 98% of the mass, and the KL's gradient over every weight has cosine 0.999 with the whole
# vocabulary's and 0.95 of its norm (64 tokens: 0.995 and 0.88), for 2 KiB a token instead of
# 96 KiB (benchmarks/distill_topk.py; README, Measured). 0 keeps the whole vocabulary.
DEFAULT_DISTILL_TOP_K = 256


@dataclass(frozen=True)
class TrainingSpec:
    method: str = "lora"  # lora (merged at the end) | full
    steps: int | None = None  # None: the profile's preset
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATE for the method, scaled by the profile
    seed: int = 0
    lora_rank: int = 16
    batch_size: int | None = None  # None: the profile's preset
    distill_top_k: int = DEFAULT_DISTILL_TOP_K  # teacher tokens kept per position; 0: the whole vocabulary

    def __post_init__(self) -> None:
        _require(self.method in ("lora", "full"), "training.method", "lora or full")
        _require(self.distill_top_k >= 0, "training.distill_top_k", "must be >= 0 (0: the whole vocabulary)")
        _require(self.steps is None or self.steps >= 1, "training.steps", "must be >= 1")
        _require(
            self.learning_rate is None or 0 < self.learning_rate <= 1, "training.learning_rate", "must be in (0, 1]"
        )
        _require(self.lora_rank >= 1, "training.lora_rank", "must be >= 1")


@dataclass(frozen=True)
class ProfilePreset:
    """Steps and evaluation sizes behind `profile`; explicit `training.steps` wins."""

    steps: int
    batch_size: int
    heldout_fraction: float
    persona_samples: int  # teacher responses per persona query
    max_new_tokens: int  # length of teacher responses and of evaluated generations
    eval_persona_queries: int  # held-out persona queries measured (0 = all held out)
    # times the method's DEFAULT_LEARNING_RATE when the job sets none: a short schedule needs a
    # larger step (README, Measured: the quick profile at twice the rate, two seeds)
    learning_rate_scale: float = 1.0


PROFILE_PRESETS: dict[str, ProfilePreset] = {
    "quick": ProfilePreset(
        # 240, not 120: at both seeds measured, twice the steps took held-out tool calls from a
        # third (0.33 / 0.34) to 0.53 / 0.41, near the standard profile's ~0.5 (README, Measured)
        steps=240,
        batch_size=8,
        heldout_fraction=0.2,
        persona_samples=1,
        max_new_tokens=40,
        eval_persona_queries=6,
        learning_rate_scale=2.0,
    ),
    "standard": ProfilePreset(
        steps=400, batch_size=8, heldout_fraction=0.2, persona_samples=2, max_new_tokens=64, eval_persona_queries=0
    ),
    "thorough": ProfilePreset(
        steps=1000, batch_size=16, heldout_fraction=0.2, persona_samples=2, max_new_tokens=96, eval_persona_queries=0
    ),
}


@dataclass(frozen=True)
class BakeSpec:
    model: str  # bakehouse://NAME or file:///abs/dir (the worker materialises s3:// first)
    tools: tuple[ToolSpec, ...] = ()
    irrelevant_examples: tuple[str, ...] = ()
    persona: PersonaSpec | None = None
    optimize: OptimizeSpec = field(default_factory=OptimizeSpec)
    targets: TargetsSpec = field(default_factory=TargetsSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    profile: str = "standard"
    device: str = "auto"
    compliance_profile: str = "default"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(
            self.model.startswith(("bakehouse://", "file://")),
            "model",
            "must be bakehouse://NAME or file:///abs/dir here (s3:// is materialised by the worker)",
        )
        _require(self.profile in PROFILES, "profile", f"one of {PROFILES}")
        _require(self.device in DEVICES, "device", f"one of {DEVICES}")
        names = [t.name for t in self.tools]
        _require(len(names) == len(set(names)), "tools", "names must be unique")

    @property
    def preset(self) -> ProfilePreset:
        return PROFILE_PRESETS[self.profile]

    @property
    def learning_rate(self) -> float:
        """The peak learning rate training uses: the job's own, else the method's default scaled by the profile."""
        if self.training.learning_rate is not None:
            return self.training.learning_rate
        return DEFAULT_LEARNING_RATE[self.training.method] * self.preset.learning_rate_scale

    @property
    def bakes_anything(self) -> bool:
        return bool(self.tools) or self.persona is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BakeSpec:
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# Nested dataclass fields and tuple-of-dataclass fields, for the dict round trip.
_NESTED: dict[tuple[type, str], type] = {
    (BakeSpec, "tools"): ToolSpec,
    (BakeSpec, "persona"): PersonaSpec,
    (BakeSpec, "optimize"): OptimizeSpec,
    (BakeSpec, "targets"): TargetsSpec,
    (BakeSpec, "training"): TrainingSpec,
    (ToolSpec, "examples"): ToolExample,
    (PersonaSpec, "examples"): PersonaExample,
    (OptimizeSpec, "pruning"): PruningSpec,
}


def _build(cls: type[T], data: Any, path: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'spec'}: must be an object")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path or 'spec'}: unknown field(s) {unknown}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        where = f"{path}.{name}" if path else name
        if sub is not None and value is not None:
            if isinstance(value, list):
                value = tuple(_build(sub, v, f"{where}[{i}]") for i, v in enumerate(value))
            else:
                value = _build(sub, value, where)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{path or 'spec'}: {exc}") from exc


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj

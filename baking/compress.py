"""Compression of the baked model, and the accuracy-aware search over compression settings.

`compress(model, quantization, device)` builds one setting: `none` (fp32), `bf16`, `int8`
(weight-only, per output channel) or `int4` (weight-only, group-wise, group 32 by default);
see `baking.quant`. Embeddings, and lm_head (tied to them in SmolLM2), stay in the float
compute dtype unless a `Candidate` asks for an int8 lm_head (`int8`: untied, the embeddings
float; `int8-tied`: both int8, one shared tensor).

`search(model, config, device=..., evaluate=...)` is the `auto` setting, in the style of
Intel Neural Compressor's accuracy-aware tuning: candidates from most to least aggressive,
each measured by the caller's `evaluate`, the first that keeps `accuracy_retention` wins,
every trial is recorded; when none does, the least aggressive is kept and the failed target
is named.

`sparsify(model, PruneConfig, data, recovery=...)` runs before either: a pruned copy of the
baked model (baking.prune), optionally distilled back towards it (baking.recover), still in
float; quantize that, then `with_pruning` records what the stored weights kept of the sparsity.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from baking import gptq, quant
from baking.prune import PruneConfig, prune_, sparsity_summary
from baking.recover import RecoveryConfig, RecoveryData, mean_kl, recover

SCHEMES = ("none", "bf16", "int8", "int4")
ROUNDINGS = ("nearest", "gptq")
GptqKey = tuple[str, int, tuple[str, ...]]  # scheme, group_size, int8_parts: what fixes which layers GPTQ rounds how
# The task accuracies DESIGN.md §6 defines accuracy_retention over (as `evaluate` names them).
ACCURACY_KEYS = ("tool_call_accuracy", "irrelevance_accuracy", "guideline_pass_rate")


@dataclass(frozen=True)
class Candidate:
    """One compression setting."""

    scheme: str  # none | bf16 | int8 | int4
    group_size: int = 32  # int4 only: inputs sharing one scale and zero (32 | 64 | 128)
    lm_head: str = "bf16"  # bf16: tied to the float embeddings; int8: untied, int8; int8-tied: both int8, shared
    int8_parts: tuple[str, ...] = ()  # int4 only: projections kept in int8 (e.g. "up_proj")
    # int8 | int4: nearest | gptq (baking.gptq, every integer layer of the decoder blocks, calibrated
    # on the job's conversations; the embeddings and lm_head round to nearest either way)
    rounding: str = "nearest"
    # int4 + gptq only: compression vs fp32 to reach with the fewest int4 layers, the ones GPTQ
    # rounded with the least output error first; the other layers int4 would take are int8
    size_target: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "int8_parts", tuple(self.int8_parts))  # JSON gives lists
        if self.int8_parts and self.scheme != "int4":
            raise ValueError("int8_parts mixes precisions within int4 only")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding != "nearest" and self.scheme not in quant.SCHEMES:
            raise ValueError(f"rounding={self.rounding} applies to int8 and int4 only")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.size_target is not None:
            if self.rounding != "gptq" or self.scheme != "int4":
                raise ValueError("size_target ranks int4 layers by GPTQ's output error: it needs int4, rounding=gptq")
            if not 0 <= self.size_target < 1:
                raise ValueError(f"size_target must be in [0, 1), got {self.size_target}")
        if self.group_size not in quant.GROUP_SIZES:
            raise ValueError(f"group_size must be one of {quant.GROUP_SIZES}, got {self.group_size}")
        if self.lm_head not in quant.LM_HEAD_MODES:
            raise ValueError(f"lm_head must be one of {quant.LM_HEAD_MODES}, got {self.lm_head!r}")
        if self.lm_head != "bf16" and self.scheme not in quant.SCHEMES:
            raise ValueError(f"lm_head={self.lm_head} needs an integer scheme, not {self.scheme}")

    @property
    def name(self) -> str:
        base = f"int4-g{self.group_size}" if self.scheme == "int4" else self.scheme
        if self.rounding != "nearest":
            base += f"-{self.rounding}"
        if self.int8_parts:
            base += "+int8:" + ",".join(p.removesuffix("_proj") for p in self.int8_parts)
        if self.size_target is not None:
            base += f"+fit{self.size_target:g}"
        return base if self.lm_head == "bf16" else f"{base}+lm_head-{self.lm_head}"

    @property
    def gptq_key(self) -> GptqKey:
        """What GPTQ's codes for this candidate are cached under, when it rounds with GPTQ:
        candidates with the same key round the same layers the same way."""
        return (self.scheme, self.group_size, self.int8_parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        return cls(**data)


# Most -> least aggressive. Measured on the fleet job's standard bake of SmolLM2-135M
# (benchmarks/compress.py, CPU, bf16 activations; README "Measured"): round-to-nearest int4 erases
# the baked LoRA update (held-out tool accuracy 0.41 -> 0.00 with every projection in int4, 0.30
# with an int8 MLP); GPTQ rounding, calibrated on the job's own conversations, keeps most of it,
# and with gate/up — where the update is largest — in int8 it kept every tool call (retention
# 1.05, 78.6% smaller than fp32, 3.99x faster than the prompted original), though on other bakes
# it lost a case or two of ~22 (0.92-0.96). Then int8 everywhere but down_proj, which is GPTQ int4:
# 76.8% — the one setting past the 0.75 compression target with int8's fidelity (top-1 0.935 vs
# 0.877 for the gate/up mix on the same bake). Then `fit`: GPTQ int8 everywhere, and int4 only for
# the fewest decoder layers of any kind, least output error first, that the job's compression
# target needs (three at 0.75: 75.0%, KL 0.0030 against 0.0051 when only down_proj may take int4,
# on a quick bake); then GPTQ int8 alone (KL 0.0027 against 0.0047 rounded to nearest, 74.9%: just
# short of 0.75). GPTQ rounds every decoder-block integer layer, int8 ones included. The 49k x 576
# embedding (tied lm_head) is a fifth of the weights: the integer candidates store it once, in
# int8, for both uses.
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_BUT_DOWN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
DEFAULT_CANDIDATES = (
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=("gate_proj", "up_proj"), rounding="gptq"),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=ALL_BUT_DOWN, rounding="gptq"),
    Candidate("int4", 32, lm_head="int8-tied", rounding="gptq", size_target=0.75),
    Candidate("int8", lm_head="int8-tied", rounding="gptq"),
    Candidate("int8", lm_head="int8-tied"),
    Candidate("bf16"),
)


def default_candidates(compression: float | None) -> tuple[Candidate, ...]:
    """DEFAULT_CANDIDATES with the size-fitted one aimed at the job's `targets.compression`
    (left out when the job sets none: with no size to reach it would only repeat int8)."""
    return tuple(
        c if c.size_target is None else replace(c, size_target=compression)
        for c in DEFAULT_CANDIDATES
        if c.size_target is None or compression is not None
    )


@dataclass(frozen=True)
class SearchConfig:
    """What the `auto` search tries and what it must keep."""

    accuracy_retention: float = 0.99  # targets.accuracy_retention: min over ACCURACY_KEYS of compressed/uncompressed
    candidates: tuple[Candidate, ...] = DEFAULT_CANDIDATES  # most -> least aggressive
    accuracy_keys: tuple[str, ...] = ACCURACY_KEYS  # keys of evaluate()'s dict that count as task accuracy

    def __post_init__(self) -> None:
        if not 0.0 < self.accuracy_retention <= 1.5:
            raise ValueError(f"accuracy_retention must be in (0, 1.5], got {self.accuracy_retention}")
        if not self.candidates:
            raise ValueError("candidates must not be empty")
        if not self.accuracy_keys:
            raise ValueError("accuracy_keys must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy_retention": self.accuracy_retention,
            "candidates": [c.to_dict() for c in self.candidates],
            "accuracy_keys": list(self.accuracy_keys),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchConfig:
        return cls(
            accuracy_retention=float(data.get("accuracy_retention", 0.99)),
            candidates=tuple(Candidate.from_dict(c) for c in data.get("candidates", [])) or DEFAULT_CANDIDATES,
            accuracy_keys=tuple(data.get("accuracy_keys", ACCURACY_KEYS)),
        )


@dataclass
class Trial:
    candidate: str
    scheme: dict[str, Any]  # JSON-safe scheme dict of the built model
    metrics: dict[str, Any]  # what evaluate() returned
    accuracy_retention: float | None
    met: bool
    seconds: float


@dataclass
class SearchResult:
    model: Any
    scheme: dict[str, Any]  # compress()'s scheme dict plus "search": the JSON-safe record below
    met: bool
    failed_target: str | None
    trials: list[Trial] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- one setting


def compress(
    model: Any,
    quantization: str | Candidate,
    device: torch.device,
    *,
    calibration: Sequence[Sequence[int]] = (),
    gptq_cache: dict[GptqKey, gptq.GptqLayers] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(final model, scheme dict). The scheme dict keys: scheme, dtype, dtype_torch (not JSON),
    weight_bytes (stored bytes), params (parameter count of the uncompressed input, tied
    weights once: `params * 4` is the fp32 size to compare against), and for int8/int4 the
    quantization details (group_size, lm_head, quantized_layers, float_layers).
    `calibration` (token id sequences) is what a GPTQ candidate calibrates on; `gptq_cache`
    keeps GPTQ's codes across calls for the same model and calibration (candidates with the same
    scheme, group size and int8 parts, such as a size fit and its unfitted twin, round the same
    layers the same way; the default candidates share no such key)."""
    if isinstance(quantization, str) and quantization == "auto":
        # `auto` needs an evaluator: the pipeline calls search(); compress alone keeps bf16.
        final, scheme = compress(model, Candidate("bf16"), device)
        return final, {**scheme, "requested": "auto", "note": "auto needs search(); bf16 used"}
    candidate = quantization if isinstance(quantization, Candidate) else Candidate(quantization)
    params = quant.logical_params(model)
    if candidate.scheme == "none":
        return model, _scheme_dict(candidate, model, torch.float32, {}, params)
    dtype = quant.compute_dtype(device)
    final = copy.deepcopy(model)
    info: dict[str, Any] = {}
    if candidate.scheme in quant.SCHEMES:
        # quantize from the float32 weights, then cast what stays float
        final.float()
        layers = gptq.GptqLayers({}, {})
        fit: dict[str, Any] | None = None
        if candidate.rounding == "gptq":
            if not calibration:
                raise ValueError(f"{candidate.name} needs calibration sequences")
            layers = (gptq_cache or {}).get(candidate.gptq_key) or _gptq_layers(final, candidate, calibration)
            if gptq_cache is not None:
                gptq_cache[candidate.gptq_key] = layers
            if candidate.size_target is not None:
                int4_layers, fit = _fit_int4_to_size(model, candidate, candidate.size_target, layers, device)
                # Round again with the int4 layers the fit chose and int8 everywhere else, so every
                # block calibrates on what this mix computes (the pass above had int4 for all of them).
                final = copy.deepcopy(model).float()
                layers = _gptq_layers(final, candidate, calibration, int4_layers=int4_layers)
        info = quant.quantize_model_(
            final,
            candidate.scheme,
            group_size=candidate.group_size,
            lm_head=candidate.lm_head,
            int8_parts=candidate.int8_parts,
            precomputed_int4=layers.codes,
            precomputed_int8=layers.int8_codes,
            int4_layers=set(layers.codes) if fit is not None else None,
        )
        if candidate.rounding == "gptq":
            info["rounding"] = {
                "method": "gptq",
                "layers": {"int4": len(layers.codes), "int8": len(layers.int8_codes)},
                "calibration_sequences": len(calibration),
            }
        if fit is not None:
            info["fit"] = fit
    else:
        dtype = torch.bfloat16
    quant.cast_floats_(final, dtype)
    final.eval()
    return final, _scheme_dict(candidate, final, dtype, info, params)


def _gptq_layers(
    final: Any,
    candidate: Candidate,
    calibration: Sequence[Sequence[int]],
    *,
    int4_layers: Collection[str] | None = None,
) -> gptq.GptqLayers:
    """GPTQ on `final` (float, in place) for every layer the candidate makes an integer layer:
    int4 where the candidate puts int4 (or only `int4_layers`, when given), int8 elsewhere."""

    def int4(name: str) -> bool:
        if candidate.scheme != "int4":
            return False
        if int4_layers is not None:
            return name in int4_layers
        return name.rsplit(".", 1)[-1] not in candidate.int8_parts

    return gptq.gptq_quantize_(
        final,
        calibration,
        group_size=candidate.group_size,
        select=int4,
        select_int8=lambda name: not int4(name),
    )


def _fit_int4_to_size(
    model: Any, candidate: Candidate, target: float, layers: gptq.GptqLayers, device: torch.device
) -> tuple[set[str], dict[str, Any]]:
    """The fewest of GPTQ's int4 layers that bring the stored weights to `target` compression vs
    fp32, taken in order of least output error; every other layer is int8. Returns their names
    and a JSON-safe record. When every layer is not enough, all are int4 and the record says so.

    Mixed precision under a size budget, as llama.cpp's k-quant mixes and HAWQ-style searches
    do it: int8 everywhere (with an int8 tied lm_head) stores 74.9% less than fp32 for
    SmolLM2-135M, just short of a 0.75 target, and three of its 210 decoder layers in int4 close
    the gap while the model computes almost exactly what int8 computes (README, Measured)."""
    _, int8_scheme = compress(model, Candidate("int8", lm_head=candidate.lm_head), device)
    budget = (1 - target) * 4 * int8_scheme["params"]
    size = int8_scheme["weight_bytes"]
    chosen: list[str] = []
    for name in sorted(layers.codes, key=lambda n: layers.output_error[n]):
        if size <= budget:
            break
        size -= quant.int4_saving(model.get_submodule(name), candidate.group_size)
        chosen.append(name)
    return set(chosen), {
        "size_target": target,
        "reached": size <= budget,
        "int4_layers": {n: round(layers.output_error[n], 6) for n in chosen},  # name: output error
        "int8_instead": len(layers.codes) - len(chosen),
    }


def _scheme_dict(
    candidate: Candidate, model: Any, dtype: torch.dtype, info: dict[str, Any], params: int
) -> dict[str, Any]:
    state = quant.quantized_state_dict(model)
    return {
        "scheme": candidate.scheme,
        "name": candidate.name,
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_torch": dtype,
        "weight_bytes": quant.weight_bytes(state),
        "params": params,
        **{k: v for k, v in info.items() if k != "scheme"},
    }


# ---------------------------------------------------------------- pruning, before quantization


def sparsify(
    model: Any,
    config: PruneConfig,
    data: RecoveryData,
    *,
    recovery: RecoveryConfig | None = None,
    on_block: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(pruned float copy of `model`, JSON-safe record). `model` itself is left untouched: it is
    the teacher that `recovery` (when given) distils the copy back towards."""
    student = copy.deepcopy(model)
    started = time.monotonic()
    calibration = data.calibration if config.method == "wanda" else []
    masks = prune_(student, config, calibration=calibration, should_stop=should_stop, on_block=on_block)
    record: dict[str, Any] = {
        **config.to_dict(),
        "layers": "Linear layers of the decoder blocks; embeddings and lm_head stay dense",
        "calibration_sequences": len(calibration),
        "prune_seconds": round(time.monotonic() - started, 3),
        "data": data.sources,
        "recovery": None,
    }
    if recovery is not None:
        before = mean_kl(student, model, data.heldout) if data.heldout else None
        report = recover(
            student, model, data.sequences, recovery, masks=masks, on_step=on_step, should_stop=should_stop
        )
        after = mean_kl(student, model, data.heldout) if data.heldout else None
        record["recovery"] = {
            **recovery.to_dict(),
            "loss": "full-vocabulary KL(teacher || student); teacher = the uncompressed baked model",
            "sequences": len(data.sequences),
            "trainable_parameters": report.trainable_parameters,
            "kl_first": report.first_loss,
            "kl_last": report.last_loss,
            "kl_heldout_before": before,
            "kl_heldout_after": after,
            "seconds": round(report.seconds, 1),
        }
    record["achieved"] = sparsity_summary(student)
    return student, record


def with_pruning(final: Any, scheme: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """`scheme` plus the pruning record and the sparsity of the stored (dequantized) weights.

    bf16 and int8 (symmetric: code 0 is exactly 0.0) keep every zero. int4 is asymmetric
    (w = (code - 8) * scale + zero, zero = group min + 8 * scale): 0.0 is representable only
    by chance, so pruned weights come back as values within half a step of 0 and a 2:4
    pattern does not survive; `zeros_kept` says which happened.
    """
    after = sparsity_summary(final, per_layer=False)
    kept = after["zeros"] >= record["achieved"]["zeros"]
    return {**scheme, "pruning": {**record, "after_quantization": {**after, "zeros_kept": kept}}}


# ---------------------------------------------------------------- the auto search


def accuracy_retention(metrics: Mapping[str, Any], reference: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    """min over `keys` measured on both sides (reference > 0) of compressed / uncompressed."""
    ratios = [
        float(metrics[k]) / float(reference[k])
        for k in keys
        if isinstance(metrics.get(k), int | float)
        and isinstance(reference.get(k), int | float)
        and float(reference[k]) > 0
    ]
    return min(ratios) if ratios else None


# evaluate() may also return, under this key, each case's outcome per accuracy key
# ({"tool_call_accuracy": [True, False, ...], ...}, the same cases in the same order on every
# call); the search then records what each candidate lost and gained case by case.
CASES_KEY = "cases"


def paired_changes(
    cases: Mapping[str, Sequence[bool]] | None,
    reference: Mapping[str, Sequence[bool]] | None,
    keys: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Per accuracy key: the cases the uncompressed model got right and the candidate lost, the
    ones it gained, and `one_case`, how far a single case moves the retention ratio there.

    A ratio of two accuracies on a few dozen cases hides whether a candidate lost three cases
    and gained two or lost one; and where `one_case` exceeds 1 - target, the slice cannot tell a
    lossless candidate from one that flipped a single case: both facts belong in the record.
    """
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        ref, got = (reference or {}).get(key), (cases or {}).get(key)
        if not ref or not got or len(ref) != len(got):
            continue
        right = sum(bool(r) for r in ref)
        out[key] = {
            "cases": len(ref),
            "reference_correct": right,
            "lost": sum(bool(r) and not bool(g) for r, g in zip(ref, got, strict=True)),
            "gained": sum(bool(g) and not bool(r) for r, g in zip(ref, got, strict=True)),
            "one_case": round(1 / right, 4) if right else None,
        }
    return out


def search(
    model: Any,
    config: SearchConfig,
    *,
    device: torch.device,
    evaluate: Callable[[Any], Mapping[str, Any]],
    reference: Mapping[str, Any] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    calibration: Sequence[Sequence[int]] = (),
) -> SearchResult:
    """Try `config.candidates` in order; keep the first whose accuracy retention meets the target.

    `evaluate(model)` returns task accuracies (the `config.accuracy_keys`) and any fidelity
    diagnostics worth recording; `reference` is its result on the uncompressed model (measured
    here when not given). If no candidate meets the target, the last (least aggressive) one is
    returned with `met=False` and `failed_target="accuracy_retention"`. `calibration` goes to
    the GPTQ candidates (see `compress`).
    """
    # GPTQ rounds against the job's activations: with no calibration text it cannot run, so
    # those candidates are passed over (and named in the record) rather than failing the job
    candidates = [c for c in config.candidates if calibration or c.rounding != "gptq"]
    skipped = [c.name for c in config.candidates if c not in candidates]
    if not candidates:
        raise ValueError(f"every candidate needs calibration sequences: {skipped}")
    ref = dict(reference) if reference is not None else dict(evaluate(model))
    ref_cases = ref.pop(CASES_KEY, None)
    trials: list[Trial] = []
    final: Any = None
    scheme: dict[str, Any] = {}
    gptq_cache: dict[GptqKey, gptq.GptqLayers] = {}
    for i, candidate in enumerate(candidates):
        # A cached pass holds a copy of the model's integer weights: keep only the ones a
        # candidate still to try will use.
        still_used = {c.gptq_key for c in candidates[i:] if c.rounding == "gptq"}
        for key in [k for k in gptq_cache if k not in still_used]:
            del gptq_cache[key]
        started = time.monotonic()
        final, scheme = compress(model, candidate, device, calibration=calibration, gptq_cache=gptq_cache)
        metrics = dict(evaluate(final))
        paired = paired_changes(metrics.pop(CASES_KEY, None), ref_cases, config.accuracy_keys)
        if paired:
            metrics["paired"] = paired
        retention = accuracy_retention(metrics, ref, config.accuracy_keys)
        met = retention is not None and retention >= config.accuracy_retention
        trial = Trial(candidate.name, _json_safe(scheme), metrics, retention, met, round(time.monotonic() - started, 3))
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if met:
            break
        if i < len(candidates) - 1:
            del final  # one candidate in memory at a time
    met = trials[-1].met
    failed = None if met else "accuracy_retention"
    best = max((t.accuracy_retention for t in trials if t.accuracy_retention is not None), default=None)
    record = {
        "target": {"accuracy_retention": config.accuracy_retention},
        "met": met,
        "failed_target": failed,
        "chosen": trials[-1].candidate,
        "best_retention": best,
        "reference": _json_safe(ref),
        "trials": [_json_safe(asdict(t)) for t in trials],
        "skipped_without_calibration": skipped,
    }
    notes = []
    if not met:
        notes.append(
            f"no candidate kept accuracy_retention >= {config.accuracy_retention} "
            f"(best {best}); kept the least aggressive, {trials[-1].candidate}"
        )
    coarse = {
        key: p["one_case"]
        for key, p in trials[-1].metrics.get("paired", {}).items()
        if p["one_case"] is not None and p["one_case"] > 1 - config.accuracy_retention
    }
    if coarse:
        # Said plainly, because it decides how to read a failed search: on this slice any one
        # flipped case fails the target, a bf16 rounding difference included.
        record["resolution"] = coarse
        notes.append(
            "the calibration slice is coarser than the target: one case moves retention by "
            + ", ".join(f"{v:.3f} ({k})" for k, v in coarse.items())
            + f" against an allowed loss of {1 - config.accuracy_retention:.3f}"
        )
    if notes:
        record["note"] = "; ".join(notes)
    return SearchResult(final, {**scheme, "search": record}, met, failed, trials, ref)


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items() if not isinstance(v, torch.dtype)}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)

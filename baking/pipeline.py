"""`bake(spec, workdir, ...) -> BakeResult`: the stages of a bake job, in order.

fetching -> preparing -> baking_persona (teacher targets) -> baking_tools (one joint
objective: tool SFT + persona KL) -> optimizing -> validating -> exporting. The worker adds
`uploading`. A job with no tools and no persona is "package and verify": it skips training.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baking import data as bdata
from baking.assure import AssessInputs, assess, load_profile, reload_in_subprocess, spec_sha256, write_report
from baking.card import model_card
from baking.chat import CHAT_TEMPLATE, render_system_prompt, template_default_system, with_system
from baking.compress import (
    CASES_KEY,
    SearchConfig,
    compress,
    default_candidates,
    search,
    sparsify,
    with_pruning,
)
from baking.evaluate import (
    REFUSAL,
    Probe,
    guideline_probes,
    heldout_sequences,
    irrelevance_accuracy,
    persona_fidelity,
    run_probes,
    text_fidelity,
    tool_accuracy,
)
from baking.events import BakeCancelled, BakeError, BakeEvent, BakeResult, CancelCheck, EventSink
from baking.export import write_artifact
from baking.fetch import FetchedModel, fetch_model
from baking.generate import end_of_turn_id
from baking.load import configure_threads, load_model, load_tokenizer, pick_device
from baking.measure import compiled_latency_ms, latency_ms
from baking.persona import build_distill_targets
from baking.prune import PruneConfig
from baking.quant import cast_floats_
from baking.recover import RECOVERY_STEPS, RecoveryConfig, recovery_data
from baking.spec import BakeSpec, PersonaSpec, ToolSpec
from baking.train import TrainConfig, TrainItem, distill_item, sft_item, train


@dataclass
class _Run:
    spec: BakeSpec
    emit_fn: EventSink | None
    cancel_fn: CancelCheck | None
    stage: str = "fetching"
    started: float = 0.0

    def enter(self, stage: str, message: str = "") -> None:
        self.check()
        self.stage = stage
        self.emit(BakeEvent("stage", stage, message or f"stage {stage}"))

    def emit(self, event: BakeEvent) -> None:
        if self.emit_fn is not None:
            self.emit_fn(event)

    def progress(self, step: int, total: int, message: str = "", **data: Any) -> None:
        self.emit(BakeEvent("progress", self.stage, message, step=step, total=total, data=data))

    def info(self, message: str, **data: Any) -> None:
        self.emit(BakeEvent("message", self.stage, message, data=data))

    def check(self) -> None:
        if self.cancel_fn is not None and self.cancel_fn():
            raise BakeCancelled(f"cancelled during {self.stage}")


def bake(
    spec: BakeSpec | dict[str, Any],
    workdir: Path,
    *,
    models_dir: Path,
    on_event: EventSink | None = None,
    should_cancel: CancelCheck | None = None,
    job_id: str | None = None,
) -> BakeResult:
    if not isinstance(spec, BakeSpec):
        try:
            spec = BakeSpec.from_dict(spec)
        except ValueError as exc:
            raise BakeError("invalid_spec", str(exc), "preparing") from exc
    run = _Run(spec, on_event, should_cancel, started=time.monotonic())
    try:
        return _bake(run, Path(workdir), Path(models_dir), job_id)
    except (BakeError, BakeCancelled):
        raise
    except torch.OutOfMemoryError as exc:
        raise BakeError(
            "out_of_memory",
            f"out of memory: {exc}. Try profile: quick, a smaller training.batch_size, or device: cpu.",
            run.stage,
        ) from exc
    except FloatingPointError as exc:
        raise BakeError("training_diverged", str(exc), run.stage) from exc


def _bake(run: _Run, workdir: Path, models_dir: Path, job_id: str | None) -> BakeResult:
    spec = run.spec
    try:
        profile = load_profile(spec.compliance_profile)
    except ValueError as exc:
        raise BakeError("invalid_spec", str(exc), "preparing") from exc
    run.enter("fetching", f"resolving {spec.model}")
    fetched = fetch_model(spec.model, models_dir)
    run.info(
        f"{len(fetched.files)} input files hashed",
        files=[vars(f) for f in fetched.files],
        ignored_pickles=fetched.ignored_pickles,
    )

    run.enter("preparing")
    configure_threads()
    torch.manual_seed(spec.training.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(fetched.path)
    original = load_model(fetched.path, device)
    system_prompt = render_system_prompt(spec.persona, spec.tools)
    split = bdata.split_spec(spec)
    train_split = bdata.augment(split, spec) if spec.bakes_anything else split
    leak_checked = bdata.check_no_leak(train_split)
    sizes = {
        "train_tool_cases": len(train_split.train_tools),
        "heldout_tool_cases": len(split.heldout_tools),
        "train_irrelevant": len(train_split.train_irrelevant),
        "heldout_irrelevant": len(split.heldout_irrelevant),
        "train_persona_queries": len(split.train_persona_queries),
        "heldout_persona_queries": len(split.heldout_persona_queries),
        "train_persona_examples": len(split.train_persona_examples),
        "heldout_persona_examples": len(split.heldout_persona_examples),
    }
    run.info("data split", **sizes, leak_checked=leak_checked, **split.fingerprint())

    train_report = None
    if spec.bakes_anything:
        baked, train_report = _train(run, original, tokenizer, train_split, system_prompt)
    else:
        baked = original

    run.enter("optimizing")
    final, scheme = _optimize(run, baked, tokenizer, train_split, device)
    run.info(f"quantization scheme: {scheme['scheme']}", **{k: v for k, v in scheme.items() if k != "dtype_torch"})

    run.enter("validating")
    metrics = _validate(run, original, baked, final, scheme, tokenizer, split, system_prompt, fetched)
    if train_report is not None:
        metrics["train_loss_first"] = train_report.first_loss
        metrics["train_loss_last"] = train_report.last_loss
        metrics["train_seconds"] = train_report.seconds
        metrics["trainable_parameters"] = train_report.trainable_parameters
    run.emit(BakeEvent("metrics", "validating", "metrics", data=_scalars(metrics)))

    run.enter("exporting")
    out = workdir / "artifact"
    spec_dict = spec.to_dict()
    manifest = {
        "spec": spec_dict,
        "spec_sha256": spec_sha256(spec_dict),
        "seed": spec.training.seed,
        "base_model": spec.model,
        "inputs": [vars(f) for f in fetched.files],
        "ignored_pickles": fetched.ignored_pickles,
        "data": {**split.fingerprint(), **sizes},
        "metrics": metrics,
        "system_prompt_removed": system_prompt,
        "training": {"losses": train_report.losses, "ce": train_report.ce, "kl": train_report.kl}
        if train_report
        else None,
    }
    card = model_card(spec, _scalars(metrics), base_model=spec.model, train_sizes=sizes)
    files = write_artifact(
        out,
        final_model=final,
        merged_model=baked if spec.bakes_anything else None,
        tokenizer=tokenizer,
        final_dtype=scheme["dtype_torch"],
        quantization={k: v for k, v in scheme.items() if k != "dtype_torch"},
        manifest=manifest,
        model_card=card,
    )
    run.info(f"artifact written: {len(files)} files", bytes=sum(f.size for f in files))

    run.enter("assessing", f"compliance checks, profile {profile.name}")
    report = assess(
        AssessInputs(
            model=final,
            tokenizer=tokenizer,
            metrics=metrics,
            targets=dataclasses.asdict(spec.targets),
            tools=spec.tools,
            job_id=job_id,
            artifact_dir=out,
            input_files=fetched.files,
            ignored_pickles=fetched.ignored_pickles,
            model_dir=fetched.path,
            split=split,
            training_split=train_split,
            chat_template=CHAT_TEMPLATE,
            heldout_tools=split.heldout_tools,
            tool_accuracy_fn=lambda cases: tool_accuracy(final, tokenizer, cases, spec.tools).accuracy,
            reload_fn=lambda path: reload_in_subprocess(path, device=device.type),
            training_loss=train_report.losses if train_report else None,
        ),
        profile,
        on_check=lambda i, n, check_id: run.progress(i, n, f"check {check_id}"),
    )
    files = write_report(out, report)
    run.info(
        f"compliance score {report['score']:.3f}, gate {'passed' if report['gate']['passed'] else 'failed'}",
        gate=report["gate"],
    )
    return BakeResult(artifact_dir=out, files=files, metrics=metrics, gate=report["gate"], report=report)


def tool_pool_shares(split: bdata.Split, tools: Sequence[ToolSpec], share: float) -> dict[str, float]:
    """The batch share of each tool's pool ("tools/NAME"), `share` in all, by the examples the
    user wrote for each tool: augmentation multiplies some tools' cases (numbers redrawn,
    arithmetic and enum templates) far more than others', and must not starve the rest. A bake
    that weighted them by the geometric mean of written and augmented counts instead (and gave
    the tools more of the batch: the calculator's share 0.21 -> 0.35) measured no better on the
    fleet job's held-out calls (README, Measured: bake F)."""
    written = {t.name: max(1, sum(c.tool == t.name and not c.synthetic for c in split.train_tools)) for t in tools}
    total = sum(written.values())
    return {f"tools/{name}": share * n / total for name, n in written.items()}


# Share of each batch drawn from the "under_template_system" pool, taken evenly from the others.
# Measured on the fleet job (README, Measured): under SmolLM2's own template the baked model's
# probe tool calls went from 0.639 to 0.833 (it invented sensor readings without it); under the
# shipped template 0.917 -> 0.861 and held-out calls 0.514 -> 0.500, one bake each.
TEMPLATE_SYSTEM_SHARE = 0.1


def _train(run: _Run, original: Any, tokenizer: Any, split: bdata.Split, system_prompt: str) -> tuple[Any, Any]:
    spec = run.spec
    preset = spec.preset
    persona = spec.persona
    run.enter("baking_persona", "teacher (original + full system prompt) answers the persona and irrelevant queries")
    queries = list(split.train_persona_queries) + list(split.train_irrelevant)
    targets, stats = build_distill_targets(
        original,
        tokenizer,
        queries,
        system_prompt=system_prompt,
        guidelines=persona.guidelines if persona else (),
        demos=split.train_persona_examples,
        max_new_tokens=preset.max_new_tokens,
        samples=preset.persona_samples,
        seed=spec.training.seed,
        top_k=spec.training.distill_top_k,
        on_progress=lambda i, n: run.progress(i, n, "teacher targets"),
        should_stop=run.check,
    )
    run.info("teacher targets", **stats)

    run.enter("baking_tools", "one objective: tool SFT + demonstrations + persona KL")
    eot = end_of_turn_id(tokenizer)
    mix = {k: v for k, v in TrainConfig.default_mix().items() if k != "tools"}
    mix |= tool_pool_shares(split, spec.tools, TrainConfig.default_mix()["tools"])
    pools: dict[str, list[TrainItem]] = {}
    for tool in spec.tools:
        cases = [c for c in split.train_tools if c.tool == tool.name]
        pools[f"tools/{tool.name}"] = [
            sft_item(tokenizer, *bdata.tool_conversation(c, with_answer=False), group=c.group) for c in cases
        ]
    pools |= {
        "answers": [
            sft_item(tokenizer, *bdata.tool_conversation(c))
            for c in split.train_tools
            if c.answer and c.result is not None
        ],
        # a demonstration's variants keep its answer: one group per answer
        "demos": [
            sft_item(tokenizer, *bdata.demonstration(e), group=e.assistant) for e in split.train_persona_examples
        ],
        "distill": [distill_item(tokenizer, t, eot) for t in targets],
    }
    template_system = template_default_system(tokenizer)
    if template_system:
        # The same lessons under the base template's own system turn (chat.template_default_system):
        # the written calls, the demonstrations and the teacher answers, once each.
        pools["under_template_system"] = (
            [
                sft_item(tokenizer, *bdata.tool_conversation(c, with_answer=False), system=template_system)
                for c in split.train_tools
                if not c.synthetic
            ]
            + [
                sft_item(tokenizer, *bdata.demonstration(e), system=template_system)
                for e in split.train_persona_examples
            ]
            + [distill_item(tokenizer, t, eot, system=template_system) for t in targets]
        )
        mix = {k: v * (1 - TEMPLATE_SYSTEM_SHARE) for k, v in mix.items()} | {
            "under_template_system": TEMPLATE_SYSTEM_SHARE
        }
        run.info("training under the base template's system turn too", share=TEMPLATE_SYSTEM_SHARE)
    config = TrainConfig(
        steps=spec.training.steps or preset.steps,
        batch_size=spec.training.batch_size or preset.batch_size,
        learning_rate=spec.learning_rate,
        method=spec.training.method,
        lora_rank=spec.training.lora_rank,
        seed=spec.training.seed,
        mix=mix,
    )
    student = copy.deepcopy(original)
    started = time.monotonic()

    def on_step(step: int, total: int, values: dict[str, float]) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / step * (total - step)
        run.progress(
            step,
            total,
            f"step {step}/{total} loss {values['loss']:.4f}",
            eta_s=round(eta, 1),
            **{k: round(v, 6) for k, v in values.items()},
        )

    baked, report = train(student, tokenizer, pools, config, on_step=on_step, should_stop=run.check)
    run.info(
        "training finished",
        first_loss=report.first_loss,
        last_loss=report.last_loss,
        seconds=round(report.seconds, 1),
        pools={k: len(v) for k, v in pools.items()},
    )
    return baked, report


# What the compression search measures each candidate on: written training cases (never the
# held-out ones), taken from each tool in turn, and irrelevant queries. One case on 24 moved
# retention by 4-13% on the quick bake, so a 0.99 target could not tell bf16 from int8 there;
# 96 + 24 cost about a minute per trial on 2 CPU cores.
CALIBRATION_CASES = 96
CALIBRATION_IRRELEVANT = 24
# ...and, for a persona, guideline probes made from the training demonstrations and queries the
# way `validating` makes them from the held-out ones: the gate's retention is the minimum over
# tool, irrelevance *and* guideline accuracy, so a search blind to the guidelines shipped
# candidates that then failed it on a lost refusal.
CALIBRATION_REFUSALS = 12  # refusing demonstrations, the written ones first (augmentation appends its variants)
CALIBRATION_PERSONA_QUERIES = 8


def calibration_slice(cases: Sequence[bdata.ToolCase], n: int) -> list[bdata.ToolCase]:
    """Up to `n` of `cases`, one from each tool in turn, so every tool is measured."""
    by_tool: dict[str, list[bdata.ToolCase]] = {}
    for case in cases:
        by_tool.setdefault(case.tool, []).append(case)
    turns = itertools.zip_longest(*by_tool.values())
    return [case for turn in turns for case in turn if case is not None][:n]


def calibration_probes(persona: PersonaSpec, train_split: bdata.Split) -> list[Probe]:
    """The search's guideline probes: identity, some training demonstrations that refuse, and a
    few training persona queries (refusal probes where the demonstrations refuse them)."""
    refusing = [e for e in train_split.train_persona_examples if REFUSAL.search(e.assistant)]
    probes = guideline_probes(
        persona,
        refusing[:CALIBRATION_REFUSALS],
        train_split.train_persona_queries[:CALIBRATION_PERSONA_QUERIES],
        training_texts=(),
        demos=train_split.train_persona_examples,
    )
    # A fixed identity probe can be one of the job's own held-out questions ("Are you ChatGPT?"):
    # the search must not tune on what `validating` reports.
    held_out = {bdata.text_hash(t) for t in train_split.heldout_texts()}
    return [p for p in probes if bdata.text_hash(p.query) not in held_out]


def _optimize(
    run: _Run, baked: Any, tokenizer: Any, train_split: bdata.Split, device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """Prune (optimize.pruning) -> distillation recovery (optimize.distill) -> quantize: the
    requested scheme, or for `auto` the most compressed candidate that keeps the accuracy.

    Recovery runs only after pruning, on the float model, before quantization: an unpruned
    model has nothing to recover, and training through int8/int4 rounding would need
    quantization-aware training. The search measures retention on a calibration slice of the
    *training* cases, against the uncompressed baked model (not the pruned one), so the choice
    is not tuned on the held-out cases the job then reports; the reported retention is
    measured again on the held-out split in `validating`.
    """
    spec = run.spec
    try:
        pruning = PruneConfig.from_spec(spec.optimize.pruning)
    except ValueError as exc:
        raise BakeError("invalid_spec", str(exc), "optimizing") from exc
    source, pruned = baked, None
    if pruning is not None:
        data = recovery_data(tokenizer, train_split)
        recovery = (
            RecoveryConfig(steps=RECOVERY_STEPS[spec.profile], seed=spec.training.seed)
            if spec.optimize.distill
            else None
        )
        run.info(
            f"pruning: {pruning.method} {pruning.pattern} at sparsity {pruning.sparsity}"
            + (f", then {recovery.steps} recovery steps" if recovery else ", no recovery (optimize.distill is false)"),
            **pruning.to_dict(),
            recovery=recovery.to_dict() if recovery else None,
            data=data.sources,
        )
        source, pruned = sparsify(
            baked,
            pruning,
            data,
            recovery=recovery,
            on_block=lambda i, n: run.progress(i, n, f"pruned block {i}/{n}"),
            on_step=lambda i, n, values: run.progress(
                i, n, f"recovery step {i}/{n} kl {values['kl']:.4f}", **{k: round(v, 6) for k, v in values.items()}
            ),
            should_stop=run.check,
        )
        achieved = pruned["achieved"]
        run.info(
            f"pruned: sparsity {achieved['sparsity']:.4f} over {len(achieved['layers'])} layers",
            **{k: v for k, v in achieved.items() if k != "layers"},
            recovery=pruned["recovery"],
        )
    elif spec.optimize.distill:
        run.info("distillation recovery skipped: nothing was pruned")

    if spec.optimize.quantization != "auto":
        final, scheme = compress(source, spec.optimize.quantization, device)
    else:
        calibration = calibration_slice([c for c in train_split.train_tools if not c.synthetic], CALIBRATION_CASES)
        irrelevant = train_split.train_irrelevant[:CALIBRATION_IRRELEVANT]
        probes = calibration_probes(spec.persona, train_split) if spec.persona is not None else []

        def evaluate(model: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            cases: dict[str, list[bool]] = {}
            if calibration:
                tools = tool_accuracy(model, tokenizer, calibration, spec.tools)
                out["tool_call_accuracy"] = tools.accuracy
                cases["tool_call_accuracy"] = [s["correct"] for s in tools.samples]
            if irrelevant:
                out["irrelevance_accuracy"], samples = irrelevance_accuracy(model, tokenizer, irrelevant)
                cases["irrelevance_accuracy"] = [s["correct"] for s in samples]
            if probes and spec.persona is not None:
                guidelines = run_probes(model, tokenizer, probes, spec.persona)
                out["guideline_pass_rate"] = guidelines["pass_rate"]
                cases["guideline_pass_rate"] = [s["passed"] for s in guidelines["samples"]]
            run.check()
            return out | {CASES_KEY: cases}

        config = SearchConfig(
            accuracy_retention=spec.targets.accuracy_retention,
            candidates=default_candidates(spec.targets.compression),
        )
        gptq_calibration = (
            recovery_data(tokenizer, train_split).calibration
            if any(c.rounding == "gptq" for c in config.candidates)
            else []
        )
        result = search(
            source,
            config,
            device=device,
            evaluate=evaluate,
            calibration=gptq_calibration,
            reference=evaluate(baked) if pruned is not None else None,
            on_trial=lambda t: run.info(
                f"compression trial {t.candidate}: retention {t.accuracy_retention}",
                met=t.met,
                seconds=t.seconds,
                **t.metrics,
            ),
        )
        if not result.met:
            run.emit(
                BakeEvent(
                    "message",
                    "optimizing",
                    str(result.scheme["search"].get("note", "")),
                    level="warning",
                    data={"failed_target": result.failed_target},
                )
            )
        final, scheme = result.model, result.scheme
    if pruned is not None:
        scheme = with_pruning(final, scheme, pruned)
        after = scheme["pruning"]["after_quantization"]
        run.emit(
            BakeEvent(
                "message",
                "optimizing",
                f"after {scheme['name']}: sparsity {after['sparsity']:.4f}"
                + ("" if after["zeros_kept"] else " (quantization did not keep the pruned weights at exactly zero)"),
                level="info" if after["zeros_kept"] else "warning",
                data=after,
            )
        )
    return final, scheme


def _validate(
    run: _Run,
    original: Any,
    baked: Any,
    final: Any,
    scheme: dict[str, Any],
    tokenizer: Any,
    split: bdata.Split,
    system_prompt: str,
    fetched: FetchedModel,
) -> dict[str, Any]:
    spec = run.spec
    preset = spec.preset
    metrics: dict[str, Any] = {}
    _check_finite(final, tokenizer, metrics)
    steps: list[tuple[str, Callable[[], None]]] = []
    compressed = scheme["scheme"] != "none" or bool(scheme.get("pruning"))

    if spec.tools:

        def tools_metrics() -> None:
            ev = tool_accuracy(final, tokenizer, split.heldout_tools, spec.tools)
            metrics["tool_call_accuracy"] = ev.accuracy
            metrics["tool_call_schema_valid"] = ev.schema_valid_share
            metrics["tool_call_samples"] = ev.samples
            base = tool_accuracy(original, tokenizer, split.heldout_tools, spec.tools, system=system_prompt)
            metrics["tool_call_accuracy_baseline"] = base.accuracy
            metrics["tool_call_baseline_samples"] = base.samples[:10]
            if compressed:
                metrics["tool_call_accuracy_uncompressed"] = tool_accuracy(
                    baked, tokenizer, split.heldout_tools, spec.tools
                ).accuracy

        steps.append(("tool calls", tools_metrics))
    if split.heldout_irrelevant:

        def irrelevance_metrics() -> None:
            acc, samples = irrelevance_accuracy(final, tokenizer, split.heldout_irrelevant)
            metrics["irrelevance_accuracy"] = acc
            metrics["irrelevance_samples"] = samples
            metrics["irrelevance_accuracy_baseline"], _ = irrelevance_accuracy(
                original, tokenizer, split.heldout_irrelevant, system=system_prompt
            )
            if compressed:
                metrics["irrelevance_accuracy_uncompressed"], _ = irrelevance_accuracy(
                    baked, tokenizer, split.heldout_irrelevant
                )

        steps.append(("irrelevance", irrelevance_metrics))
    if spec.persona is not None:
        persona = spec.persona

        def persona_metrics() -> None:
            queries = split.heldout_persona_queries
            if preset.eval_persona_queries:
                queries = queries[: preset.eval_persona_queries]
            metrics.update(
                {
                    k: v
                    for k, v in persona_fidelity(
                        original,
                        final,
                        tokenizer,
                        queries,
                        system_prompt=system_prompt,
                        max_new_tokens=preset.max_new_tokens,
                        demos=split.train_persona_examples,
                        sentence_limit=bdata.max_sentences(persona.guidelines),
                    ).items()
                    if k != "tokens"
                }
            )
            probes = guideline_probes(
                persona,
                split.heldout_persona_examples,
                queries,
                split.training_texts(),
                demos=split.train_persona_examples,
            )
            baked_probes = run_probes(final, tokenizer, probes, persona)
            base_probes = run_probes(original, tokenizer, probes, persona, system=system_prompt)
            metrics["guideline_pass_rate"] = baked_probes["pass_rate"]
            metrics["guideline_pass_rate_baseline"] = base_probes["pass_rate"]
            metrics["guideline_by_kind"] = baked_probes["by_kind"]
            metrics["guideline_by_kind_baseline"] = base_probes["by_kind"]
            metrics["guideline_samples"] = baked_probes["samples"]
            if compressed:
                metrics["guideline_pass_rate_uncompressed"] = run_probes(baked, tokenizer, probes, persona)["pass_rate"]

        steps.append(("persona", persona_metrics))
    sequences = heldout_sequences(split, tokenizer)
    if sequences:

        def fidelity_metrics() -> None:
            measured = text_fidelity(baked, final, sequences)
            for key in ("top1_agreement", "kl", "ppl_delta"):
                metrics[key] = measured[key]
            metrics["fidelity"] = {k: measured[k] for k in ("ppl", "ppl_reference", "tokens")}

        steps.append(("fidelity", fidelity_metrics))
    new_tokens = 16 if spec.profile == "quick" else 32
    steps.append(
        (
            "latency and size",
            lambda: _latency_and_size(
                original,
                final,
                scheme,
                tokenizer,
                split,
                system_prompt,
                fetched,
                metrics,
                new_tokens,
                compile_decoding=spec.optimize.compile,
            ),
        )
    )
    for i, (name, fn) in enumerate(steps, start=1):
        run.check()
        fn()
        run.progress(i, len(steps), f"measured {name}")
    metrics["accuracy_retention"] = _retention(metrics) if compressed else 1.0
    return metrics


def _retention(metrics: dict[str, Any]) -> float | None:
    pairs = [
        (metrics.get(k), metrics.get(f"{k}_uncompressed"))
        for k in ("tool_call_accuracy", "irrelevance_accuracy", "guideline_pass_rate")
    ]
    ratios = [f / b for f, b in pairs if isinstance(f, float) and isinstance(b, float) and b > 0]
    return min(ratios) if ratios else None


def _check_finite(model: Any, tokenizer: Any, metrics: dict[str, Any]) -> None:
    # quantized layers keep their scales in buffers: check every floating tensor, not only parameters
    finite_weights = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    ids = torch.tensor(
        [tokenizer("The quick brown fox checks the brake fluid.", add_special_tokens=False)["input_ids"]],
        device=next(model.parameters()).device,
    )
    with torch.inference_mode():
        finite_logits = bool(torch.isfinite(model(input_ids=ids).logits.float()).all())
    metrics["finite_weights"] = finite_weights
    metrics["finite_logits"] = finite_logits


def _latency_and_size(
    original: Any,
    final: Any,
    scheme: dict[str, Any],
    tokenizer: Any,
    split: bdata.Split,
    system_prompt: str,
    fetched: FetchedModel,
    metrics: dict[str, Any],
    new_tokens: int,
    *,
    compile_decoding: bool,
) -> None:
    queries = ([c.query for c in split.heldout_tools] + split.heldout_persona_queries + split.heldout_irrelevant)[
        :8
    ] or ["Hello, who are you?"]
    baseline_model = cast_floats_(copy.deepcopy(original), torch.bfloat16)  # its published dtype
    base = latency_ms(
        baseline_model,
        tokenizer,
        [with_system(system_prompt or None, [{"role": "user", "content": q}]) for q in queries],
        new_tokens=new_tokens,
    )
    del baseline_model
    conversations = [[{"role": "user", "content": q}] for q in queries]
    eager = latency_ms(final, tokenizer, conversations, new_tokens=new_tokens)
    latency = {"baseline": base, "baked": eager, "baked_eager": eager}
    decoding: dict[str, Any] = {"path": "eager"}
    if compile_decoding:
        try:
            compiled = compiled_latency_ms(final, tokenizer, conversations, new_tokens=new_tokens)
        except Exception as exc:  # a box that cannot compile (no C++ compiler, say) keeps the eager figures
            decoding["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
        else:
            latency["baked_compiled"] = compiled
            if compiled["p50"] < eager["p50"]:  # compile where it pays
                latency["baked"] = compiled
                decoding = {"path": "static cache + torch.compile", "compile_s": compiled["compile_s"]}
            else:
                decoding["note"] = "the compiled decoding step was not faster than eager here"
    metrics["latency_ms"] = latency
    metrics["decoding"] = decoding
    baked = latency["baked"]
    metrics["speedup"] = base["p50"] / baked["p50"] if baked["p50"] > 0 else None
    params = scheme.get("params") or sum(p.numel() for p in final.parameters())
    final_bytes = scheme.get("weight_bytes") or sum(p.numel() * p.element_size() for p in final.parameters())
    metrics["size_bytes"] = {"original": fetched.weight_bytes, "final": final_bytes, "fp32": params * 4}
    metrics["compression"] = 1 - final_bytes / fetched.weight_bytes if fetched.weight_bytes else None
    metrics["compression_vs_fp32"] = 1 - final_bytes / (params * 4)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth a DB column or a card row: no per-sample lists."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, list):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out

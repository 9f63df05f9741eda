#!/usr/bin/env bash
# One device-machine call for the end-to-end numbers: the one-layer benchmark, the Llama-shaped stack
# (r 384 then 16, 4 layers) and bf16 training parity. Logs and JSON under $OUT; the tables print last.
#   OUT=/path bash benchmarks/gpu_run_e2e.sh
# Budget: about 8 minutes on one H100. Each step has a time limit (seconds, overridable below); the
# benchmarks write their JSON after every cell, so a step cut short still leaves what it measured, and
# its table is then printed from that JSON. Target cells run first.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
: >"$OUT/e2e_status.txt"
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)  # no compiled artefacts from an earlier run
export TORCHINDUCTOR_CACHE_DIR
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton, peft, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', t.__version__)"
} 2>&1 | tee "$OUT/e2e_env.txt"

step() {  # step NAME LIMIT_S COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - start)) s" >>"$OUT/e2e_status.txt"
}

step layer "${LAYER_LIMIT:-130}" python3 benchmarks/bench_layer.py --out "$OUT/layer.json"
step model "${MODEL_LIMIT:-240}" python3 benchmarks/bench_model.py --ranks 384 16 --layers 4 --out "$OUT/model.json"
step parity "${PARITY_LIMIT:-80}" python3 examples/train_parity.py --device cuda --compare-inductor --out "$OUT/parity.json"

echo
cat "$OUT/e2e_status.txt"
for bench in layer model; do
  if [ -f "$OUT/$bench.json" ]; then
    python3 "benchmarks/bench_$bench.py" --print-only --out "$OUT/$bench.json"
  else
    echo "== $bench: no JSON; end of its log:"
    tail -n 15 "$OUT/$bench.log"
  fi
done
echo
grep -v -i warn "$OUT/parity.log" | tail -n 6

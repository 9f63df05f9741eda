#!/usr/bin/env bash
# One device call for a session's closing numbers, most important first, each step time-limited:
# CUDA tests, the layer benchmark's target cells, eval with the norm reused, the Llama-shaped stack
# (r = 384), bf16 training parity, per-gradient errors against float64. Summary in $OUT/summary.log.
set -o pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
S="$OUT/summary.log"
python3 -m pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, triton, peft, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', t.__version__, torch.cuda.get_device_name())" | tee "$S"
date -u | tee -a "$S"
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name" >>"$S"
  timeout "$limit" "$@" >"$OUT/step.log" 2>&1
  local rc=$?
  grep -v "Warning\|warn(" "$OUT/step.log" | tail -n "${TAIL:-40}" >>"$S"
  echo "== $name: rc=$rc in $((SECONDS - start)) s" >>"$S"
}
step tests "${TESTS_LIMIT:-240}" python3 -m pytest -q -p no:logging -p no:cacheprovider tests/kernels tests/test_cuda_models.py -m cuda
cp "$OUT/step.log" "$OUT/tests.log"
step layer "${LAYER_LIMIT:-100}" python3 benchmarks/bench_layer.py --quick --out "$OUT/layer.json"
step eval_cache "${EVAL_LIMIT:-40}" python3 benchmarks/bench_eval_cache.py --out "$OUT/eval_cache.json"
step model "${MODEL_LIMIT:-190}" python3 benchmarks/bench_model.py --ranks 384 --layers 4 --out "$OUT/model.json"
step parity "${PARITY_LIMIT:-45}" python3 examples/train_parity.py --device cuda --steps 100 --out "$OUT/parity.json"
step grad_errors "${ERRORS_LIMIT:-35}" python3 benchmarks/profile_layer.py --errors-only
rm -f "$OUT/step.log"
tail -n 60 "$S"

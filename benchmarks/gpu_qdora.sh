#!/usr/bin/env bash
# QDoRA on the GPU machine, one device call: bitsandbytes from the carried wheel, the QDoRA tests on
# CUDA, then bench_qdora.py (quick, then the stack). Logs and JSON under $OUT.
#   WHEEL_DIR=.whl bash benchmarks/gpu_qdora.sh            # QUICK_ONLY=1: skip the 4-layer stack
set -o pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
OUT=${OUT:-benchmarks/results}
WHEEL_DIR=${WHEEL_DIR:-.whl}
mkdir -p "$OUT"
pip install --no-index --no-deps --target /tmp/site "$WHEEL_DIR"/bitsandbytes-*.whl >"$OUT/bnb_install.log" 2>&1 \
  || tail -5 "$OUT/bnb_install.log"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, peft, bitsandbytes as b; print('torch', torch.__version__, 'peft', peft.__version__, 'bnb', b.__version__, torch.cuda.get_device_name())" | tee "$OUT/qdora_versions.txt"
timeout "${TESTS_LIMIT:-150}" python3 -m pytest -q -p no:logging -p no:cacheprovider tests/test_qdora.py >"$OUT/qdora_tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/qdora_tests.log" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/qdora_tests.log" | head
timeout "${QUICK_LIMIT:-120}" python3 benchmarks/bench_qdora.py --quick --out "$OUT/qdora_quick.json" >"$OUT/qdora_quick.log" 2>&1
echo "quick rc=$?"; grep -v "Warning\|warn(" "$OUT/qdora_quick.log" | tail -25
if [ -z "${QUICK_ONLY:-}" ]; then
  timeout "${STACK_LIMIT:-260}" python3 benchmarks/bench_qdora.py --layers "${LAYERS:-4}" --out "$OUT/qdora.json" >"$OUT/qdora.log" 2>&1
  echo "stack rc=$?"; grep -v "Warning\|warn(" "$OUT/qdora.log" | tail -25
fi

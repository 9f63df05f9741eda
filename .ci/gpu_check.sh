#!/usr/bin/env bash
# On the GPU machine (the device tool runs it from the repository root; $OUT comes back):
# install dora_fx against the machine's own torch, run the whole suite there (CUDA tests included),
# then the benchmarks if asked (`.ci/gpu_check.sh bench`).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -5 "$OUT/install.log"
python -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout "${PYTEST_TIMEOUT:-300}" python -m pytest -q -p no:logging -p no:cacheprovider ${PYTEST_ARGS:-} >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
if [ "${1:-}" = "bench" ]; then bash benchmarks/gpu_run.sh; fi

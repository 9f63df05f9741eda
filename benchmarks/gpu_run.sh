#!/usr/bin/env bash
# One device-machine call: CUDA kernel tests, then the kernel benchmark; logs and JSON under $OUT.
#   bash benchmarks/gpu_run.sh [bench_kernels.py arguments...]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/nvidia_smi.txt"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-180} python3 -m pytest tests/kernels -m cuda -q -rs 2>&1 --tb=short | tee "$OUT/pytest_cuda.log" | tail -n 25
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_kernels.py "$@" --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^{"op": "norm", ' 
echo "bench rc=$? in $(( $(date +%s) - start )) s"

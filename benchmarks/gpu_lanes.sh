#!/usr/bin/env bash
# One device call on a 4-GPU machine (device kind nvidia-h200-x4): the session's checks and benchmarks
# in four lanes, one GPU each, run side by side. Every comparison stays inside one script on one GPU,
# so the lanes do not mix numbers. Lane summaries: $OUT/lane<N>.log; JSON results beside them.
#   lane 0: CUDA tests (kernels, models, QDoRA), bf16 training parity, per-gradient errors
#   lane 1: layer benchmark, full grid (d 8192/4096, r 384/16, 512/4096 tokens), eval with the norm reused
#   lane 2: Llama-shaped stack, r = 384 and r = 16
#   lane 3: QDoRA stack (NF4 base; needs the bitsandbytes wheel under .whl, carried), kernel benchmark,
#           the edge-case tests (their op-level cases use the CUDA kernels)
#   then, on GPUs 2 and 3 once lanes 2 and 3 are done: FSDP2 training with dora_fx and with plain
#   torch.compile (examples/train_fsdp.py), losses against the recorded one-GPU reference.
# SERIAL=1 runs the lanes one after another (LANES="1 2" picks some): side by side they contend for
# the host's CPU, which moves launch-bound timings (run B of benchmarks/README.md).
# With fewer GPUs, lanes share them round-robin (slower, numbers still per-script). All JSON results
# end up in $OUT/results.tar (the device tool brings back at most 8 files).
source benchmarks/gpu_common.sh
gpu_setup "$OUT/versions.log"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")

step() {  # step LANE NAME LIMIT_S COMMAND...: a step of lane LANE, summarised in $OUT/lane<LANE>.log
  local lane=$1
  shift
  run_step "$OUT/lane$lane.log" "$@"
}
lane() {  # lane N: run lane N's steps on GPU N mod GPUS, each with its own Inductor cache
  export CUDA_VISIBLE_DEVICES=$(($1 % GPUS)) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  case $1 in
    0)
      TAIL=60 step 0 cuda_tests 330 python3 -m pytest -q -p no:cacheprovider tests -m cuda
      step 0 parity 90 python3 examples/train_parity.py --device cuda --steps 100 --compare-inductor --out "$OUT/parity.json"
      step 0 grad_errors 45 python3 benchmarks/profile_layer.py --errors-only ;;
    1)
      step 1 layer 400 python3 benchmarks/bench_layer.py --out "$OUT/layer.json"
      step 1 eval_cache 60 python3 benchmarks/bench_eval_cache.py --out "$OUT/eval_cache.json" ;;
    2)
      step 2 model_r384 230 python3 benchmarks/bench_model.py --ranks 384 --out "$OUT/model_r384.json"
      step 2 model_r16 230 python3 benchmarks/bench_model.py --ranks 16 --out "$OUT/model_r16.json" ;;
    3)
      step 3 qdora 240 python3 benchmarks/bench_qdora.py --out "$OUT/qdora.json"
      step 3 kernels 120 python3 benchmarks/bench_kernels.py --quick --out "$OUT/kernels.json"
      # The edge cases' op-level tests run on the GPU's kernels here (they use CUDA when present).
      step 3 edge_cases 100 python3 -m pytest -q -p no:cacheprovider tests/test_edge_cases.py ;;
  esac
}
distributed() {  # FSDP2 on GPUs 2 and 3: dora_fx against plain torch.compile, same model and batch
  export CUDA_VISIBLE_DEVICES=2,3 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  local reference=benchmarks/results/2026-11-28-h200x2-distributed/reference.json
  for backend in dora inductor; do
    step 4 "fsdp2-$backend" 110 torchrun --standalone --nproc_per_node 2 examples/train_fsdp.py --mode fsdp2 \
      --backend $backend --device cuda --hidden 2048 --layers 4 --rank 64 --batch 8 --seq 512 --steps 50 --quiet \
      --compare $reference --out "$OUT/fsdp2_$backend.json"
  done
}
if [ -n "${SERIAL:-}" ]; then  # one lane at a time: no CPU contention between lanes (launch-bound timings)
  for n in ${LANES:-0 1 2 3}; do lane $n; done
else
  for n in 0 1; do lane $n & done
  ( lane 2 & lane 3 & wait; [ "$GPUS" -ge 4 ] && distributed ) &
  wait
fi
tail -n 40 "$OUT"/lane*.log
(cd "$OUT" && tar cf results.tar *.json && rm -f *.json)

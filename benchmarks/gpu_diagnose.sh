#!/usr/bin/env bash
# One device call on one H200 (device kind nvidia-h200): the CUDA tests, where the 512-token train
# step's time goes, and (optionally) the small-batch and generation benchmarks, in at most ${TOTAL:-420} s.
#   1. the CUDA tests ${TESTS:-tests}, cut at ${TEST_LIMIT:-150} s (stopping at the first failure unless ALL_TESTS=1);
#   2. unless PROFILE=0, profile_step.py --mode ${PROFILE_MODE:-train} ${PROFILE_ARGS:-} (--with-stack: Python frames) at 1 x ${SEQ:-512} tokens: plain LoRA + Inductor and dora_fx (host and GPU time,
#      traces; with OUTPUT_CODE=1 also Inductor's generated code, $OUT/output_code.log.gz; in train mode
#      trace_breakdown.py's GPU time per kind of kernel, forward and backward);
#   3. with SMALL=1, bench_small_batch.py (two layers, 8 tokens, with and without CUDA graphs);
#   4. with MODEL_512=1, bench_model.py at 1 x 512 tokens: ${MODEL_512_CONTENDERS:-LoRA + Inductor, dora_fx (norm
#      recomputed and reused)}, fwd and fwd+bwd, timed again in ${INTERLEAVE:-5} interleaved rounds;
#   5. with GENERATE=1, bench_generate.py ${GEN_ARGS:-} (batch 1 and 8, CUDA graphs);
#   6. with QDORA=1, bench_qdora.py ${QDORA_ARGS:-} (PEFT eager, dora_fx, QLoRA + Inductor);
#   7. with NORM_KERNELS=1, norm_host_cost.py --kernels ${NORM_ARGS:-}: the recomputed norm's kernels per 8B-shaped
#      layer (NORM_ARGS=--zero-magnitude: also the host cost of the m = 0 gradient's call);
#   8. with HOST_PACE=1, host_pace.py at 1 x ${SEQ:-512} tokens ${HOST_PACE_ARGS:-}: host enqueue time per contender
#      (--rounds, --cprofile STEPS, --dora-options JSON);
#   9. with GRAM=1, bench_gram.py: the norm's Gram matrix, one GEMM against split-K forms.
# Summary: $OUT/diagnose.log; JSON and traces under $OUT.
source benchmarks/gpu_common.sh
TOTAL=${TOTAL:-420}
LOG=$OUT/diagnose.log
gpu_setup "$OUT/versions.log"
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
[ "${TEST_LIMIT:-150}" != 0 ] && TAIL=40 run_step "$LOG" cuda_tests "$(left "${TEST_LIMIT:-150}")" python3 -m pytest -q $([ -n "${ALL_TESTS:-}" ] || echo -x) -p no:cacheprovider ${TESTS:-tests} -m cuda
if [ "${PROFILE:-1}" != 0 ]; then
  [ -n "${OUTPUT_CODE:-}" ] && export TORCH_LOGS=output_code TORCH_LOGS_OUT=$OUT/output_code.log
  TAIL=60 run_step "$LOG" profile_step "$(left 200)" python3 benchmarks/profile_step.py --seq "${SEQ:-512}" \
    --mode "${PROFILE_MODE:-train}" --out "$OUT/profile" ${PROFILE_ARGS:-}
  [ -n "${OUTPUT_CODE:-}" ] && { unset TORCH_LOGS TORCH_LOGS_OUT; gzip -f "$OUT/output_code.log"; }
  [ "${PROFILE_MODE:-train}" = train ] && TAIL=30 run_step "$LOG" trace_breakdown 30 python3 benchmarks/trace_breakdown.py \
    "$OUT/profile" --out "$OUT/profile/trace_breakdown.json"
fi
[ -n "${SMALL:-}" ] && TAIL=20 run_step "$LOG" small_batch "$(left 80)" python3 benchmarks/bench_small_batch.py \
  --out "$OUT/small_batch.json"
[ -n "${MODEL_512:-}" ] && TAIL=40 run_step "$LOG" model_512 "$(left "${MODEL_512_LIMIT:-200}")" python3 benchmarks/bench_model.py --seq 512 \
  --contenders ${MODEL_512_CONTENDERS:-lora_inductor dora_fx dora_fx_cached} --modes fwd fwd+bwd --profile-steps 0 \
  --interleave "${INTERLEAVE:-5}" --out "$OUT/model_512.json"
[ -n "${GENERATE:-}" ] && TAIL=30 run_step "$LOG" generate "$(left)" python3 benchmarks/bench_generate.py \
  --out "$OUT/generate.json" ${GEN_ARGS:-}
[ -n "${QDORA:-}" ] && TAIL=40 run_step "$LOG" qdora "$(left)" python3 benchmarks/bench_qdora.py \
  --out "$OUT/qdora.json" ${QDORA_ARGS:-}
[ -n "${NORM_KERNELS:-}" ] && TAIL=40 run_step "$LOG" norm_kernels "$(left 60)" python3 benchmarks/norm_host_cost.py \
  --kernels ${NORM_ARGS:-} --out "$OUT/norm_host_cost.json"
[ -n "${GRAM:-}" ] && TAIL=40 run_step "$LOG" gram "$(left 60)" python3 benchmarks/bench_gram.py --out "$OUT/gram.json"
[ -n "${HOST_PACE:-}" ] && TAIL=80 run_step "$LOG" host_pace "$(left 400)" python3 benchmarks/host_pace.py \
  --seq "${SEQ:-512}" --out "$OUT/host_pace.json" ${HOST_PACE_ARGS:-}
cat "$LOG"

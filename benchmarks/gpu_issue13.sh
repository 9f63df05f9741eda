#!/usr/bin/env bash
# One device call on one H200 (device kind nvidia-h200): issue #13's measurements in at most ${TOTAL:-540} s.
#   1. unless TEST_LIMIT=0, the CUDA tests ${TESTS:-tests}, cut at ${TEST_LIMIT:-100} s (a quick check that the kernels run);
#   1b. with KERNELS=1, bench_kernels.py --quick --norm-only: the norm implementations (at most 60 s);
#   1c. unless SMALL=0, bench_small_batch.py: two layers, 8 tokens, with and without CUDA graphs (at most 80 s);
#   1c'. with NORM_BENCH=1, bench_norm.py ${NORM_ARGS:-} (e.g. --compare OLD.py): the factored norm per projection shape (at most 60 s);
#   1d. with NORM_KERNELS=1, norm_host_cost.py --kernels: the norm's kernels per 8B-shaped layer (at most 60 s);
#   1e. with PROFILE=1, profile_step.py at 1 x ${PROFILE_SEQ:-512} tokens: host and GPU time of the train step (at most 150 s);
#   2. bench_model.py at 1 x 4096 tokens, r = 384: every contender, fwd, fwd+bwd and accum (at most 280 s);
#   2b. with BASELINE_DIR (a copy of another version, untracked and not ignored so that it travels:
#      `mkdir _baseline && git archive REV dora_fx benchmarks pyproject.toml | tar -x -C _baseline`),
#      bench_model.py of that copy with ${BASELINE_ARGS:---seq 4096} for ${BASELINE_CONTENDERS:-lora_inductor dora_fx}
#      (into model_baseline.json): that version against the same LoRA contender, in the same call (at most 280 s);
#   3. unless RUN_512=0, bench_model.py at 1 x 512 tokens: every contender, fwd and fwd+bwd (the time left).
# With OUTPUT_CODE=1, Inductor's generated code of step 2 goes to $OUT/output_code.log.gz.
# Both bench_model.py runs time their steps again in ${INTERLEAVE:-5} interleaved rounds (--interleave).
# Estimate (H200, compile times of DESIGN.md §7): set-up 15 s; the 4096 run about 250 s (first calls: LoRA +
# Inductor 10 + 20 s, dora_fx 19 + 75 s, PEFT + Inductor 15 + 39 s; builds, references and measurements
# 40 s; imports and compiler warm-up 20 s); the 512 run about 150 s (its three contenders' first calls are
# nearly as long as at 4096). Each run rewrites its JSON after every contender: a run cut short keeps
# what it measured, and its table is printed from the JSON. Summary: $OUT/issue13.log; JSON in
# $OUT/results.tar.
source benchmarks/gpu_common.sh
TOTAL=${TOTAL:-540}
LOG=$OUT/issue13.log
gpu_setup "$OUT/versions.log"
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)

bench() {  # bench NAME LIMIT_S ARGS...: bench_model.py (of ${ROOT:-.}) into $OUT/NAME.json; if cut short, the table of its JSON
  local name=$1 limit=$2 script=${ROOT:-.}/benchmarks/bench_model.py
  shift 2
  TAIL=80 run_step "$LOG" "$name" "$limit" python3 "$script" --out "$OUT/$name.json" "$@" \
    || { [ -f "$OUT/$name.json" ] && TAIL=80 run_step "$LOG" "$name (partial)" 20 \
      python3 "$script" --print-only --out "$OUT/$name.json"; }
}

[ "${TEST_LIMIT:-100}" != 0 ] && TAIL=40 run_step "$LOG" cuda_tests "$(left "${TEST_LIMIT:-100}")" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests} -m cuda
[ -n "${KERNELS:-}" ] && TAIL=40 run_step "$LOG" kernels_norm "$(left 60)" python3 benchmarks/bench_kernels.py \
  --quick --norm-only --no-inductor --out "$OUT/kernels_norm.json"
[ -n "${NORM_BENCH:-}" ] && TAIL=45 run_step "$LOG" norm_bench "$(left 60)" python3 benchmarks/bench_norm.py \
  --out "$OUT/norm.json" ${NORM_ARGS:-}
[ -n "${NORM_KERNELS:-}" ] && TAIL=30 run_step "$LOG" norm_kernels "$(left 60)" python3 benchmarks/norm_host_cost.py \
  --kernels --out "$OUT/norm_host_cost.json"
[ -n "${PROFILE:-}" ] && TAIL=50 run_step "$LOG" profile_step "$(left 150)" python3 benchmarks/profile_step.py --seq "${PROFILE_SEQ:-512}" \
  --out "$OUT/profile"
[ "${SMALL:-1}" != 0 ] && TAIL=20 run_step "$LOG" small_batch "$(left 80)" python3 benchmarks/bench_small_batch.py --out "$OUT/small_batch.json"
[ -n "${OUTPUT_CODE:-}" ] && export TORCH_LOGS=output_code TORCH_LOGS_OUT=$OUT/output_code.log
bench model_4096 "$(left 280)" --seq 4096 --interleave "${INTERLEAVE:-5}" --contenders ${CONTENDERS_4096:-lora_inductor dora_fx dora_fx_cached inductor eager}
[ -n "${OUTPUT_CODE:-}" ] && { unset TORCH_LOGS TORCH_LOGS_OUT; gzip -f "$OUT/output_code.log"; }
[ -n "${BASELINE_DIR:-}" ] && ROOT=$BASELINE_DIR bench model_baseline "$(left 280)" ${BASELINE_ARGS:---seq 4096} \
  --interleave "${INTERLEAVE:-5}" --contenders ${BASELINE_CONTENDERS:-lora_inductor dora_fx}
[ "${RUN_512:-1}" != 0 ] && bench model_512 "$(left)" --seq 512 --interleave "${INTERLEAVE:-5}" --contenders ${CONTENDERS_512:-lora_inductor dora_fx dora_fx_cached inductor eager} \
  --modes fwd fwd+bwd --profile-steps 0
cat "$LOG"
(cd "$OUT" && tar cf results.tar *.json && rm -f *.json)
exit 0

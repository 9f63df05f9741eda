#!/usr/bin/env bash
# One device call on one H200: the 512-token train step of several dora_fx versions, each against plain
# LoRA + Inductor in its own process, to find which change moved dora_fx's ratio.
#   VERSIONS: directories holding a copy of a version (default: this checkout, then each _rev/*), made with
#     `mkdir -p _rev/REV && git archive REV dora_fx benchmarks pyproject.toml | tar -x -C _rev/REV`
#     (untracked and not ignored, so that they travel; delete them after);
#   each runs its own bench_model.py ${BISECT_ARGS:---seq 512 --modes fwd+bwd --interleave 3} for
#     lora_inductor and dora_fx (into $OUT/bisect_<name>.json), at most ${EACH:-100} s;
#   with TESTS, first the CUDA tests among $TESTS (at most ${TEST_LIMIT:-60} s);
#   with NORM_ARGS, then norm_host_cost.py $NORM_ARGS (host cost of the norm's and m = 0 calls).
# The versions share one Inductor cache, so plain LoRA compiles once: compile times here mean nothing.
# Summary: $OUT/bisect.log.
source benchmarks/gpu_common.sh
TOTAL=${TOTAL:-500}
LOG=$OUT/bisect.log
gpu_setup "$OUT/versions.log"
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
[ -n "${TESTS:-}" ] && TAIL=15 run_step "$LOG" cuda_tests "$(left "${TEST_LIMIT:-60}")" python3 -m pytest -q \
  -p no:cacheprovider $TESTS -m cuda
[ -n "${NORM_ARGS:-}" ] && TAIL=30 run_step "$LOG" norm_host_cost "$(left 60)" python3 benchmarks/norm_host_cost.py \
  $NORM_ARGS --out "$OUT/norm_host_cost.json"
for dir in ${VERSIONS:-. _rev/*}; do
  name=$(basename "$(cd "$dir" && pwd)")
  [ "$dir" = . ] && name=this
  TAIL=25 run_step "$LOG" "bisect $name" "$(left "${EACH:-100}")" python3 "$dir/benchmarks/bench_model.py" \
    ${BISECT_ARGS:---seq 512 --modes fwd+bwd --interleave 3} --profile-steps 0 \
    --contenders lora_inductor dora_fx --out "$OUT/bisect_$name.json"
done
cat "$LOG"
exit 0

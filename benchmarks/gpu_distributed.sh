#!/usr/bin/env bash
# One device call on a 2-GPU machine (device kind nvidia-h200-x2) for issue #7: bf16 training of a
# PEFT DoRA Llama under FSDP2 and DDP with the dora backend, against a single-GPU eager PEFT run of
# the same global batch (examples/train_fsdp.py), plus FSDP2 with plain torch.compile as the memory
# and bf16-noise baseline. Then, with the time left, the CUDA tests on one GPU. Summary in $OUT/summary.log.
source benchmarks/gpu_common.sh
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
S="$OUT/summary.log"
gpu_setup "$S"
step() { TAIL=${TAIL:-14} run_step "$S" "$@"; }  # step NAME LIMIT_S COMMAND...
# Llama-shaped, hidden 2048, 4 layers, DoRA r 64 on all seven projections, global batch 8 x 512, 50 AdamW steps.
SIZE=(--device cuda --hidden "${HIDDEN:-2048}" --layers 4 --rank "${RANK:-64}" --batch 8 --seq 512 --steps 50 --quiet)
TRAIN="examples/train_fsdp.py"
step reference 120 python3 $TRAIN --reference "${SIZE[@]}" --out "$OUT/reference.json"
for run in "fsdp2 dora" "fsdp2 inductor" "ddp dora" "ddp inductor"; do
  set -- $run
  step "$1-$2" 150 torchrun --standalone --nproc_per_node 2 $TRAIN --mode "$1" --backend "$2" "${SIZE[@]}" \
    --compare "$OUT/reference.json" --out "$OUT/$1_$2.json"
done
TAIL=30 step cuda_tests "${TESTS_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_cuda_models.py -m cuda
tail -n 80 "$S"

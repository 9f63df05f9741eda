#!/usr/bin/env bash
# One device call on a 2-GPU machine (device kind nvidia-h200-x2) for issue #7: bf16 training of a
# PEFT DoRA Llama under FSDP2 and DDP with the dora backend, against a single-GPU eager PEFT run of
# the same global batch (examples/train_fsdp.py), plus FSDP2 with plain torch.compile as the memory
# and bf16-noise baseline. Then, with the time left, the CUDA tests on one GPU. Summary in $OUT/summary.log.
set -o pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
# NVLink multicast stays off (device KINDS.md); torchrun's children inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
S="$OUT/summary.log"
python3 -m pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, triton, peft, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', t.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())" | tee "$S"
date -u | tee -a "$S"
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name" >>"$S"
  timeout "$limit" "$@" >"$OUT/step.log" 2>&1
  local rc=$?
  grep -v "Warning\|warn(" "$OUT/step.log" | tail -n "${TAIL:-14}" >>"$S"
  echo "== $name: rc=$rc in $((SECONDS - start)) s" >>"$S"
}
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
rm -f "$OUT/step.log"
tail -n 80 "$S"

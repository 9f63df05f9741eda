# Sourced by the one-call device scripts (gpu_*.sh): set-up, the time left of a call, and a
# time-limited step that appends the tail of its output to a summary log.
set -o pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (device KINDS.md); torchrun's children inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"

# gpu_setup VERSIONS_LOG: carried wheels under .whl (if any), dora_fx from this checkout, versions.
gpu_setup() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site
  fi
  python3 -m pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1
  python3 -c "import torch, triton, peft, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', t.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())" | tee "$1"
  python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" >>"$1" 2>&1
  date -u | tee -a "$1"
}

# left [AT_MOST]: seconds left of the script's ${TOTAL} for a step (10 s kept for the end), at most
# AT_MOST, at least 1.
left() {
  local s=$((TOTAL - 10 - SECONDS))
  [ -n "${1:-}" ] && [ "$s" -gt "$1" ] && s=$1
  echo $((s > 1 ? s : 1))
}

# run_step LOG NAME LIMIT_S COMMAND...: COMMAND under a time limit; its last ${TAIL:-30} lines (less
# warnings), its exit status and its duration go to LOG; returns its exit status.
run_step() {
  local log=$1 name=$2 limit=$3 start=$SECONDS
  shift 3
  echo "== $name" >>"$log"
  timeout "$limit" "$@" >"$log.step" 2>&1
  local rc=$?
  grep -v "Warning\|warn(" "$log.step" | tail -n "${TAIL:-30}" >>"$log"
  rm -f "$log.step"
  echo "== $name: rc=$rc in $((SECONDS - start)) s" >>"$log"
  return $rc
}

#!/usr/bin/env bash
# The GPU checks in one script, for a CUDA machine with PyTorch and Triton but possibly no package index:
#   1. the Triton kernels on the golden reference (fp32 meta-gradient through the fused double backward),
#   2. the kernel tests on the GPU (fp64 against the materialised reference, gradcheck, gradgradcheck),
#   3. the tables still to measure: kernels (bf16 error and time), meta step vs full attention (125m at 8K
#      and 32K), streaming inference (125m up to 128K).
# Wheels fetched by infra/device-wheels.sh (.whl/) are installed into a temporary folder first. Everything
# goes to $OUT (default gpu-out/): log.txt, parity-triton.json and a RESULTS.md with the new tables.
set -uo pipefail

out=${OUT:-gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 1
  export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cp benchmarks/RESULTS.md "$out/RESULTS.md"

status=0
step() {  # run one check with a time limit; a failure is logged and the next check still runs
  echo "== $*" | tee -a "$out/log.txt"
  timeout "${STEP_SECONDS:-240}" "$@" 2>&1 | tee -a "$out/log.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== failed ($rc): $*" | tee -a "$out/log.txt"; status=1; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/log.txt"
step python3 -m ttt parity tests/data/golden_tiny_fp32.npz --device cuda --set model.chunk_kernel=triton \
  --output "$out/parity-triton.json"
step python3 -m pytest -q -p no:cacheprovider tests/unit/test_chunk_kernels.py
step python3 benchmarks/kernels.py --device cuda --write "$out/RESULTS.md"
step python3 benchmarks/meta_step.py --compare-full --preset 125m --shapes 8192:1024:8192 32768:1024:8192 \
  --batch 1 --device cuda --write "$out/RESULTS.md"
step python3 benchmarks/inference.py --preset 125m --device cuda --contexts 8192,32768,131072 \
  --decode-tokens 32 --write "$out/RESULTS.md"
exit $status

#!/usr/bin/env bash
# The GPU checks of issue 6, for the device machine (its python3 has CUDA torch, Triton, transformers, peft).
# Each part fits one 10-minute device call; results (test log, JSON, RESULTS.md) go to $OUT.
#   benchmarks/gpu_check.sh tests        # CUDA cases of the fast paths, the lean loss and both Triton kernels
#   benchmarks/gpu_check.sh bfloat16     # vs_peft on SmolLM2's shape in bf16, the opt-in Triton LoRA kernels too
#   benchmarks/gpu_check.sh float32      # the same in fp32
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
case "${1:-tests}" in
  tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/tests.log"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_ops.py tests/test_cross_entropy.py tests/test_triton_lora.py \
      2>&1 | tee -a "$out/tests.log" ;;
  bfloat16|float32)
    python3 benchmarks/vs_peft.py --device cuda --dtype "$1" --models smollm2 --inner 3 --rounds 5 \
      --new-tokens 16 --triton-lora --json-dir "$out" 2>&1 | tee "$out/bench-$1.log" ;;
  *)
    echo "usage: $0 tests|bfloat16|float32" >&2; exit 2 ;;
esac

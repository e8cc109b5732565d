#!/usr/bin/env bash
# One-call GPU check (issue 3 / 8): GPU tests + kernel bench, results under ${OUT:-gpu_check_out}.
# Usage on a CUDA machine from the repository root: bash scripts/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} | tee "$OUT/env.txt"
# GPU-relevant tests (the ones needing mlxtend/tensorboard are CPU-machine tests)
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton_kernel.py \
    tests/test_objective.py "tests/test_train.py::test_training_step_has_no_host_sync_on_cuda" 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 240 "$PY" -m kernels.bench --json "$OUT/kernels_bench.json" 2>&1 | tee "$OUT/kernels_bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/env.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))

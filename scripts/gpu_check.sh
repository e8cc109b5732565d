#!/usr/bin/env bash
# One-call GPU check: GPU tests, the step bench, the kernel bench and (where DALI is
# installed) the loader bench; results and one JSON report under ${OUT:-gpu_check_out}. Budget: < 8 min.
# Usage on a CUDA machine from the repository root: bash scripts/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# compiled Triton kernels kept in the (ignored) checkout: a rerun on a still-warm machine skips compilation
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton_cache}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} | tee "$OUT/env.txt"
# DALI carried as wheel parts (scripts/dali_wheels.sh): install it once every part has arrived
if ! "$PY" -c 'import nvidia.dali' 2>/dev/null && [ -f wheels/dali/manifest ]; then
  timeout 120 bash scripts/dali_wheels.sh install 2>&1 | tail -3 | tee -a "$OUT/env.txt" || true
fi
# Worst case of all timeouts: 130 + 150 + 3 x 65 + 75 = 550 s, inside one 600 s device call (plus up to
# 120 s on the call that installs DALI: give that call the longer limit). Every step writes its own file
# under $OUT, so a cut run still returns what it measured.
# GPU-relevant tests (the ones needing mlxtend/tensorboard are CPU-machine tests)
timeout 130 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton_kernel.py \
    tests/test_objective.py tests/test_related_objectives.py "tests/test_train.py::test_training_step_has_no_host_sync_on_cuda" \
    "tests/test_train.py::test_objective_steps_have_no_host_sync_on_cuda" \
    tests/test_optim.py tests/test_loader_choice.py $("$PY" -c 'import nvidia.dali' 2>/dev/null && echo tests/test_dali.py) 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 150 "$PY" -m kernels.bench --json "$OUT/kernels_bench.json" 2>&1 | tee "$OUT/kernels_bench.txt"
bench_rc=${PIPESTATUS[0]}
step_rc=0
# the headline config: the paper's KNN multi-crop rule (crops' 1-NN and head-2 logits from one pass of the
# fused Triton kernel), at 128 and 256 per GPU; then the inherit rule at 256 for comparison
for batch in 128 256; do
  timeout 65 "$PY" -m wcl_fast.bench_step --config configs/imagenet_wcl_multicrop_200ep.yaml --steps 10 --warmup 3 \
      --json "$OUT/step_bench_knn_$batch.json" data.batch_size=$batch 2>&1 | tee "$OUT/step_bench_knn_$batch.txt"
  step_rc=$(( step_rc || PIPESTATUS[0] ))
done
timeout 65 "$PY" -m wcl_fast.bench_step --config configs/imagenet_wcl_multicrop_inherit_200ep.yaml --steps 10 --warmup 3 \
    --json "$OUT/step_bench_inherit_256.json" data.batch_size=256 2>&1 | tee "$OUT/step_bench_inherit_256.txt"
step_rc=$(( step_rc || PIPESTATUS[0] ))
loader_rc=0
if "$PY" -c 'import nvidia.dali' 2>/dev/null; then
  timeout 75 "$PY" -m pipelines.bench --backend reference,auto,dali --batch 128 --batches 8 --workers 16 --json "$OUT/loader_bench.json" 2>&1 | tee "$OUT/loader_bench.txt"
  loader_rc=${PIPESTATUS[0]}
fi
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = {"env": (out / "env.txt").read_text()}
for path in sorted(out.glob("*.json")):
    if path.name != "report.json":
        report[path.stem] = json.loads(path.read_text())
(out / "report.json").write_text(json.dumps(report, indent=2))
print("wrote", out / "report.json")
PYEOF
echo "tests rc=$tests_rc kernels rc=$bench_rc step rc=$step_rc loader rc=$loader_rc" | tee -a "$OUT/env.txt"
exit $(( tests_rc != 0 || bench_rc != 0 || step_rc != 0 || loader_rc != 0 ))

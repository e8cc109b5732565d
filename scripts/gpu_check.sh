#!/usr/bin/env bash
# One-call GPU check, under 10 minutes: first the headline config at its paper batch (512 images per GPU,
# 2 x 224 + 6 x 96 crops) under the auto activation-checkpointing plan, no checkpointing and full
# checkpointing, its measured peak (torch.cuda.max_memory_allocated) beside the plan's traced estimate, or
# OOM (docs/memory.md); then the GPU tests, the kernel bench and the step benches.
# Usage on a CUDA machine from the repository root: bash scripts/gpu_check.sh
# Writes at most 5 files under ${OUT:-gpu_check_out}: env.txt (versions, return codes), headline.txt,
# tests.txt, benches.txt and report.json (every bench's JSON).
set -uo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
JSON="$(mktemp -d)"
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
# Worst case of all timeouts: 170 + 130 + 100 + 2 x 60 = 520 s (plus up to 120 s on a call that installs DALI).
# 1. The headline config at 512 per GPU: auto's plan for this card, then full checkpointing, then none
#    (expected not to fit an 80 GB card: its OOM is recorded, not fatal)
timeout 170 "$PY" -m wcl_fast.bench_step --config configs/imagenet_wcl_multicrop_200ep.yaml data.batch_size=512 \
    --plans "auto|all|none" --steps 3 --warmup 1 --rounds 1 --json "$JSON/headline_512.json" 2>&1 | tee "$OUT/headline.txt"
headline_rc=${PIPESTATUS[0]}
# 2. GPU tests, the no-host-sync checks first
timeout 130 "$PY" -m pytest -q -p no:cacheprovider "tests/test_train.py::test_training_step_has_no_host_sync_on_cuda" \
    "tests/test_train.py::test_objective_steps_have_no_host_sync_on_cuda" tests/test_kernels.py tests/test_triton_kernel.py \
    tests/test_objective.py tests/test_related_objectives.py tests/test_optim.py tests/test_checkpointing.py \
    $("$PY" -c 'import nvidia.dali' 2>/dev/null && echo tests/test_dali.py) 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
# 3. Benches (tables appended to benches.txt, JSON merged into report.json)
timeout 100 "$PY" -m kernels.bench --json "$JSON/kernels_bench.json" 2>&1 | tee "$OUT/benches.txt"
bench_rc=${PIPESTATUS[0]}
timeout 60 "$PY" -m wcl_fast.bench_step --config configs/imagenet_wcl_multicrop_200ep.yaml --steps 10 --warmup 3 \
    --json "$JSON/step_bench_knn_256.json" data.batch_size=256 2>&1 | tee -a "$OUT/benches.txt"
step_rc=${PIPESTATUS[0]}
timeout 60 "$PY" -m wcl_fast.bench_step --config configs/imagenet_wcl_multicrop_inherit_200ep.yaml --steps 10 --warmup 3 \
    --json "$JSON/step_bench_inherit_256.json" data.batch_size=256 2>&1 | tee -a "$OUT/benches.txt"
step_rc=$(( step_rc || PIPESTATUS[0] ))
rcs="headline rc=$headline_rc tests rc=$tests_rc kernels rc=$bench_rc step rc=$step_rc"
echo "$rcs" | tee -a "$OUT/env.txt"
"$PY" - "$OUT" "$JSON" "$rcs" <<'PYEOF'
import json, pathlib, sys
out, parts = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
report = {"env": (out / "env.txt").read_text(), "return_codes": sys.argv[3]}
for path in sorted(parts.glob("*.json")):
    report[path.stem] = json.loads(path.read_text())
(out / "report.json").write_text(json.dumps(report, indent=2))
print("wrote", out / "report.json")
PYEOF
rm -rf "$JSON"
exit $(( headline_rc != 0 || tests_rc != 0 || bench_rc != 0 || step_rc != 0 ))

#!/usr/bin/env bash
# One-call GPU check, ordered by risk, within 5 minutes, two files under ${OUT:-gpu_check_out}: gpu_check.log
# (everything printed) and report.json (each step's return code and seconds, the test results from junit XML,
# every bench's JSON, the headline's peak memory beside the plan's estimate).
#   1. headline  the headline config at its paper batch (512 images per GPU, 2 x 224 + 6 x 96 crops) under the
#                auto, all and none activation-checkpointing plans: torch.cuda.max_memory_allocated beside
#                the plan's traced peak, or OOM (docs/memory.md)
#   2. train     an end-to-end wcl_fast.train on CUDA (synthetic loader): stopped after 3 steps with a
#                checkpoint, then resume=auto to the end
#   3. tests     the CUDA-only tests (no host sync, kernels, objectives, checkpointing), junit XML
#   4. augment   the fused augmentation kernel's bench (when pipelines/bench_augment.py exists)
#   5. nn        the fused 1-NN + logits kernel at one rank's training shape (4,096 x 32,768, fp32)
#   6. step      the step bench of the headline config at 256 per GPU
# DALI only when already installed. Usage on a CUDA machine from the repository root: bash scripts/gpu_check.sh
# GPU_CHECK_DRY=1: the same steps on the CPU at toy sizes (tests/test_scripts.py runs it: the script's logic).
set -uo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton_cache}"  # a rerun on a warm machine skips compilation
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  TINY=(data.batch_size=8 model.widths=[8,16,16,32] model.head_hidden=32 model.head_out=16)
  HEADLINE=(configs/cpu_smoke.yaml "${TINY[@]}"); PLANS=(--plans "none|all" --gpu-memory 8); HB=(--steps 1 --warmup 0)
  TRAIN=(configs/cpu_smoke.yaml "${TINY[@]}" train.epochs=2 data.synthetic_size=16)
  TESTS=(tests/test_docs.py); AUGMENT=(--batch 2 --device cpu); NN=(--training-shape 32 256 --dims 16)
  STEP=(configs/cpu_smoke.yaml "${TINY[@]}"); SB=(--steps 1 --warmup 0); T=(90 90 60 60 60 60)
else
  HEADLINE=(configs/imagenet_wcl_multicrop_200ep.yaml data.batch_size=512); PLANS=(--plans "auto|all|none")
  HB=(--steps 3 --warmup 1); SB=(--steps 10 --warmup 3)
  TRAIN=(configs/cpu_smoke.yaml train.epochs=2 train.precision=bf16 model.sync_bn=false)
  TESTS=("tests/test_train.py::test_training_step_has_no_host_sync_on_cuda"
         "tests/test_train.py::test_objective_steps_have_no_host_sync_on_cuda" tests/test_kernels.py
         tests/test_triton_kernel.py tests/test_objective.py tests/test_related_objectives.py tests/test_optim.py
         tests/test_checkpointing.py)
  "$PY" -c 'import nvidia.dali' 2>/dev/null && TESTS+=(tests/test_dali.py)
  AUGMENT=(--batch 512 --device cuda); NN=(--training-shape 4096 32768 --dims 256)
  STEP=(configs/imagenet_wcl_multicrop_200ep.yaml data.batch_size=256); T=(90 45 75 25 25 40)
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee -a "$LOG"
STEPS=""
step() {  # step NAME TIMEOUT CMD...: run, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc $((SECONDS - start))s" | tee -a "$LOG"
  STEPS="$STEPS $name:$rc:$((SECONDS - start))"
}
step headline "${T[0]}" "$PY" -m wcl_fast.bench_step --config "${HEADLINE[0]}" "${HEADLINE[@]:1}" "${PLANS[@]}" \
    "${HB[@]}" --rounds 1 --json "$WORK/headline.json"
step train "${T[1]}" bash -c "'$PY' -m wcl_fast.train --config ${TRAIN[*]} train.out_dir='$WORK/run' train.stop_at_step=3 \
    train.resume=auto && '$PY' -m wcl_fast.train --config ${TRAIN[*]} train.out_dir='$WORK/run' train.resume=auto"
step tests "${T[2]}" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/junit.xml" "${TESTS[@]}"
if [ -f pipelines/bench_augment.py ]; then
  step augment "${T[3]}" "$PY" -m pipelines.bench_augment "${AUGMENT[@]}" --json "$WORK/augment.json"
fi
step nn "${T[4]}" "$PY" -m kernels.bench "${NN[@]}" --json "$WORK/nn.json"
step step "${T[5]}" "$PY" -m wcl_fast.bench_step --config "${STEP[0]}" "${STEP[@]:1}" "${SB[@]}" --rounds 1 \
    --json "$WORK/step.json"
"$PY" - "$OUT" "$WORK" "$STEPS" <<'PYEOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET
out, work, steps = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3].split()
report = {"log": "gpu_check.log", "steps": {}}
for item in steps:
    name, rc, seconds = item.split(":")
    report["steps"][name] = {"rc": int(rc), "seconds": int(seconds)}
    data = work / f"{name}.json"
    if data.is_file():
        report["steps"][name]["result"] = json.loads(data.read_text())
junit = work / "junit.xml"
if junit.is_file():
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    report["tests"] = {"total": len(cases), "failed": failed, "skipped": skipped, "passed": len(cases) - len(failed) - skipped}
headline = report["steps"].get("headline", {}).get("result")
if headline:  # memory: measured peak beside the plan's traced estimate, per plan
    report["memory"] = {row["plan"]: {"checkpointing": row["checkpointing"], "traced_peak_gib": row["traced_peak_gib"],
                                      "measured_peak_gib": row["measured_peak_gib"], "oom": row["oom"]}
                        for row in headline["plans"]}
(out / "report.json").write_text(json.dumps(report, indent=2))
print("wrote", out / "report.json", "steps:", " ".join(steps))
PYEOF
failed=0
for item in $STEPS; do rc=${item#*:}; rc=${rc%%:*}; [ "$rc" != 0 ] && failed=1; done
exit $failed

#!/usr/bin/env bash
# The whole GPU check in one command, for a bare H200 machine with torch+cu130, nvcc, ninja
# and pytest and no network (about 8 minutes at most):
#
#     bash bench/gpu_check.sh                # build for sm_90, test, sanitize, benchmark
#     bash bench/gpu_check.sh --dry-run      # the same steps on this CPU, tiny sizes (or CPU_DRY_RUN=1)
#     GPU_CHECK_STEPS=build,tests,train bash bench/gpu_check.sh    # a subset (a rerun)
#
# Steps, in this order (a step's failure never stops the others; each has its own time
# budget, and none starts past the total budget GPU_CHECK_BUDGET, default 470 s):
#   env        device, driver, torch, nvcc, compute-sanitizer
#   build      pip install --no-build-isolation -e . for sm_90 (DID_ENGINE_CUDA=1); if that
#              fails, a CPU-only build so that the model-level steps can still run
#   tests      the cuda cases of tests/ops, tests/modeling/test_flex_mask.py    } run side by side:
#   memcheck   compute-sanitizer on one small call per kernel           } neither is timed
#   racecheck  (bench/gpu_sanitize_ops.py)                              }
#   train      training steps, bf16 autocast, FlexAttention vs SDPA (bench/gpu_train_steps.py)
#   generate   one decode step (eager and CUDA graph) and whole DiD generations of the
#              small preset at batch 1/8/64 (bench/gpu_generate.py)
#   ops-*      bench/bench_cuda.py: remask, block-causal, decode (decode's compiled
#              FlexAttention baseline only when time allows)
#
# Writes bench/results/gpu_<date>.md (bench/results/gpu_dryrun_<date>.md in a dry run) and
# the logs under bench/results/gpu_<date>/; where $OUT is set (the device tool), copies the
# .md and a .tar.gz of the logs there.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=${CPU_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" && "$DRY" == 1 ]]; then PY="$ROOT/.venv/bin/python"; fi
BUDGET=${GPU_CHECK_BUDGET:-470}
ONLY=${GPU_CHECK_STEPS:-}
STAMP=$(date -u +%Y-%m-%d_%H%M)
NAME=$([[ "$DRY" == 1 ]] && echo "gpu_dryrun_$STAMP" || echo "gpu_$STAMP")
RESULTS=${GPU_CHECK_RESULTS:-$ROOT/bench/results}
LOGS="$RESULTS/$NAME"
REPORT="$RESULTS/$NAME.md"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
STEP_ORDER=()

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { printf '[%4ss] %s\n' "$(elapsed)" "$*"; }
wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }
status_of() { cut -d'|' -f1 "$LOGS/$1.status" 2>/dev/null || echo missing; }

# record STEP STATUS SECONDS BUDGET NOTE
record() {
  echo "$2|$3|$4|$5" > "$LOGS/$1.status"
  say "step $1: $2 ($3 s of $4 s)${5:+: $5}"
}

skip() {  # skip STEP REASON
  STEP_ORDER+=("$1")
  record "$1" skipped 0 0 "$2"
}

# run_step STEP BUDGET COMMAND: runs COMMAND (a bash string) with its own timeout, the
# output in $LOGS/STEP.log. The timeout is cut to what is left of the total budget.
run_step() {
  local step=$1 budget=$2 cmd=$3
  STEP_ORDER+=("$step")
  if ! wanted "$step"; then record "$step" skipped 0 "$budget" "not in GPU_CHECK_STEPS"; return; fi
  local left=$(( BUDGET - $(elapsed) - 5 ))
  if (( left < 15 )); then record "$step" skipped 0 "$budget" "no time left in the $BUDGET s budget"; return; fi
  (( budget > left )) && budget=$left
  say "step $step: starting (budget $budget s)"
  local start=$(date +%s) rc
  echo "$cmd" > "$LOGS/$step.cmd"
  timeout --kill-after=10 "$budget" bash -c "$cmd" > "$LOGS/$step.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  if (( rc == 0 )); then
    record "$step" passed "$took" "$budget" ""
  elif (( rc == 124 || rc == 137 )); then
    record "$step" failed "$took" "$budget" "timed out"
  else
    record "$step" failed "$took" "$budget" "exit $rc"
  fi
  if (( rc != 0 )); then tail -n 8 "$LOGS/$step.log" | sed 's/^/      | /'; fi
}

say "gpu_check: $([[ $DRY == 1 ]] && echo 'CPU DRY RUN' || echo GPU run), python $PY, budget $BUDGET s, results $REPORT"

# --- env -----------------------------------------------------------------------------------
run_step env 30 "
  (nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || echo 'nvidia-smi: absent')
  $PY -c 'import torch, platform; print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  (nvcc --version | tail -n 2 || echo 'nvcc: absent')
  (command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo 'compute-sanitizer: absent')
  echo \"cpus \$(nproc)\"; (git rev-parse HEAD 2>/dev/null || echo 'commit: unknown (no .git)')"

# --- build ---------------------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
  skip build "dry run: uses the extension already built here (GPU: TORCH_CUDA_ARCH_LIST=9.0 DID_ENGINE_CUDA=1 pip install --no-build-isolation --no-deps --no-index -e .)"
  run_step import 30 "$PY -c 'import did_engine, torch; print(\"did_engine\", did_engine.__version__, \"imports; CUDA kernels:\", torch._C._dispatch_has_kernel_for_dispatch_key(\"did_engine::block_decode_attention\", \"CUDA\"))'"
else
  run_step build 240 "
    export TORCH_CUDA_ARCH_LIST=9.0 DID_ENGINE_CUDA=1 MAX_JOBS=\$(nproc)
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
      || { echo 'pip failed; building in place with setup.py'; $PY setup.py build_ext --inplace; }
    $PY -c 'import did_engine, json; print(json.dumps(did_engine.build_info(), indent=1))'
    $PY -c 'import torch, did_engine
missing = [op for op in (\"block_decode_attention\", \"kv_commit\", \"block_causal_attention\", \"snapshot_remask\")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(\"did_engine::\" + op, \"CUDA\")]
assert not missing, f\"no CUDA kernels for {missing}\"
print(\"did_engine\", did_engine.__version__, \"built with CUDA kernels for all four ops\")'"
  if [[ "$(status_of build)" == failed ]]; then
    run_step build-cpu-fallback 150 "DID_ENGINE_CUDA=0 MAX_JOBS=\$(nproc) $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
  fi
fi

# --- tests, with the sanitizers beside them -------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || { [[ -x /usr/local/cuda/bin/compute-sanitizer ]] && echo /usr/local/cuda/bin/compute-sanitizer; })
KERNELS='regex=(decode_attention|decode_combine|block_causal|kv_commit|snapshot_remask)'
# sanitize TOOL: one step. Only our kernels are instrumented (--kernel-name), which keeps the
# run short; a sanitizer that refuses the filter prints no ERROR SUMMARY: then it is rerun
# without it.
sanitize() {
  local tool=$1
  run_step "$tool" 110 "
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    $SANITIZER --tool $tool --error-exitcode 3 --print-limit 20 --kernel-name '$KERNELS' \
      $PY bench/gpu_sanitize_ops.py; rc=\$?
    if (( rc != 0 )) && ! grep -q 'ERROR SUMMARY' \"$LOGS/$tool.log\"; then
      echo '--- retrying without the kernel filter'
      $SANITIZER --tool $tool --error-exitcode 3 --print-limit 20 $PY bench/gpu_sanitize_ops.py; rc=\$?
    fi
    exit \$rc"
}
if [[ "$DRY" == 1 ]]; then
  skip memcheck "dry run: no GPU (the calls themselves run on the CPU kernels in step sanitize-calls)"
  skip racecheck "dry run: no GPU"
  run_step sanitize-calls 60 "$PY bench/gpu_sanitize_ops.py --device cpu"
  # The cuda cases of tests/ops on the CPU kernels (tests/ops/cases.py): checks the tests themselves.
  run_step tests 150 "DID_ENGINE_CUDA_TESTS_DEVICE=cpu $PY -m pytest -q -p no:cacheprovider tests/ops -m 'cuda and not slow'; a=\$?
    $PY -m pytest -q -p no:cacheprovider tests/modeling/test_flex_mask.py -m 'not slow'; b=\$?; exit \$(( a || b ))"
else
  if [[ -n "$SANITIZER" && "$(status_of build)" != failed ]]; then
    { sanitize memcheck; sanitize racecheck; } > "$LOGS/sanitizers.out" 2>&1 &
    SANITIZE_PID=$!
  else
    skip memcheck "$([[ -z "$SANITIZER" ]] && echo 'compute-sanitizer not found' || echo 'needs the CUDA build')"
    skip racecheck "$([[ -z "$SANITIZER" ]] && echo 'compute-sanitizer not found' || echo 'needs the CUDA build')"
    SANITIZE_PID=
  fi
  run_step tests 200 "$PY -m pytest -q -p no:cacheprovider -rs tests/ops -m cuda; a=\$?
    $PY -m pytest -q -p no:cacheprovider -rs tests/modeling/test_flex_mask.py -m 'not slow or cuda'; b=\$?; exit \$(( a || b ))"
  if [[ -n "$SANITIZE_PID" ]]; then
    say "waiting for the sanitizers"
    wait "$SANITIZE_PID"
    cat "$LOGS/sanitizers.out"
    STEP_ORDER+=(memcheck racecheck)
  fi
fi

# --- training steps with FlexAttention ------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
  run_step train 120 "$PY bench/gpu_train_steps.py --device cpu --preset tiny --seq-len 32 --batch 4 --steps 2 --out '$LOGS/train.md'"
else
  run_step train 150 "$PY bench/gpu_train_steps.py --out '$LOGS/train.md'"
fi

# --- decode step and whole generations ------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
  run_step generate 120 "$PY bench/gpu_generate.py --device cpu --preset tiny --length 32 --batches 1,8,64 --reps 3 --out '$LOGS/generate.md'"
else
  run_step generate 150 "$PY bench/gpu_generate.py --budget 110 --out '$LOGS/generate.md'"
fi

# --- op benchmarks --------------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
  for part in remask causal decode; do skip "ops-$part" "dry run: bench/bench_cuda.py needs a CUDA device"; done
else
  run_step ops-remask 60 "$PY bench/bench_cuda.py --only remask --out '$LOGS/ops-remask.md'"
  run_step ops-causal 90 "$PY bench/bench_cuda.py --only causal --iters 20 --out '$LOGS/ops-causal.md'"
  # The decode table's compiled FlexAttention baseline compiles once per shape (12 shapes).
  if (( BUDGET - $(elapsed) > 200 )); then NO_FLEX=""; else NO_FLEX="--no-flex"; fi
  run_step ops-decode 180 "$PY bench/bench_cuda.py --only decode --iters 20 $NO_FLEX --out '$LOGS/ops-decode.md'"
fi

# --- the results file -----------------------------------------------------------------------
TOTAL=$(elapsed)
{
  echo "# GPU check $STAMP UTC$([[ $DRY == 1 ]] && echo ' (CPU dry run: tiny sizes, GPU-only steps skipped)')"
  echo
  echo "Made by \`bash bench/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` in $TOTAL s (budget $BUDGET s). Logs: \`${LOGS#"$ROOT"/}/\`."
  echo
  echo '```'
  cat "$LOGS/env.log" 2>/dev/null
  echo '```'
  echo
  echo "| step | status | seconds | budget s | note |"
  echo "|---|---|---|---|---|"
  for step in "${STEP_ORDER[@]}"; do
    IFS='|' read -r st secs bud note < "$LOGS/$step.status" 2>/dev/null || { st=missing; secs=-; bud=-; note="no status written"; }
    echo "| $step | $st | $secs | $bud | $note |"
  done
  for step in "${STEP_ORDER[@]}"; do
    st=$(status_of "$step")
    [[ "$st" == skipped || "$step" == env ]] && continue
    echo
    echo "## $step ($st)"
    echo
    if [[ -f "$LOGS/$step.md" ]]; then
      cat "$LOGS/$step.md"
    elif [[ "$step" == tests ]]; then
      echo '```'; grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed|error' "$LOGS/$step.log" | tail -n 25; echo '```'
    else
      echo '```'; tail -n 15 "$LOGS/$step.log"; echo '```'
    fi
    if [[ "$st" == failed && -f "$LOGS/$step.md" ]]; then echo; echo '```'; tail -n 15 "$LOGS/$step.log"; echo '```'; fi
  done
} > "$REPORT"

if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$REPORT" "$OUT/"
  tar -czf "$OUT/${NAME}_logs.tar.gz" -C "$RESULTS" "$NAME"
fi
say "done in $TOTAL s: $REPORT"
echo
cat "$REPORT"
FAILED=$(grep -l '^failed' "$LOGS"/*.status 2>/dev/null | wc -l)
exit $(( FAILED > 0 ))

#!/usr/bin/env bash
# One-shot GPU check: the test suite on the GPU, tuning of the LLM preset exported as one bundle,
# the quick benchmark with its ceilings, the report.
#
#   perf/gpu_check.sh OUTDIR          (on the GPU machine; ends within 8.5 minutes)
#
# For the device tool:  run(command="bash perf/gpu_check.sh $OUT", timeout_s=540)
# Then, here:           python3 -m perf.publish <the folder the files came back to>
#
# No installs, no network: the machine's python3 (torch, triton, matplotlib, pytest, pytest-timeout,
# filelock, tqdm).
# Each step runs under its own `timeout`, and all of them within $GPU_CHECK_SECONDS (510 s), so
# a slow step costs the later ones time but never the files the earlier ones wrote.
#
# OUTDIR stays flat and holds at most 8 files (what the device tool brings back):
#   env.txt        date, git commit, nvidia-smi, python/torch/cuda/cudnn/triton versions
#   status.txt     each step's exit code, seconds and cap (124/137: timed out)
#   tests.log      step 1: python -m pytest -q <test files> -x --timeout 120                (cap 120 s)
#   tune.log       step 2: autotune tune <op> --preset llm, default strategy, per-op cap; exports  (cap 175 s)
#   tuned.json     the tuned configs as one `autotune export` bundle: step 2's, then step 3's added
#   bench.log      step 3: python -m perf.bench --preset quick (+ replay), step 4's output too
#   results.json   step 3's results, rewritten after every op: a kill keeps the ops done
#   report.tar.gz  step 4: report/report.md and its PNGs (one per op/mode/dtype, speedup.png, replay.png)
#
# Knobs (environment), for a dry run without a GPU and for a rerun that needs less:
#   GPU_CHECK_TESTS          pytest targets                      (every test file, the kernels' first)
#   GPU_CHECK_TUNE_OPS       ops tuned, in order                 (matmul linear attention softmax layer_norm rms_norm)
#   GPU_CHECK_TUNE_PRESET    their shape preset                  (llm)
#   GPU_CHECK_TUNE_DTYPES    their dtypes, comma-separated       (bfloat16)
#   GPU_CHECK_TUNE_OP_SECONDS  each op's cap; GPU_CHECK_TUNE_KEY_SECONDS, GPU_CHECK_TUNE_BUDGET each key's (22, 10, 20)
#   GPU_CHECK_PRESET, GPU_CHECK_BENCH_OPS, GPU_CHECK_BENCH_DTYPES  the benchmark's preset, ops and dtypes
#                            (quick, all, the preset's: quick measures bfloat16 only, and no log_softmax)
# Dry run here:  GPU_CHECK_TESTS=tests/test_perf.py GPU_CHECK_PRESET=smoke GPU_CHECK_TUNE_PRESET=smoke \
#                bash perf/gpu_check.sh /tmp/gpu-check
set -u
OUTDIR=${1:?usage: perf/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 1

# the checkout's tritonops and autotune, and the perf package, whether or not they are installed
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# what is tuned here goes to a scratch cache, never to a real one; the bundle carries it out
TUNE_CACHE=$WORK/tune-cache
PY=${PYTHON:-python3}
# the kernels' own tests first (what the interpreter may accept and a GPU refuse), the sm90 compile
# check (what the GPU itself now shows) last; every other test file between, in name order
FIRST="test_matmul_variants test_attention_paths test_rows_long test_matmul test_softmax test_norm test_attention
       test_training test_autocast"
LAST="test_gpu_compile"
ordered_tests() {
  local f name
  for name in $FIRST; do echo "tests/$name.py"; done
  for f in tests/test_*.py; do
    name=$(basename "$f" .py)
    case " $(echo $FIRST $LAST) " in *" $name "*) ;; *) echo "$f" ;; esac
  done
  for name in $LAST; do echo "tests/$name.py"; done
}
TESTS=${GPU_CHECK_TESTS:-$(ordered_tests | tr '\n' ' ')}
if [ -n "${GPU_CHECK_LIST_TESTS:-}" ]; then echo "$TESTS"; exit 0; fi  # what step 1 would run, nothing else
TUNE_OPS=${GPU_CHECK_TUNE_OPS:-matmul linear attention softmax layer_norm rms_norm}
TUNE_PRESET=${GPU_CHECK_TUNE_PRESET:-llm}
TUNE_DTYPES=${GPU_CHECK_TUNE_DTYPES:-bfloat16}
TUNE_OP_SECONDS=${GPU_CHECK_TUNE_OP_SECONDS:-22}
TUNE_KEY_SECONDS=${GPU_CHECK_TUNE_KEY_SECONDS:-10}
TUNE_BUDGET=${GPU_CHECK_TUNE_BUDGET:-20}
PRESET=${GPU_CHECK_PRESET:-quick}
BENCH_OPS=${GPU_CHECK_BENCH_OPS:-all}
BENCH_DTYPES=${GPU_CHECK_BENCH_DTYPES:-}
TOTAL=${GPU_CHECK_SECONDS:-510}
START=$SECONDS
: >"$OUTDIR/status.txt"

left() { echo $((TOTAL - (SECONDS - START))); }

# step NAME CAP_SECONDS LOGFILE command...: output to LOGFILE and to stdout; never stops the script
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local rest
  rest=$(($(left) - 5))
  ((cap > rest)) && cap=$rest
  if ((cap < 15)); then
    echo "$name: skipped, out of time" | tee -a "$OUTDIR/status.txt"
    return 0
  fi
  echo "=== $name (cap ${cap} s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local note=""
  if ((rc == 124 || rc == 137)); then note=" TIMED OUT"; fi
  echo "$name: rc=$rc seconds=$((SECONDS - t0)) cap=$cap$note" | tee -a "$OUTDIR/status.txt"
  return 0
}

# place FILE NAME: FILE into OUTDIR as NAME by a rename within OUTDIR, so a kill never leaves half
# a file under that name (nor, after the next call, a temp file beside it)
place() {
  rm -f "$OUTDIR"/.place.*
  cp "$1" "$OUTDIR/.place.$2" && chmod 644 "$OUTDIR/.place.$2" && mv -f "$OUTDIR/.place.$2" "$OUTDIR/$2"
}

# export: every tuned config of this device as one bundle
export_bundle() {
  local t0=$SECONDS
  AUTOTUNE_CACHE_DIR=$TUNE_CACHE timeout -k 5 30 "$PY" -m autotune export "$WORK/tuned.json" \
    >>"$OUTDIR/tune.log" 2>&1 && place "$WORK/tuned.json" tuned.json
  echo "export: rc=$? seconds=$((SECONDS - t0))" | tee -a "$OUTDIR/status.txt"
}

# 0. environment
timeout 30 bash -c '
  date -u
  echo "commit: $(git rev-parse HEAD 2>/dev/null) ($(git status --short 2>/dev/null | wc -l) changed files)"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
  '"$PY"' -c "
import sys, platform, torch, triton
print(\"python\", sys.version.split()[0], platform.machine())
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version())
print(\"triton\", triton.__version__)
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"NO CUDA DEVICE\")
"
  echo "tuning: ops '"$TUNE_OPS"', preset '"$TUNE_PRESET"', dtypes '"$TUNE_DTYPES"', '"$TUNE_OP_SECONDS"' s per op, '"$TUNE_KEY_SECONDS"' s and '"$TUNE_BUDGET"' configs per key"
' >"$OUTDIR/env.txt" 2>&1
echo "env: rc=$? seconds=$((SECONDS - START))" | tee -a "$OUTDIR/status.txt"

# 1. the test suite on the GPU, its tuning in a cache of its own
AUTOTUNE_CACHE_DIR=$WORK/test-cache step tests 120 "$OUTDIR/tests.log" \
  "$PY" -m pytest -q $TESTS -x --timeout 120 -p no:cacheprovider --durations=15

# 2. tuning, the default strategy, each op within its cap; then the bundle
tune_cap=$(($(left) - 240))  # leaves the benchmark and the report their time
((tune_cap > 175)) && tune_cap=175
AUTOTUNE_CACHE_DIR=$TUNE_CACHE step tune "$tune_cap" "$OUTDIR/tune.log" \
  "$PY" -m autotune tune $TUNE_OPS --preset "$TUNE_PRESET" --dtype "$TUNE_DTYPES" \
  --op-seconds "$TUNE_OP_SECONDS" --seconds "$TUNE_KEY_SECONDS" --budget "$TUNE_BUDGET" --quiet
export_bundle

# 3. the quick benchmark, reading the configs tuned above (the cases it tunes itself join them);
# its own budget ends it before the cap, which stays as a backstop
budget=$(($(left) - 80))
((budget > 200)) && budget=200
((budget < 10)) && budget=10
AUTOTUNE_CACHE_DIR=$TUNE_CACHE step bench $((budget + 30)) "$OUTDIR/bench.log" \
  "$PY" -m perf.bench --preset "$PRESET" --ops "$BENCH_OPS" ${BENCH_DTYPES:+--dtypes "$BENCH_DTYPES"} \
  --time-budget "$budget" --replay 16 \
  --out "$OUTDIR/results.json"
rm -f "$OUTDIR/.results.json.tmp"  # left only by a kill in the middle of a write
export_bundle

# 4. the report: report.md and the plots in one archive
if [ -s "$OUTDIR/results.json" ]; then
  step report 40 "$OUTDIR/bench.log" "$PY" -m perf.report "$OUTDIR/results.json" -o "$WORK/report"
  [ -d "$WORK/report" ] && tar czf "$WORK/report.tar.gz" -C "$WORK" report && place "$WORK/report.tar.gz" report.tar.gz
  echo "archive: rc=$?" | tee -a "$OUTDIR/status.txt"
else
  echo "report: skipped, no results.json" | tee -a "$OUTDIR/status.txt"
fi

echo "=== gpu_check done in $((SECONDS - START)) s"
cat "$OUTDIR/status.txt"
ls -la "$OUTDIR"

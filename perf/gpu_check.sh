#!/usr/bin/env bash
# One-shot GPU check: the test suite on the GPU, the quick benchmark, its report.
#
#   perf/gpu_check.sh OUTDIR          (on the GPU machine; ends within 8 minutes)
#
# For the device tool:  run(command="bash perf/gpu_check.sh $OUT", timeout_s=540)
#
# No installs, no network: the machine's python3 (torch, triton, matplotlib, pytest-timeout).
# Each step runs under its own `timeout`, and all of them within $GPU_CHECK_SECONDS (465 s), so
# a slow step costs the later ones time but never the files the earlier ones wrote.
#
# OUTDIR stays flat and holds at most 8 files (what the device tool brings back):
#   env.txt        date, git commit, nvidia-smi, python/torch/cuda/cudnn/triton versions
#   tests.log      step 1: python -m pytest -q tests -x --timeout 120          (cap 165 s)
#   bench.log      step 2: python -m perf.bench --preset quick (+ replay), step 3's output too (cap 230 s)
#   results.json   step 2's results, rewritten after every op: a kill keeps the ops done
#   report.md      step 3: the report's text                                     (cap 40 s)
#   report.tar.gz  step 3: report.md and all PNGs (one per op/mode/dtype, speedup.png, replay.png)
#   status.txt     each step's exit code, seconds and cap (124/137: timed out)
#   (.results.json.tmp only if step 2 was killed in the middle of a write)
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
# the tests' and the quick preset's capped tuning go to a scratch cache, never to a real one
export AUTOTUNE_CACHE_DIR=$WORK/tune-cache
PY=${PYTHON:-python3}
# overridable for a dry run without a GPU: GPU_CHECK_TESTS=tests/test_perf.py GPU_CHECK_PRESET=smoke
TESTS=${GPU_CHECK_TESTS:-tests}
PRESET=${GPU_CHECK_PRESET:-quick}
TOTAL=${GPU_CHECK_SECONDS:-465}
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
' >"$OUTDIR/env.txt" 2>&1
echo "env: rc=$? seconds=$((SECONDS - START))" | tee -a "$OUTDIR/status.txt"

# 1. the test suite on the GPU
step tests 165 "$OUTDIR/tests.log" \
  "$PY" -m pytest -q $TESTS -x --timeout 120 -p no:cacheprovider --durations=15

# 2. the quick benchmark; its own budget ends it ~30 s before the cap, which stays as a backstop
budget=$(($(left) - 75))
((budget > 200)) && budget=200
((budget < 10)) && budget=10
step bench 230 "$OUTDIR/bench.log" \
  "$PY" -m perf.bench --preset "$PRESET" --time-budget "$budget" --replay 16 --out "$OUTDIR/results.json"

# 3. the report: plots packed into one archive, report.md beside it
if [ -s "$OUTDIR/results.json" ]; then
  step report 40 "$OUTDIR/bench.log" "$PY" -m perf.report "$OUTDIR/results.json" -o "$WORK/report"
  if [ -d "$WORK/report" ]; then
    cp "$WORK/report/report.md" "$OUTDIR/" 2>/dev/null
    tar czf "$OUTDIR/report.tar.gz" -C "$WORK" report
  fi
else
  echo "report: skipped, no results.json" | tee -a "$OUTDIR/status.txt"
fi

echo "=== gpu_check done in $((SECONDS - START)) s"
cat "$OUTDIR/status.txt"
ls -la "$OUTDIR"
rm -rf "$WORK"

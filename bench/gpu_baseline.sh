#!/usr/bin/env bash
# Issue 9 item 4: the frontend baseline on the GPU machine, in one unattended command.
#   1. build the default model and the Qwen2-VL-2B-shaped one (bench/qwen2vl_2b.py);
#   2. sweep the default model: inline 1x1, pool 1x1, 1x4, 1x16, 2x2, 4x2, 8x2, 12x1, 16x1
#      (N x W = --api-server-count N --renderer-num-workers W);
#   3. sweep the 2B-shaped model: 1x4, 4x2, 8x2.
# Workload: 64 closed-loop clients, a distinct 1024x768 photo per request (data URL), 16
# output tokens with ignore_eos, WARMUP_S of warm-up then MEASURE_S measured per configuration.
# Everything fits in BUDGET_S (default 550 s): both models are built first, then each sweep
# gets a --time-budget and skips (and reports) what would not fit, so the results written so
# far always come back.
#
# Usage: bench/gpu_baseline.sh OUT_DIR [MEASURE_S [WARMUP_S]]
#   env: BUDGET_S (550), RESERVE_2B_S (seconds kept for the 2B sweep, 220), PYTHON (python3),
#        SWEEP_ENV (e.g. "OMP_NUM_THREADS=1", set in every server's environment)
# Needs the repo root on PYTHONPATH (no install); writes OUT_DIR/{gpu.txt, default/, 2b/}, each
# sweep folder with sweep.json, sweep.md (ready to paste), sweep.png and the servers' logs.
set -euo pipefail
out=${1:?usage: bench/gpu_baseline.sh OUT_DIR [MEASURE_S [WARMUP_S]]}
measure=${2:-10}
warmup=${3:-3}
budget=${BUDGET_S:-550}
reserve_2b=${RESERVE_2B_S:-220}
py=${PYTHON:-python3}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
at_least_1() { echo $(($1 > 1 ? $1 : 1)); }

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $py -c "import os, torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cores', len(os.sched_getaffinity(0)))"
} | tee "$out/gpu.txt"

env_args=()
for kv in ${SWEEP_ENV:-}; do env_args+=(--env "$kv"); done
common=(
    --max-concurrency 64 --image-size 1024x768 --output-len 16 --ignore-eos
    --warmup-seconds "$warmup" --duration "$measure" --num-prompts 8000 --request-timeout 60
    --no-progress
    ${env_args[@]+"${env_args[@]}"}
)

$py -m apiserver.cli build-model "$work/default" >/dev/null
# Both models first, so that the split of the time left between the two sweeps is known.
has_2b=0
echo "== building the Qwen2-VL-2B-shaped model ($(left) s left)"
if timeout 180 $py bench/qwen2vl_2b.py "$work/2b" >/dev/null; then
    has_2b=1
else
    echo "the 2B model build failed or took over 180 s: only the default model is swept"
fi

echo "== default model ($(left) s left)"
$py -m apiserver.cli bench sweep "$work/default" "${common[@]}" \
    --configs inline:1x1 pool:1x1 pool:1x4 pool:1x16 2x2 4x2 8x2 12x1 16x1 \
    --server-start-timeout 120 --time-budget "$(at_least_1 $(($(left) - has_2b * reserve_2b)))" \
    --result-dir "$out/default" >"$out/default.stdout" || echo "default sweep: exit $?"

if ((has_2b)); then
    echo "== Qwen2-VL-2B-shaped model ($(left) s left)"
    $py -m apiserver.cli bench sweep "$work/2b" "${common[@]}" --configs 1x4 4x2 8x2 \
        --server-start-timeout 240 --time-budget "$(at_least_1 "$(left)")" \
        --result-dir "$out/2b" >"$out/2b.stdout" || echo "2B sweep: exit $?"
fi

echo
echo "== summary ($(($(date +%s) - start)) s in all)"
for sweep in default 2b; do
    if [[ -f $out/$sweep/sweep.md ]]; then
        echo "-- $sweep"
        # The main table, and the per-server shares below it.
        sed -n '/^| config | req\/s/,/^$/p; /^| config | per server/,/^$/p' "$out/$sweep/sweep.md"
        grep -A20 '^Not measured' "$out/$sweep/sweep.md" || true
    fi
done

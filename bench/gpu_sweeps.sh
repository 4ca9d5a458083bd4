#!/usr/bin/env bash
# The GPU machine's `fanin bench sweep` runs, one PART per device command (each fits in one
# 10-minute command: every sweep has a --time-budget and skips, and reports, what would not
# fit, so what ran always comes back). All image workloads: distinct 1024x768 photos (data
# URLs), 16 output tokens with ignore_eos, 64 closed-loop clients unless paced.
#
#   baseline  (issue 9) the default model at inline 1x1, pool 1x1, 1x4, 1x16, 2x2, 4x2, 8x2,
#             12x1, 16x1, then the Qwen2-VL-2B-shaped model at 1x4, 4x2, 8x2. N x W =
#             --api-server-count N --renderer-num-workers W.
#   scaleout  (issue 10) the default model (the frontend is the limit) with default flags
#             (`auto`: the CPU budget sizes threads): inline 1x1 and pool 1x14 (one process,
#             a render thread per core left to the API servers) against N x auto for
#             N = 2, 4, 8, 12, 14.
#             SCALEOUT_CONFIGS replaces that list.
#   rest      (issue 10, item 4: the rows beside the scale-out sweep) the default model with
#             1920x1080 photos (pool 1x14, 8 x auto) and with ShareGPT text alone (64 output
#             tokens; 1 x auto, 8 x auto: N > 1 must cost nothing there), then the
#             Qwen2-VL-2B-shaped model with 1024x768 photos (pool 1x4, 4 x auto, 8 x auto).
#   vl        (issue 11) the 2B-shaped model through 4 API servers (image req/s with
#             `nvidia-smi dmon` utilisation beside it), then bench/engine_bench.py on it as
#             time allows.
#   profile   the default model at 4 x auto (PROFILE_FLAGS replaces the serve flags) under
#             py-spy (when present, idle samples included: a thread's samples are its wall
#             time): one closed-loop run, then where each process's time went
#             (bench/stacks.py; the engine core within its serving loop).
#   kernels   (issue 11) where the GPU time of the tower and of a prefill step goes
#             (bench/engine_profile.py: kernel kinds, attention backends, GEMM rates), for
#             the 2B-shaped model and the default model.
#   overload  (issue 13) the default model at 1x and 2x the rate that saturates 4 API
#             servers, for 4 x auto, inline 1x1 and pool 1x14, with a 10 s client timeout.
#
# Usage: bench/gpu_sweeps.sh PART OUT_DIR
#   env: BUDGET_S (whole command, default 540), PYTHON (python3), SERVE_FLAGS (added to every
#   `fanin serve` of a sweep, e.g. "--max-queue-wait 1"), SWEEP_NAME (the overload sweep's
#   result folder, default overload), OVERLOAD_CONFIGS (its configurations)
# Needs the repo root on PYTHONPATH (no install). Writes OUT_DIR/gpu.txt and one folder per
# sweep (sweep.json, sweep.md ready to paste, sweep.png, the servers' logs).
set -euo pipefail
part=${1:?usage: bench/gpu_sweeps.sh baseline|scaleout|rest|vl|profile|kernels|overload OUT_DIR}
out=${2:?usage: bench/gpu_sweeps.sh baseline|scaleout|rest|vl|profile|kernels|overload OUT_DIR}
budget=${BUDGET_S:-540}
py=${PYTHON:-python3}
start=$(date +%s)
left() { local s=$((budget - ($(date +%s) - start) - ${1:-0})); echo $((s > 1 ? s : 1)); }

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $py -c "import os, torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cores', len(os.sched_getaffinity(0)))" || true
    lscpu | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))' || true
} | tee "$out/gpu.txt"

images=(--max-concurrency 64 --image-size 1024x768 --output-len 16 --ignore-eos --no-progress)
# sweep NAME MODEL_DIR FLAGS...: one `fanin bench sweep`, its stdout and stderr beside it.
sweep() {
    local name=$1 model=$2
    shift 2
    echo "== $name ($(left) s left)"
    $py -m apiserver.launch.cli bench sweep "$model" "${images[@]}" "$@" --result-dir "$out/$name" \
        ${SERVE_FLAGS:+-- $SERVE_FLAGS} >"$out/$name.stdout" 2>"$out/$name.stderr" ||
        echo "$name: exit $?"
    sed -n '/^| config | req\/s/,/^$/p; /^| config | offered/,/^$/p' "$out/$name/sweep.md" || true
}
build_2b() { timeout 180 $py bench/qwen2vl_2b.py "$work/2b" >/dev/null; }

$py -m apiserver.launch.cli build-model "$work/default" >/dev/null
case $part in
baseline)
    has_2b=1
    build_2b || { has_2b=0 && echo "the 2B model build failed: only the default model"; }
    sweep baseline-default "$work/default" --warmup-seconds 2 --duration 8 --num-prompts 8000 \
        --request-timeout 60 --server-start-timeout 120 --time-budget "$(left $((has_2b * 140)))" \
        --configs inline:1x1 pool:1x1 pool:1x4 pool:1x16 2x2 4x2 8x2 12x1 16x1
    if ((has_2b)); then
        sweep baseline-2b "$work/2b" --warmup-seconds 2 --duration 8 --num-prompts 8000 \
            --request-timeout 60 --server-start-timeout 240 --time-budget "$(left)" \
            --configs 1x4 4x2 8x2
    fi
    ;;
scaleout)
    sweep scaleout "$work/default" --warmup-seconds 2 --duration 8 --num-prompts 8000 \
        --request-timeout 60 --server-start-timeout 120 --time-budget "$(left)" \
        --configs ${SCALEOUT_CONFIGS:-inline:1x1 pool:1x14 2xauto 4xauto 8xauto 12xauto 14xauto}
    ;;
rest)
    sweep scaleout-1080p "$work/default" --image-size 1920x1080 --warmup-seconds 2 --duration 8 \
        --num-prompts 8000 --request-timeout 60 --server-start-timeout 120 \
        --time-budget "$(left 300)" --configs pool:1x14 8xauto
    sweep scaleout-text "$work/default" --dataset sharegpt --output-len 64 --warmup-seconds 2 \
        --duration 8 --num-prompts 8000 --request-timeout 60 --server-start-timeout 120 \
        --time-budget "$(left 220)" --configs 1xauto 8xauto
    if build_2b; then
        sweep scaleout-2b "$work/2b" --warmup-seconds 2 --duration 8 --num-prompts 8000 \
            --request-timeout 60 --server-start-timeout 240 --time-budget "$(left)" \
            --configs pool:1x4 4xauto 8xauto
    else
        echo "the 2B model build failed: no 2B runs"
    fi
    ;;
vl)
    has_2b=1
    build_2b || { has_2b=0 && echo "the 2B model build failed: no 2B runs"; }
    if ((has_2b)); then
        nvidia-smi dmon -s u -d 1 >"$out/gpu_util.txt" 2>&1 &
        dmon=$!
        sweep vl-2b "$work/2b" --warmup-seconds 3 --duration 15 --num-prompts 4000 \
            --request-timeout 60 --server-start-timeout 240 --time-budget 150 --configs 4xauto
        kill "$dmon" 2>/dev/null || true
        # dmon also sampled the server's start and stop: the 15 busiest seconds are the window.
        awk '$1 ~ /^[0-9]+$/ {print $2}' "$out/gpu_util.txt" | sort -rn | head -n 15 |
            awk '{s += $1; n++} END {if (n) printf "GPU SM busy: %.0f %% (mean of the %d busiest seconds)\n", s / n, n}'
        echo "== engine_bench ($(left) s left)"
        timeout "$(left 5)" $py bench/engine_bench.py --model "$work/2b" --rounds 1 \
            --batches 1,16,64,256 --hf-batches 1 --out "$out/engine_bench.json" \
            >"$out/engine_bench.log" 2>&1 || echo "engine_bench: exit $?"
        grep -v "Loading weights" "$out/engine_bench.log" | tail -n 22
    fi
    ;;
profile)
    pyspy=$(command -v py-spy || echo "${PYSPY:-/tmp/site/bin/py-spy}")
    port=8100
    # py-spy starts the server (so it may trace its children); the window is cut by the
    # server's stop, --duration only bounds it.
    $pyspy record --subprocesses --threads --nonblocking --idle -r 100 -d "$(left 20)" -f raw \
        -o "$out/stacks.raw" -- $py -m apiserver.launch.cli serve "$work/default" --port $port \
        ${PROFILE_FLAGS:---api-server-count 4} >"$out/serve.log" 2>&1 &
    spy=$!
    for _ in $(seq 180); do
        curl -fs -o /dev/null "http://127.0.0.1:$port/ready" && break
        sleep 1
    done
    nvidia-smi dmon -s u -d 1 >"$out/gpu_util.txt" 2>&1 &
    dmon=$!
    $py -m apiserver.launch.cli bench --base-url "http://127.0.0.1:$port" "${images[@]}" \
        --warmup-seconds 2 --duration "${PROFILE_SECONDS:-15}" --num-prompts 8000 \
        --request-timeout 60 --result-dir "$out/profile" >"$out/profile.stdout" 2>&1 ||
        echo "bench: exit $?"
    kill "$dmon" 2>/dev/null || true
    grep -E '^\| (request throughput|completed in|TTFT|TPOT|/health|server|completed per)' \
        "$out/profile.stdout" || tail -n 20 "$out/profile.stdout"
    pkill -TERM -f fanin-launcher || true
    wait "$spy" || echo "py-spy: exit $?"
    awk '$1 ~ /^[0-9]+$/ {print $2}' "$out/gpu_util.txt" | sort -rn | head -n 10 |
        awk '{s += $1; n++} END {if (n) printf "GPU SM busy: %.0f %% (mean of the %d busiest seconds)\n", s / n, n}'
    if [[ -s $out/stacks.raw ]]; then
        $py -m bench.stacks "$out/stacks.raw" --match engine_core --within EngineCore.run \
            --top 40 >"$out/engine_stacks.txt"
        # The API servers are forked from the launcher: py-spy names them by its title
        # (each server's threads apart by thread id).
        $py -m bench.stacks "$out/stacks.raw" --match fanin-launcher --top 25 \
            >"$out/api_stacks.txt"
        head -n 60 "$out/engine_stacks.txt"
        gzip -f "$out/stacks.raw"
    fi
    ;;
kernels)
    for m in 2b default; do
        [[ $m == default ]] || build_2b || { echo "the 2B model build failed"; continue; }
        echo "== engine_profile $m ($(left) s left)"
        timeout "$(left 5)" $py bench/engine_profile.py --model "$work/$m" \
            --out "$out/engine_profile_$m.json" >"$out/engine_profile_$m.log" 2>&1 ||
            echo "engine_profile $m: exit $?"
        grep -v -E "Loading weights|^(USDT|ERROR|WARNING):" "$out/engine_profile_$m.log" | tail -n 60
    done
    ;;
overload)
    sweep "${SWEEP_NAME:-overload}" "$work/default" --rate-multiples 1 2 --warmup-seconds 2 --duration 8 \
        --num-prompts 20000 --request-timeout 10 --server-start-timeout 120 \
        --time-budget "$(left)" --configs ${OVERLOAD_CONFIGS:-4xauto inline:1x1 pool:1x14}
    ;;
*)
    echo "unknown part $part (baseline, scaleout, rest, vl, profile, kernels, overload)" >&2
    exit 2
    ;;
esac
echo "== done in $(($(date +%s) - start)) s"

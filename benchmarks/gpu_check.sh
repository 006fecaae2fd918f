#!/usr/bin/env bash
# The GPU check of issue 9 in one call: the GPU tests, then benchmarks/gpu_latency.py eager and
# compiled (SD-XL base, random fp16 weights, 1024 px, batch 2). Made for the device tool's H200,
# whose image has PyTorch with CUDA and Triton but not diffusers: carry diffusers' wheel in .whl/
# (README.md, "On a GPU"). Extra arguments go to gpu_latency.py (e.g. --modes compiled).
#
#   bash benchmarks/gpu_check.sh [gpu_latency.py options]
#
# Writes gpu-tests.log, gpu-latency.log and gpu-latency.json to $OUT (set by the device tool) or
# ./gpu-results. Time limits: TESTS_S (default 150 s) for the tests, BENCH_S (400 s) for the
# benchmark, which is then interrupted and prints what it measured; SKIP_TESTS=1 skips the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
results="${OUT:-gpu-results}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| diffusers',
diffusers.__version__, '| GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || exit 1

status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout --signal=INT --kill-after=20 "${TESTS_S:-150}" \
        python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$results/gpu-tests.log" || status=1
fi
# ToMe's keep ratio at the pruned phase's MACs (both with their own work) on sdxl-base at 1024 px, solved on the CPU by
# gpu_latency.py itself (about 40 s) and given here to save device time.
timeout --signal=INT --kill-after=30 "${BENCH_S:-400}" \
    python3 benchmarks/gpu_latency.py --tome-keep 0.4536 --json "$results/gpu-latency.json" "$@" 2>&1 \
    | tee "$results/gpu-latency.log" || status=1
exit $status

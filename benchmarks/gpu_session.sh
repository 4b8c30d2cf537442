#!/usr/bin/env bash
# The one prepared script of a GPU session (../shared/gpu/README.md): after
#   GPU_EXTRA_WHEELS="pytest pluggy iniconfig hypothesis sortedcontainers xgrammar apache-tvm-ffi" \
#       bash ../shared/gpu/prepare.sh
# here (the image lacks pytest, and hypothesis and xgrammar: without them the gpu tests do
# not collect and the engine does not import), run `bash benchmarks/gpu_session.sh` on the device
# with carry [".gpu"] and a timeout of about 600 s. Most valuable first; every step under its own timeout, its log
# under $OUT (what is there comes back even if the call times out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 -c "import hypothesis, xgrammar, nolaserve.server.build" 2>&1 | tee "$OUT/deps.txt"
# 1. graph replay equals eager, and every other gpu-marked test (Triton cases natively); only
#    the files that hold them, as the rest import what the image lacks (openai, httpx, ...)
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors \
    $(grep -l "mark.gpu" tests/*.py) 2>&1 | tee "$OUT/gpu_tests.log"
# 2. the 8B-shaped decode: HBM floor, step at batch 1/64/256, graphed against eager
timeout 300 python3 -m nolaserve.benchmarks.gpu_8b --skip peft --max-tokens 64 \
    2>&1 | tee "$OUT/gpu_8b.log"
# 3. the kernels of issue #28: SGMV in-graph by spread, paged attention against SDPA at
#    512/4k/32k, regeneration of both shapes (GB/s and ms; quick sizes if time is short)
timeout 150 python3 -m nolaserve.benchmarks.gpu --only ops,attention,regen \
    2>&1 | tee "$OUT/gpu_kernels.log"

#!/usr/bin/env bash
# The GPU issue's device checks in one run, for a session lent a GPU (about 8 minutes on one H200). From the repo
# root, through the device tool, with the wheels the machine lacks (captum, jsonargparse, pycocotools and their
# needs; see the device tool's README) downloaded to .whl/ and carried:
#     bash benchmarks/gpu_check.sh
# Writes to $OUT (or /tmp/gpu_check): device.txt, tests.log (the CUDA sync-debug tests and the compile tests),
# realistic.log (`family_speed --realistic`: the issue's table, fp32 and bf16) and icnn_balanced.log (ICNN with the
# parts-world configs' balanced assignment against its twins, tinycnn and resnet18 at 64 px).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$OUT/device.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_host_sync.py tests/test_compile.py 2>&1 \
    | tee "$OUT/tests.log"
timeout 330 python3 -m benchmarks.family_speed --realistic --device cuda 2>&1 | tee "$OUT/realistic.log"
timeout 120 python3 -m benchmarks.icnn_step_time --device cuda --backbones tinycnn resnet18 \
    --category-assignment balanced 2>&1 | tee "$OUT/icnn_balanced.log"

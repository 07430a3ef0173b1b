#!/usr/bin/env bash
# The GPU issue's device checks in one run, for a session lent a GPU: everything fits in BUDGET seconds (default
# 540; on one H200 on 2026-12-04 sync, realistic, heads and balanced took 32, 54, 16 and 29 s, and compiled and the
# suite ran out of their 120 and 150 s), each stage under its own limit, its log written as it runs, so a stage cut
# short still reports what it measured. From the repo root, through the device tool, with the wheels the machine
# lacks (captum, jsonargparse, docstring_parser, typeshed_client, pycocotools; see the device tool's README)
# downloaded to .whl/ and carried:
#     bash benchmarks/gpu_check.sh
# Writes to $OUT (or /tmp/gpu_check), one log per stage, in this order:
#   device.txt      GPU, driver, torch
#   sync.log        every family's training step on the GPU under torch.cuda.set_sync_debug_mode
#                   (tests/test_host_sync.py)
#   realistic.log   `family_speed --realistic`: the issue's table, fp32 and bf16, eager
#   triton.log      the AOG DP's Triton kernels compiled on the GPU against the PyTorch waves, and the terminal
#                   pooling's box sums under real TF32 (tests/test_aog_rcnn.py)
#   heads.log       the AOG RoI heads alone, every variant (full-rank and rank-32 terminal maps, shared cell maps,
#                   the Triton DP)
#   profile.log     one profiled train step of each side of the rows furthest from their targets: CUDA kernels,
#                   device time against wall time, the costliest kernels (`benchmarks.step_profile`)
#   graphs.log      the launch-bound rows (L2X, ReNN, tinycnn ICNN, textual) again in bf16, both sides compiled
#                   with the "cudagraphs" backend (each step replayed as CUDA graphs; `compile=cudagraphs`)
#   compiled.log    (not in the default STAGES: measured on 2026-12-04) the ICNN, L2X and ReNN rows again in bf16
#                   with both sides compiled by inductor (about 40 s of compilation per row)
#   suite.log       the whole test suite with CUDA present (the tests pin the CPU themselves), one line per test
#   balanced.log    ICNN with the parts-world configs' balanced assignment against its twins, 64 px
# A dry run of the plumbing on a CPU, shrunk (LIMIT_FACTOR stretches every stage's limit, sized for a GPU: a busy
# 2-core CPU took 60 s for the profile stage's rows):
#     DEVICE=cpu SCALE=0.125 LIMIT_FACTOR=4 STAGES="realistic compiled" bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1.0}
LIMIT_FACTOR=${LIMIT_FACTOR:-1}
STAGES=${STAGES:-sync triton realistic heads profile graphs suite balanced}
# the profile stage's rows: those furthest from their targets (give fewer to profile them alone)
PROFILE_ROWS=${PROFILE_ROWS:-aog3 aog7 aog7_triton textual renn l2x icnn_tinycnn aog_rcnn}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}

# stage NAME LIMIT COMMAND...: COMMAND under min(LIMIT, what is left of BUDGET), its output in $OUT/NAME.log
stage() {
    local name=$1 limit=$(($2 * LIMIT_FACTOR)) left=$((BUDGET - SECONDS)) start=$SECONDS
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, ${left} s of the budget left" | tee "$OUT/$name.log"
        return
    fi
    echo "== $name (at most $limit s): $*"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/device.txt"
stage sync 100 python3 -m pytest -q -p no:cacheprovider -rA tests/test_host_sync.py -k gpu
tail -n 15 "$OUT/sync.log" 2>/dev/null
stage triton 60 python3 -m pytest -q -p no:cacheprovider -rA tests/test_aog_rcnn.py -k "triton or gpu_tf32"
grep -E "passed|failed|Error" "$OUT/triton.log" 2>/dev/null | tail -n 5
stage realistic 200 python3 -m benchmarks.family_speed --realistic --device "$DEVICE" --scale "$SCALE"
grep -E "^\||^torch|Error" "$OUT/realistic.log" 2>/dev/null | tail -n 30
stage heads 50 python3 -m benchmarks.family_speed --families --device "$DEVICE" --heads aog3 aog3_rank32 aog3_cells \
    mlp aog7 aog7_rank32 aog7_cells aog7_triton
grep -E "^\||^torch|Error" "$OUT/heads.log" 2>/dev/null | tail -n 16
# shellcheck disable=SC2086  # PROFILE_ROWS: one word per row
stage profile 60 python3 -m benchmarks.step_profile --device "$DEVICE" --scale "$SCALE" --top 6 --rows $PROFILE_ROWS
grep -E "^[a-z0-9_]+ / |Error" "$OUT/profile.log" 2>/dev/null | tail -n 14
stage graphs 120 python3 -m benchmarks.family_speed --realistic --device "$DEVICE" --scale "$SCALE" \
    --precisions bf16 --compile cudagraphs --rows l2x renn icnn_tinycnn textual
grep -E "^\||^torch|Error" "$OUT/graphs.log" 2>/dev/null | tail -n 30
stage compiled 150 python3 -m benchmarks.family_speed --realistic --device "$DEVICE" --scale "$SCALE" \
    --precisions bf16 --compile --rows icnn_tinycnn l2x icnn_resnet18 renn
grep -E "^\||^torch|Error" "$OUT/compiled.log" 2>/dev/null | tail -n 30
OMP_NUM_THREADS=2 stage suite 200 python3 -m pytest -v -p no:cacheprovider -n 16 --tb=short
grep -E "FAILED|ERROR| passed| failed" "$OUT/suite.log" 2>/dev/null | tail -n 30
stage balanced 60 python3 -m benchmarks.icnn_step_time --device "$DEVICE" --backbones tinycnn resnet18 \
    --category-assignment balanced
tail -n 12 "$OUT/balanced.log" 2>/dev/null

#!/usr/bin/env bash
# kvcl on NVIDIA's OpenCL driver, in ONE call on a lent GPU machine (see docs/devices.md):
#   the device list, `kvcl bench` (JSON + plot; then again with --sampling blocked), a decode
#   launch-layout sweep at the P7 shape,
#   then the device, reliability and ONNX test tiers on the GPU.
# The machine has numpy / onnxruntime / pytest / hypothesis / tqdm / matplotlib but no pyopencl
# and no network: the wheels travel in .whl/ (download command: docs/devices.md), and NVIDIA's
# OpenCL library is registered with pyopencl's bundled ICD loader through OCL_ICD_VENDORS.
# Usage, from the repository root:  bash tools/gpu_check.sh [OUTDIR]   (default $OUT or /tmp/kvcl-gpu)
# Knobs (environment): BENCH_S / SWEEP_S / TESTS_S stage time limits, SWEEP_DTYPES, SWEEP_ARGS
# (tools/decode_sweep.py options), TEST_PATHS.
set -u
out=${1:-${OUT:-/tmp/kvcl-gpu}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed (run: see docs/devices.md)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
lib=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu -name 'libnvidia-opencl.so*' 2>/dev/null | sort | head -1)
[ -n "$lib" ] || { echo "no libnvidia-opencl.so under /usr/local/nvidia"; exit 1; }
mkdir -p /tmp/icd && echo "$lib" > /tmp/icd/nvidia.icd
export OCL_ICD_VENDORS=/tmp/icd KVCL_DEVICE=${KVCL_DEVICE:-nvidia}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -m kvcl devices 2>&1 | tee -a "$out/gpu.txt"

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2; shift 2
    [ "$limit" = 0 ] && return 0   # a limit of 0 skips the stage
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    tail -n "${TAIL:-40}" "$out/$name.log"
}
stage bench "${BENCH_S:-180}" python3 -m kvcl bench --json "$out/bench-nvidia.json" --plot "$out/bench-nvidia.png"
# the same cases timed each on its own: does sampling in turn with the read change a GPU's figures?
stage bench_blocked "${BENCH_S:-180}" python3 -m kvcl bench --sampling blocked --json "$out/bench-nvidia-blocked.json"
stage sweep "${SWEEP_S:-120}" python3 tools/decode_sweep.py --dtype ${SWEEP_DTYPES:-fp32 fp16 int8} \
    ${SWEEP_ARGS:---local-size 64 128 --partition 256 512} --json "$out/sweep.json"
TAIL=15 stage tests "${TESTS_S:-330}" python3 -m pytest -q -ra -p no:cacheprovider \
    ${TEST_PATHS:-tests/device tests/reliability tests/onnx tests/host}
cat "$out/summary.txt"

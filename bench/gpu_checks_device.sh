#!/usr/bin/env bash
# One GPU window, run from the repository root on the lent machine after the wheels are staged in
# /tmp/site (shared/device/README.md): every test marked `gpu` that runs without TensorRT (image
# decoding on the GPU, the CUDA layer, ONNX Runtime --precision on its CUDA provider), then bench.gpu_precision. If the GPU image tests crash, they run again with
# decoded-image reuse off (SPARE_BYTES=0), which tells whether reuse is the cause. Full logs
# under $OUT; a short summary last.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
OUT=${OUT:-/tmp/gpu_checks_out}
mkdir -p "$OUT"
nvidia-smi -L > "$OUT/gpu.txt" 2>&1; nproc >> "$OUT/gpu.txt"
run_tests() {  # name, then pytest arguments
  local name=$1; shift
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -s -p no:cacheprovider -m gpu "$@" \
    > "$OUT/tests_$name.log" 2>&1
  local rc=$?
  echo "tests $name: rc=$rc $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/tests_$name.log" | tail -1)"
  grep -E "GPU vs CPU|slot pipeline|Fatal Python error" "$OUT/tests_$name.log" | head -4
  return $rc
}
run_tests images tests/workers/test_gpuimages.py
if [ $? -ge 128 ] || grep -q "Fatal Python error" "$OUT/tests_images.log"; then
  timeout 200 python3 -c "
import sys, pytest, workers.gpuimages as g
g.SPARE_BYTES = 0
sys.exit(pytest.main(['-q', '-s', '-p', 'no:cacheprovider', '-m', 'gpu', 'tests/workers/test_gpuimages.py']))
" > "$OUT/tests_images_noreuse.log" 2>&1
  echo "tests images, reuse off: rc=$? $(grep -E 'passed|failed' "$OUT/tests_images_noreuse.log" | tail -1)"
fi
run_tests cuda_precision tests/workers/test_cuda.py tests/backends/test_onnxruntime_precision.py \
  ${EXTRA_TESTS:-}
if python3 -c "import bench.gpu_precision" 2>/dev/null; then
  timeout "${PRECISION_TIMEOUT:-240}" python3 -m bench.gpu_precision --out "$OUT" \
    > "$OUT/gpu_precision_stdout.txt" 2>&1
  tail -12 "$OUT/gpu_precision_stdout.txt"
fi

#!/usr/bin/env bash
# One GPU window for issue 12, run from the repository root on the lent machine after the
# wheels are staged in /tmp/site (shared/device/README.md): the GPU tests of the image decoders
# and the slots, then bench.gpu_inputs. Full logs under $OUT; a short table last.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_inputs_out}
mkdir -p "$OUT"
TAG=${TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd 'A-Za-z0-9' | cut -c1-12)}
{
  nvidia-smi -L
  python3 -c "import onnxruntime, ray, simplejpeg, pyarrow; from nvidia import nvimgcodec; print('ort', onnxruntime.__version__, onnxruntime.get_available_providers(), 'ray', ray.__version__, 'simplejpeg', simplejpeg.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | grep -v -i -E 'nvjpeg2k|nvtiff|note: if'
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    tests/workers/test_gpuimages.py tests/workers/test_cuda.py 2>&1
} > "$OUT/gpu_tests_$TAG.log" 2>&1
grep -E "passed|failed|error|GPU vs CPU|slot pipeline" "$OUT/gpu_tests_$TAG.log" | tail -8
python3 -m bench.gpu_inputs --out "$OUT" --tag "$TAG" --budget "${BUDGET:-390}" "$@" > "$OUT/stdout_$TAG.txt" 2>&1
tail -12 "$OUT/stdout_$TAG.txt"

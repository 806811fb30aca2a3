#!/usr/bin/env bash
# The text benchmark's GPU run (issue 13), as one call on the lent machine, after staging ray
# and onnxruntime-gpu into /tmp/site: the GPU tests of the text path, then bench/text.py.
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TAG=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
nproc >> "$OUT/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/workers/test_cuda.py -m gpu \
    > "$OUT/gpu_tests.log" 2>&1
tail -5 "$OUT/gpu_tests.log"
timeout 440 python3 -m bench.text gpu --out "$OUT" --tag "$TAG" --tokenizer "${TOKENIZER:-}" \
    --seconds 60 --ray-data-timeout 100 --long-timeout 190 > "$OUT/bench_stdout.log" 2>&1
grep -v WARNING "$OUT/bench_stdout.log" | tail -40

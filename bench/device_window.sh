#!/usr/bin/env bash
# One short GPU window (one device call, under 600 s) after the wheels are staged in /tmp/site
# (shared/device/README.md): the text benchmark in a compact form, then bench.gpu_inputs with
# what is left of the window. Full logs under $OUT (8 files: what one call brings back); the
# two tables last.
#   WINDOW (default 570): seconds for the whole script; TEXT_SECONDS (default 45): the text
#   job's long phase; GPU_TESTS (default 0): first run tests/workers/test_gpuimages.py, each
#   test in its own process (a crash inside nvImageCodec then loses only its own report), for
#   at most GPU_TESTS seconds, into gpu_tests.log. PARTS (default "text,inputs"): which
#   benchmarks run; INPUTS_ARGS: more arguments for bench.gpu_inputs (--layouts, --variant,
#   --contention, ...) and TEXT_ARGS for bench.text (--variant), each parsed as shell words
#   (quotes group: --variant "TRT_BATCH_RUNNER_HELPER_NICE=0 --readers 8"); TEXT_TIMEOUT (default 330).
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device_window_out}
mkdir -p "$OUT"
began=$(date +%s)
WINDOW=${WINDOW:-570}
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cd 'A-Za-z0-9' | cut -c1-12)
{ nvidia-smi -L; nproc; } > "$OUT/gpu.txt" 2>&1
if [ "${GPU_TESTS:-0}" -gt 0 ]; then
  until=$(( $(date +%s) + GPU_TESTS ))
  for t in $(python3 -m pytest -q -p no:cacheprovider --collect-only tests/workers/test_gpuimages.py \
             2>/dev/null | grep '::'); do
    left_t=$(( until - $(date +%s) )); [ "$left_t" -gt 5 ] || break
    echo "== $t" >> "$OUT/gpu_tests.log"
    timeout "$left_t" python3 -m pytest -q -s -p no:cacheprovider -rA "$t" >> "$OUT/gpu_tests.log" 2>&1
    echo "== rc=$?" >> "$OUT/gpu_tests.log"
  done
  grep -c "== rc=0" "$OUT/gpu_tests.log" | sed 's/^/gpu tests with rc 0 (passed or skipped): /'
fi
PARTS=${PARTS:-text,inputs}
eval "inputs_args=(${INPUTS_ARGS:-})"
eval "text_args=(${TEXT_ARGS:-})"
if [[ $PARTS == *text* ]]; then
timeout "${TEXT_TIMEOUT:-330}" python3 -m bench.text gpu --out "$OUT" --tag "$TAG" --seconds "${TEXT_SECONDS:-45}" \
  --engine-seconds 5 --ray-data-timeout 100 --long-timeout 150 "${text_args[@]}" \
  > "$OUT/text_stdout.log" 2>&1
echo "text: rc=$?"
fi
left=$(( WINDOW - ($(date +%s) - began) - 15 ))
echo "gpu_inputs budget: $left s"
if [[ $PARTS == *inputs* ]] && [ "$left" -gt 90 ]; then
  timeout "$((left + 10))" python3 -m bench.gpu_inputs --out "$OUT" --tag "$TAG" --budget "$left" \
    --seconds 30 --repeats 2 "${inputs_args[@]}" > "$OUT/gpu_inputs_stdout.txt" 2>&1
  echo "gpu_inputs: rc=$?"
fi
# A call brings back at most 8 files: fold the stdout logs into the benchmarks' own logs.
for f in "$OUT"/text_gpu_*.log; do cat "$OUT/gpu.txt" "$OUT/text_stdout.log" >> "$f"; done
tail -8 "$OUT/gpu_inputs_stdout.txt" 2>/dev/null > "$OUT/gpu_inputs_tail.txt"
for f in "$OUT"/gpu_inputs_*_jobs.log; do cat "$OUT/gpu_inputs_stdout.txt" >> "$f"; done
rm -f "$OUT/gpu.txt" "$OUT/text_stdout.log" "$OUT/gpu_inputs_stdout.txt"
cat "$OUT"/text_gpu_*.md 2>/dev/null
cat "$OUT/gpu_inputs_tail.txt" 2>/dev/null && rm -f "$OUT/gpu_inputs_tail.txt"

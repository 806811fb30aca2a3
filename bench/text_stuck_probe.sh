#!/usr/bin/env bash
# Diagnose a text job that does not finish on the GPU machine: runs bench.text gpu in the
# background and, while its first job runs, dumps every thread of the job's processes
# (py-spy where it may attach, else faulthandler via SIGUSR1 into Ray's worker logs).
# With RECORD_AT (seconds after start; RECORD_SECONDS long, default 15) it also samples each
# actor with py-spy record: once only the thread holding the GIL (--gil: which Python work the
# actor's threads queue behind) and once every thread, and prints the top leaf frames of each.
# One tarball under $OUT. Needs /tmp/site staged with py-spy.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PATH="/tmp/site/bin:$PATH"
OUT=${OUT:-/tmp/text_probe_out}; mkdir -p "$OUT/probe"
timeout "${PROBE_SECONDS:-150}" python3 -m bench.text gpu --out "$OUT/probe" --tag probe \
  --seconds 20 --engine-seconds 3 --ray-data-timeout 5 --long-timeout 60 \
  > "$OUT/probe/text_stdout.log" 2>&1 &
if [ -n "${RECORD_AT:-}" ]; then
  ( sleep "$RECORD_AT"
    for pid in $(pgrep -f "ShardWorker"); do
      py-spy record --pid "$pid" --duration "${RECORD_SECONDS:-15}" --rate 200 --gil \
        --format raw -o "$OUT/probe/gil_$pid.txt" > /dev/null 2>&1 &
      py-spy record --pid "$pid" --duration "${RECORD_SECONDS:-15}" --rate 100 --threads \
        --format raw -o "$OUT/probe/all_$pid.txt" > /dev/null 2>&1 &
    done
    wait
    for f in "$OUT"/probe/gil_*.txt "$OUT"/probe/all_*.txt; do
      [ -f "$f" ] || continue
      echo "== top leaf frames of $(basename "$f") (samples)"
      # raw lines: "frame;frame;...;leaf count"
      awk '{n=$NF; $NF=""; k=split($0, f, ";"); leaf=f[k]; sub(/ +$/, "", leaf); c[leaf]+=n}
           END {for (l in c) print c[l], l}' "$f" | sort -rn | head -25
    done > "$OUT/probe/record_top.txt" ) &
fi
for at in ${DUMP_AT:-75 105}; do
  sleep $(( at - ${last:-0} )); last=$at
  for pid in $(pgrep -f "ShardWorker|jobs.enrich"); do
    { echo "== t=$at pid $pid: $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-200)";
      py-spy dump --pid "$pid" 2>&1 | head -150; } >> "$OUT/probe/stacks.txt"
  done
  # Only actors handle SIGUSR1 (workers/actor.py); it would end the driver.
  for pid in $(pgrep -f "ShardWorker"); do kill -USR1 "$pid" 2>/dev/null; done
done
wait
pkill -f "jobs.enrich" 2>/dev/null; ray stop --force > /dev/null 2>&1
cp -r /tmp/ray/session_latest/logs "$OUT/probe/ray_logs" 2>/dev/null
tar czf "$OUT/text_probe.tgz" -C "$OUT" probe && rm -rf "$OUT/probe"
ls -la "$OUT"

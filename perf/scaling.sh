#!/usr/bin/env bash
# Thread scaling of the file → null replay of `peak` events: one data set,
# each thread count in THREADS, REPEAT runs each, no build step (pass a built
# binary), so it can run on a lent many-core machine as it is.
#
#   EXPMON=target/release/expmon OUT=/tmp/scaling perf/scaling.sh
#   EVENTS=5000000 THREADS="1 2 4 8 16" REPEAT=2
set -euo pipefail
cd "$(dirname "$0")/.."

EXPMON=${EXPMON:-target/release/expmon}
EVENTS=${EVENTS:-5000000}
THREADS=${THREADS:-"1 2 4 8 16"}
REPEAT=${REPEAT:-2}
OUT=${OUT:-target/perf/scaling}
mkdir -p "$OUT"
data=$OUT/peak-$EVENTS.jsonl
config=$OUT/peak.toml
report=$OUT/README.md

"$EXPMON" gen --profile peak --events "$EVENTS" --seed 1 --out "file:$data" --write-config "$config" 2> "$OUT/gen.log"
{
  echo "# Thread scaling: $EVENTS peak events, file → null"
  echo
  echo "- binary: $("$EXPMON" --version) ($(sha256sum "$EXPMON" | cut -c1-16))"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  echo "- memory: $(grep MemTotal /proc/meminfo | awk '{printf "%.0f GiB", $2/1048576}')"
  echo "- data: \`expmon gen --profile peak --events $EVENTS --seed 1\` ($(du -h "$data" | cut -f1)); $(cat "$OUT/gen.log")"
  echo
  echo "| shard threads | run | events/s | wall s | peak RSS |"
  echo "|---|---|---|---|---|"
} > "$report"
for t in $THREADS; do
  for r in $(seq "$REPEAT"); do
    out=$("$EXPMON" run --config "$config" --source "file:$data" --sink null --threads "$t" --status false 2>&1)
    echo "$out" > "$OUT/run-t$t-r$r.log"
    rate=$(echo "$out" | grep -o '([0-9]* events/s' | tr -dc '0-9')
    wall=$(echo "$out" | grep -o 'events in [0-9.]*s' | grep -o '[0-9.]*')
    rss=$(echo "$out" | grep -o 'peak RSS [0-9.]* MiB' | grep -o '[0-9.]* MiB')
    echo "| $t | $r | $rate | $wall | $rss |" >> "$report"
    echo "threads=$t run=$r: $rate events/s"
  done
done
rm -f "$data"
echo "report: $report"

#!/usr/bin/env bash
# Kafka end to end: pre-fill an 8-partition topic on a local Tansu broker with
# `peak` events (`expmon gen --out kafka://…`), then read it back through
# `expmon run --source kafka://…?until_end=true` to the null sink, and note
# how much CPU the broker used meanwhile. Saves the report under perf/runs/.
#
#   perf/kafka-replay.sh                      # 2,000,000 events, threads "2"
#   EVENTS=5000000 THREADS="1 2" perf/kafka-replay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/lib.sh

EVENTS=${EVENTS:-2000000}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-2}
config=target/perf/peak.toml
cargo build --release --quiet
mkdir -p target/perf
start_tansu
trap 'kill $broker 2>/dev/null || true' EXIT
sleep 1

report=$(perf_report kafka)
topic="kafka://127.0.0.1:$port/peak?partitions=8"
fill_out=$(./target/release/expmon gen --profile peak --events "$EVENTS" --seed 1 --out "$topic" \
  --write-config "$config" 2>&1)
{
  echo "# Kafka replay: $EVENTS peak events from an 8-partition topic to the null sink"
  echo
  perf_facts
  echo "- broker: $("$tansu" --version 2>/dev/null || echo tansu) (memory storage) on the same machine"
  echo "- fill: \`expmon gen --profile peak --events $EVENTS --seed 1 --out kafka://…/peak?partitions=8\`:"
  echo "  $fill_out"
  echo
} > "$report"

run=0
for t in $THREADS; do
  for r in $(seq "$REPEAT"); do
    run=$((run + 1))
    # A new group per run reads the topic from the start.
    cmd="./target/release/expmon run --config $config --sink null --threads $t --status false"
    # Tansu answers a fetch only after fetch.wait.max.ms: keep it short here.
    source="kafka://127.0.0.1:$port/peak?group=bench-$run&until_end=true&session.timeout.ms=6000&fetch.wait.max.ms=5"
    cpu0=$(cpu_of $broker)
    start=$(date +%s.%N)
    out=$($cmd --source "$source" 2>&1 | grep -v ' assigned$')
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    cpu1=$(cpu_of $broker)
    rate=$(echo "$out" | grep -o '[0-9]* events/s from then on' | tr -dc '0-9')
    share=$(echo "scale=2; ($cpu1 - $cpu0) / $wall" | bc)
    line="threads=$t run=$r: $rate events/s after the group join; broker used $(echo "$cpu1 - $cpu0" | bc) CPU s in $wall s (${share} cores)"
    echo "$line"
    perf_section "$report" "$line" "$cmd --source '$source'" "$out"
  done
done
echo "report: $report"

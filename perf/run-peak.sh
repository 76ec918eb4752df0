#!/usr/bin/env bash
# End-to-end load run: pre-generate a `peak` data set, replay it through
# `expmon run` to the null sink at each thread count, and save what happened
# (command, versions, CPU, commit, summaries) under perf/runs/.
#
#   perf/run-peak.sh                 # 5,000,000 events, threads "1 2"
#   EVENTS=20000000 THREADS="1 2 4 8 16" perf/run-peak.sh
#   FLAME=1 perf/run-peak.sh         # also record a steady-state flamegraph
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/lib.sh

EVENTS=${EVENTS:-5000000}
THREADS=${THREADS:-"1 2"}
REPEAT=${REPEAT:-3}
data=target/perf/peak-$EVENTS.jsonl
config=target/perf/peak.toml

cargo build --release --quiet
mkdir -p target/perf
if [ ! -s "$data" ]; then
  ./target/release/expmon gen --profile peak --events "$EVENTS" --seed 1 --out "file:$data" --write-config "$config"
fi

commit=$(perf_commit)
report=$(perf_report)
{
  echo "# peak replay, $EVENTS events"
  echo
  perf_facts
  echo "- data: \`expmon gen --profile peak --events $EVENTS --seed 1\` ($(du -h "$data" | cut -f1))"
  echo
} > "$report"

for t in $THREADS; do
  for r in $(seq "$REPEAT"); do
    cmd="./target/release/expmon run --config $config --source file:$data --sink null --threads $t"
    out=$($cmd 2>&1)
    rate=$(echo "$out" | grep -o '([0-9]* events/s' | tr -dc '0-9')
    echo "threads=$t run=$r: $rate events/s"
    perf_section "$report" "threads=$t, run $r: $rate events/s" "$cmd" "$out"
  done
done

if [ "${FLAME:-0}" = 1 ]; then
  command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
  mkdir -p flamegraphs
  svg=flamegraphs/peak-threads2-$commit.svg
  cmd="./target/release/expmon run --config $config --source file:$data --sink null --threads 2"
  $cmd 2>/dev/null &
  pid=$!
  sleep 1   # skip start-up: config parse, first allocations
  perf record -e cpu-clock -F 99 --call-graph dwarf -p "$pid" -o target/perf/perf.data -- sleep 4 2>/dev/null || true
  wait "$pid" || true
  perf script -i target/perf/perf.data 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title "expmon peak replay, 2 shard threads ($commit)" > "$svg"
  {
    echo "## flamegraph"
    echo
    echo "\`$svg\`: \`$cmd\`, sampled 1 s after start for 4 s with"
    echo "\`perf record -e cpu-clock -F 99 --call-graph dwarf -p PID\`, folded with inferno."
  } >> "$report"
  echo "flamegraph: $svg"
fi
echo "report: $report"

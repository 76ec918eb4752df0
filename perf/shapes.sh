#!/usr/bin/env bash
# The engine on every traffic shape (issue 13): pre-generate each shape with
# `expmon gen`, replay it file → null at 2 shard threads, and save what
# happened (command, versions, CPU, commit, summaries) under perf/runs/.
#
# Shapes (sizes by environment variable):
#   peak          the `peak` profile as it is (60,000 events/s of event time)
#   assigned-5.8k every event carries its assignments, 5,800 events/s of event time
#   assigned-550  the same at 550 events/s: ASSIGNED_550_EVENTS=1980000 is 1 hour
#   sparse-1h     every event assigned, SPARSE_RATE events/s, 1 hour
#   sparse-4h     the same, 4 hours (4× the events): memory should equal 1 hour's
#
# Each run reports events/s (the summary), events per CPU-second (user+sys
# of /usr/bin/time), peak RSS (its max resident set) and the peak points the
# writer held (the summary).
#
#   perf/shapes.sh
#   EVENTS=2000000 SPARSE_RATE=138 perf/shapes.sh
#   EXPMON=/tmp/before/release/expmon perf/shapes.sh   # another build, same data
#   RUNS=5 perf/shapes.sh    # runs per shape (default 3): the table gives the median run
#                            # by events/s, and every run's events/s in its last column
#   FLAME=1 perf/shapes.sh   # also one flamegraph per shape: flamegraphs/<shape>-<commit>.svg
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/lib.sh

EVENTS=${EVENTS:-1000000}
ASSIGNED_550_EVENTS=${ASSIGNED_550_EVENTS:-1980000}
SPARSE_RATE=${SPARSE_RATE:-125}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
EXPMON=${EXPMON:-}
sparse_1h=$((SPARSE_RATE * 3600))

if [ -z "$EXPMON" ]; then
  cargo build --release --quiet
  EXPMON=./target/release/expmon
fi
mkdir -p target/perf
config=target/perf/peak.toml

# name | events | extra gen flags
shapes=(
  "peak|$EVENTS|"
  "assigned-5.8k|$EVENTS|--assign-every 1 --event-rate 5800"
  "assigned-550|$ASSIGNED_550_EVENTS|--assign-every 1 --event-rate 550"
  "sparse-1h|$sparse_1h|--assign-every 1 --event-rate $SPARSE_RATE"
  "sparse-4h|$((4 * sparse_1h))|--assign-every 1 --event-rate $SPARSE_RATE"
)

report=$(perf_report shapes)
{
  echo "# traffic shapes, file → null, $THREADS shard threads"
  echo
  perf_facts
  echo "- binary: \`$EXPMON\` ($("$EXPMON" --version))"
  echo
  echo "Each shape ran $RUNS times; a row is its median run by events/s, the last column every run's events/s."
  echo
  echo "| shape | events | event time | events/s | events per CPU-second | peak RSS | peak points held | every run (events/s) |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$report"
sections=$(mktemp)

for s in "${shapes[@]}"; do
  IFS='|' read -r name events flags <<< "$s"
  data=target/perf/shape-$name-$events.jsonl
  gen="$EXPMON gen --profile peak --events $events --seed 1 $flags --out file:$data --write-config $config"
  if [ ! -s "$data" ]; then
    # shellcheck disable=SC2086
    $gen 2>/dev/null
  fi
  cmd="$EXPMON run --config $config --source file:$data --sink null --threads $THREADS --status false --metrics-addr off"
  # RUNS runs; keep the median one (by events/s) and every rate.
  runs=()
  rates=()
  for _ in $(seq "$RUNS"); do
    # shellcheck disable=SC2086
    one=$(/usr/bin/time -f 'time: user %U s, sys %S s, max RSS %M KiB' $cmd 2>&1)
    runs+=("$(echo "$one" | grep -o '([0-9]* events/s' | tr -dc '0-9') $(printf '%s' "$one" | base64 -w0)")
    rates+=("$(echo "$one" | grep -o '([0-9]* events/s' | tr -dc '0-9')")
  done
  median=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n "$(((RUNS + 1) / 2))p")
  out=$(echo "${median#* }" | base64 -d)
  every=$(IFS=,; echo "${rates[*]}" | sed 's/,/, /g')
  rate=$(echo "$out" | grep -o '([0-9]* events/s' | tr -dc '0-9')
  cpu=$(echo "$out" | sed -n 's/^time: user \([0-9.]*\) s, sys \([0-9.]*\) s.*/\1 \2/p' | awk '{print $1 + $2}')
  per_cpu=$(awk -v n="$events" -v c="$cpu" 'BEGIN { printf "%.0f", n / c }')
  rss_kib=$(echo "$out" | sed -n 's/.*max RSS \([0-9]*\) KiB/\1/p')
  rss=$(awk -v k="$rss_kib" 'BEGIN { printf "%.0f MiB", k / 1024 }')
  held=$(echo "$out" | grep -o 'peak points held [0-9]*' | tr -dc '0-9')
  # Event time from the first to the last line's ts (sed, not head: no SIGPIPE).
  first=$(head -n 100 "$data" | grep -o '"ts":[0-9]*' | sed -n 1p | tr -dc '0-9' || true)
  last=$(tail -n 100 "$data" | grep -o '"ts":[0-9]*' | sed -n '$p' | tr -dc '0-9' || true)
  minutes=$(awk -v a="$first" -v b="$last" 'BEGIN { printf "%.1f min", (b - a) / 60000 }')
  line="| $name | $events | $minutes | $rate | $per_cpu | $rss | $held | $every |"
  echo "$line"
  echo "$line" >> "$report"
  perf_section "$sections" "$name: $rate events/s (median of $RUNS: $every), $per_cpu events per CPU-second, $rss, $held points held" \
    "$gen; $cmd" "$out"
  if [ "${FLAME:-0}" = 1 ]; then
    # A second run of the same command under the sampler (the timed run
    # above is not slowed by it): the whole run, every thread.
    command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
    mkdir -p flamegraphs
    svg=flamegraphs/$name-threads$THREADS-$(git rev-parse --short HEAD).svg
    # shellcheck disable=SC2086
    perf record -e cpu-clock -F 249 --call-graph dwarf,16384 -o target/perf/perf.data -- $cmd >/dev/null 2>&1 || true
    perf script -i target/perf/perf.data 2>/dev/null | inferno-collapse-perf \
      | inferno-flamegraph --title "expmon $name, file → null, $THREADS shard threads" > "$svg"
    rm -f target/perf/perf.data
    echo "flamegraph: $svg"
    {
      echo "Flamegraph: \`$svg\` (\`perf record -e cpu-clock -F 249 --call-graph dwarf\` over a second run of the"
      echo "same command, folded with inferno)."
      echo
    } >> "$sections"
  fi
done
echo >> "$report"
cat "$sections" >> "$report"
rm -f "$sections"
echo "report: $report"

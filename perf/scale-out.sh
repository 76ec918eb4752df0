#!/usr/bin/env bash
# (The scale-out runs need --status true: their 10-s lines tell when they caught up.)
# Scale-out against the single-instance path: pre-fill an 8-partition topic on
# a local Tansu broker with `peak` events, read it once with one ordinary
# instance (`until_end=true`, null sink), then with 1, 2 and 3 `--scale-out`
# instances in a fresh group each (null sink), until every instance reports
# stage 1 caught up (input lag 0) and stage 2 caught up (delta lag no more
# than one commit marker per delta partition and instance). Reports, per run, the events
# per CPU-second of all instances together (they share this machine's cores),
# the broker's CPU, the internal topics' bytes per input event (payloads
# and keys, from the instances' last lines), and the bytes the broker
# received per input event on the connections open when the instances have
# caught up (TCP bytes_received from ss: after any compression; mostly the
# internal topics' produce requests).
# Saves the report under perf/runs/.
#
#   perf/scale-out.sh                         # 300,000 events, 1 2 3 instances
#   EVENTS=1000000 INSTANCES="1 3" perf/scale-out.sh
#   SNAPSHOT_EVERY=1 EXTRA='compression.type=lz4' perf/scale-out.sh   # variants
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/lib.sh

EVENTS=${EVENTS:-300000}
INSTANCES=${INSTANCES:-1 2 3}
TRIGGER=${TRIGGER:-2s}
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-5}
EXTRA=${EXTRA:-}
config=target/perf/scale-out.toml  # its own: target/perf/peak.toml is the shapes' (perf/shapes.sh)
cargo build --release --quiet
mkdir -p target/perf
start_tansu
pids=()
trap 'kill $broker "${pids[@]}" 2>/dev/null || true' EXIT
sleep 1

# Bytes the broker received on its open connections so far.
read_of() { ss -tin state established "( sport = :$port )" | { grep -o 'bytes_received:[0-9]*' || true; } | awk -F: '{s += $2} END {print s + 0}'; }

report=$(perf_report scale-out)
topic="kafka://127.0.0.1:$port/peak?partitions=8"
fill_out=$(./target/release/expmon gen --profile peak --events "$EVENTS" --seed 1 --out "$topic" \
  --write-config "$config" 2>&1)
{
  echo "# Scale-out: $EVENTS peak events from an 8-partition topic, 1 instance against 1–3 --scale-out instances"
  echo
  perf_facts
  echo "- broker: $("$tansu" --version 2>/dev/null || echo tansu) (memory storage) on the same machine"
  echo "- fill: \`expmon gen --profile peak --events $EVENTS --seed 1 --out kafka://…/peak?partitions=8\`:"
  echo "  $fill_out"
  echo "- every run: null sink, trigger $TRIGGER, a fresh consumer group; scale-out runs: --snapshot-every $SNAPSHOT_EVERY${EXTRA:+, source settings $EXTRA}"
  echo
} > "$report"

options="session.timeout.ms=6000&fetch.wait.max.ms=5"
# The single-instance path, one shard thread (the scale-out stages are one thread each).
cmd="./target/release/expmon run --config $config --sink null --threads 1 --status false --trigger $TRIGGER --metrics-addr off"
source="kafka://127.0.0.1:$port/peak?group=single&until_end=true&$options"
b0=$(cpu_of $broker)
r0=$(read_of)
out=$(/usr/bin/time -f 'cpu %U %S' $cmd --source "$source" 2>&1 | grep -v ' assigned$')
b1=$(cpu_of $broker)
r1=$(read_of)
cpu=$(echo "$out" | awk '/^cpu /{print $2 + $3}')
line="single instance: $EVENTS events in $cpu CPU s: $(echo "$EVENTS / $cpu" | bc) events per CPU-second; broker $(echo "$b1 - $b0" | bc) CPU s, received $(echo "($r1 - $r0) / $EVENTS" | bc) bytes per input event"
echo "$line"
perf_section "$report" "$line" "$cmd --source '$source'" "$out"

for n in $INSTANCES; do
  group="scale-$n"
  source="kafka://127.0.0.1:$port/peak?group=$group&$options${EXTRA:+&$EXTRA}"
  cmd="./target/release/expmon run --scale-out --config $config --sink null --status true --trigger $TRIGGER --metrics-addr off --snapshot-every $SNAPSHOT_EVERY"
  pids=()
  b0=$(cpu_of $broker)
  r0=$(read_of)
  start=$(date +%s.%N)
  for i in $(seq "$n"); do
    $cmd --instance "i$i" --source "$source" 2> "target/perf/scale-$n-$i.log" &
    pids+=($!)
  done
  # Caught up: every instance's last status lines say so (and they hold every partition).
  while true; do
    sleep 2
    for i in $(seq "$n"); do
      if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
        echo "instance i$i of $n stopped:"; tail -5 "target/perf/scale-$n-$i.log"; exit 1
      fi
    done
    done_n=0
    tasks1=0
    for i in $(seq "$n"); do
      log="target/perf/scale-$n-$i.log"
      l1=$(grep 'stage 1: .* tasks' "$log" | tail -1 || true)
      l2=$(grep 'stage 2: .* tasks' "$log" | tail -1 || true)
      [ -n "$l1" ] && [ -n "$l2" ] || continue
      t1=$(echo "$l1" | grep -o '[0-9]* tasks' | tr -dc 0-9)
      t2=$(echo "$l2" | grep -o '[0-9]* tasks' | tr -dc 0-9)
      lag1=$(echo "$l1" | grep -o 'input lag [0-9]*' | tr -dc 0-9)
      lag2=$(echo "$l2" | grep -o 'delta lag [0-9]*' | tr -dc 0-9)
      tasks1=$((tasks1 + t1))
      # Each stage-1 instance's last transaction may leave a commit marker per partition.
      if [ "$lag1" = 0 ] && [ "$lag2" -le $((t2 * n)) ]; then done_n=$((done_n + 1)); fi
    done
    [ "$done_n" = "$n" ] && [ "$tasks1" = 8 ] && break
  done
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  cpu=0
  for p in "${pids[@]}"; do cpu=$(echo "$cpu + $(cpu_of "$p")" | bc); done
  b1=$(cpu_of $broker)
  r1=$(read_of)
  for p in "${pids[@]}"; do kill -TERM "$p"; done
  for p in "${pids[@]}"; do wait "$p" || true; done
  out=""
  bytes=0
  for i in $(seq "$n"); do
    last=$(grep '^scale-out: stage 1 read' "target/perf/scale-$n-$i.log" || true)
    out="$out$last"$'\n'
    for what in 'delta bytes' 'snapshot bytes' 'changelog bytes'; do
      b=$(echo "$last" | grep -o "[0-9]* $what" | tr -dc 0-9)
      bytes=$((bytes + ${b:-0}))
    done
  done
  line="$n scale-out instance(s): $EVENTS events in $cpu CPU s: $(echo "$EVENTS / $cpu" | bc) events per CPU-second (caught up within $wall s, checked every 10 s); internal topics $(echo "$bytes / $EVENTS" | bc) bytes per input event; broker $(echo "$b1 - $b0" | bc) CPU s, received $(echo "($r1 - $r0) / $EVENTS" | bc) bytes per input event"
  echo "$line"
  perf_section "$report" "$line" "$cmd --instance iN --source '$source'   # N = 1..$n" "$out"
done
echo "report: $report"

#!/usr/bin/env bash
# Router-thread CPU per event: perf cpu-clock samples at 999 Hz per thread, two binaries interleaved.
cd /work/wt/h13r
for rep in 1 2; do
for shape in peak-1000000 assigned-550-1980000 sparse-1h-450000; do
  n=${shape##*-}
  for bin in /work/main/target/before/expmon ./target/release/expmon; do
    perf record -q -e cpu-clock -F 999 -o /tmp/h13r-p.data -- $bin run --config target/perf/peak.toml --source file:target/perf/shape-$shape.jsonl --sink null --threads 2 --status false --metrics-addr off >/dev/null 2>&1
    r=$(perf report -q -i /tmp/h13r-p.data --sort comm -F comm,sample 2>/dev/null | awk '$1=="expmon"{print $2}')
    all=$(perf report -q -i /tmp/h13r-p.data --sort comm -F comm,sample 2>/dev/null | awk '{s+=$2} END{print s}')
    echo "$rep $shape $bin router_samples=$r all_samples=$all router_us_per_event=$(awk -v r=$r -v n=$n 'BEGIN{printf "%.3f", r*1001.0/n}') $(cut -d' ' -f1 /proc/loadavg)"
  done
done
done

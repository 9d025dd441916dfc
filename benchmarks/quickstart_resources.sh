#!/usr/bin/env bash
# Quickstart wall time and peak RSS, from a cold feature cache (encoding included) and warm.
#   bash benchmarks/quickstart_resources.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
measure() {  # label, command...
  local label=$1; shift
  /usr/bin/time -v "$@" > "$tmp/out.txt" 2> "$tmp/time.txt"
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$tmp/time.txt" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$tmp/time.txt" | awk '{print $NF}')
  printf "%-34s wall %8s   peak RSS %6.0f MB\n" "$label" "$wall" "$(echo "$rss / 1024" | bc -l)"
}
export EDGE_GLASS_CACHE="$tmp/cache"   # cold: nothing encoded yet (converted weights too)
measure "train, cold cache (encodes all)" edge-glass train configs/quickstart.yaml --out "$tmp/run1" --no-progress
measure "eval (test split)" edge-glass eval "$tmp/run1" --no-progress
measure "train, warm cache" edge-glass train configs/quickstart.yaml --out "$tmp/run2" --no-progress
grep -A4 "dim  direction" "$tmp/out.txt" | head -3 || true
cat "$tmp/run1/summary.json"

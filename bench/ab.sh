#!/usr/bin/env bash
# Cache-hit throughput of the working tree against a revision, both under
# load at the same moment (one wrk each, same connections, same upstream):
# a drift in the machine's speed, which moves rounds run one after another
# by more than a small change does, reaches both alike. Prints each round's
# rates and ratio, and the ratio of the means and the median of the rounds.
# The same revision on both sides gives this machine's noise.
# Usage: bash bench/ab.sh revision [rounds] [seconds-per-round]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rev=${1:?usage: bash bench/ab.sh revision [rounds] [seconds]}
rounds=${2:-8}
secs=${3:-4}
conns=${CONNS:-32}

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -d "$tmp/rev" ]; then git -C "$root" worktree remove --force "$tmp/rev" >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

git worktree add -q --detach "$tmp/rev" "$rev"
(cd "$tmp/rev" && go build -o "$tmp/old" ./cmd/cacheproxy)
go build -o "$tmp/new" ./cmd/cacheproxy
go build -o "$tmp/upstream" ./bench/upstream

. bench/hitlib.sh
"$tmp/upstream" >"$tmp/up.addr" & pids+=($!)
up="http://$(addr "$tmp/up.addr")"
declare -A url
for side in old new; do
  start_proxy "$tmp/$side" "$tmp/$side.log" "$up"
  url[$side]="http://$proxy$path"
done

printf '%-6s %12s %12s %8s\n' round "$rev" working ratio
for r in $(seq "$rounds"); do
  wrk -t1 -c"$conns" -d"${secs}s" -H "Authorization: $auth" "${url[old]}" >"$tmp/wrk.old" & w1=$!
  wrk -t1 -c"$conns" -d"${secs}s" -H "Authorization: $auth" "${url[new]}" >"$tmp/wrk.new" & w2=$!
  wait "$w1" "$w2"
  o=$(awk '/Requests\/sec/ {print $2}' "$tmp/wrk.old")
  n=$(awk '/Requests\/sec/ {print $2}' "$tmp/wrk.new")
  echo "$o $n" >>"$tmp/results"
  awk -v r="$r" -v o="$o" -v n="$n" 'BEGIN {printf "%-6s %12s %12s %8.3f\n", r, o, n, n/o}'
done
# The ratio of the mean rates, and the median and range of each round's.
ratios=$(awk '{printf "%.3f\n", $2/$1}' "$tmp/results" | sort -n | tr '\n' ' ')
awk -v rev="$rev" -v ratios="$ratios" '{o+=$1; n+=$2}
  END {k=split(ratios, q, " "); m=(k%2) ? q[(k+1)/2] : (q[k/2]+q[k/2+1])/2;
  printf "RESULT\thit over loopback, both under load at once: working tree / %s req/s\t%.0f / %.0f = %.3f (per round: median %.3f, %s-%s)\t-\t-\n", rev, n/NR, o/NR, n/o, m, q[1], q[k]}' "$tmp/results"

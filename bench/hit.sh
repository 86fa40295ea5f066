#!/usr/bin/env bash
# Cache-hit throughput over loopback: cacheproxy serving a hit against a bare
# net/http server returning the same bytes, same load tool (wrk), same
# connections, alternated in one run (in alternating order). Prints a table, the ratio of the mean
# rates, and the median and range of each round's ratio (this machine is
# shared: rounds vary, pairs of adjacent runs vary less).
# Usage: bash bench/hit.sh [seconds-per-round] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
rounds=${2:-10}
conns=${CONNS:-32}

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

go build -o "$tmp/cacheproxy" ./cmd/cacheproxy
go build -o "$tmp/upstream" ./bench/upstream
go build -o "$tmp/bare" ./bench/bare

# addr FILE: wait (bounded) for a process to print its address on line 1.
addr() {
  for _ in $(seq 100); do
    [ -s "$1" ] && { head -1 "$1"; return; }
    sleep 0.1
  done
  echo "no address in $1" >&2; exit 1
}

"$tmp/upstream" >"$tmp/up.addr" & pids+=($!)
up="http://$(addr "$tmp/up.addr")"

CACHEPROXY_LISTEN=127.0.0.1:0 CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0 \
CACHEPROXY_UPSTREAMS_CONVERSATIONS_URL="$up" CACHEPROXY_UPSTREAMS_PROXY_URL="$up" \
CACHEPROXY_CACHE_TTL=1h \
  "$tmp/cacheproxy" >"$tmp/proxy.log" & pids+=($!)
for _ in $(seq 100); do grep -q '"listen"' "$tmp/proxy.log" 2>/dev/null && break; sleep 0.1; done
proxy=$(grep -o '"listen":"[^"]*"' "$tmp/proxy.log" | head -1 | cut -d'"' -f4)

auth="Basic $(printf '%s:%s' AC00000000000000000000000000000001 benchtoken | base64 -w0)"
path=/v1/Conversations/CH00000000000000000000000000000001/Participants/MB00000000000000000000000000000001
curl -fsS -o /dev/null -H "Authorization: $auth" "http://$proxy$path"   # miss: fills the cache
status=$(curl -fsS -o /dev/null -D - -H "Authorization: $auth" "http://$proxy$path" | grep -i '^cache-status' | tr -d '\r')
echo "$status" | grep -q 'hit' || { echo "not a hit: $status" >&2; exit 1; }

"$tmp/bare" -from "http://$proxy$path" -auth "$auth" >"$tmp/bare.addr" & pids+=($!)
bare=$(addr "$tmp/bare.addr")

run() { # name url
  wrk -t1 -c"$conns" -d"${secs}s" --latency -H "Authorization: $auth" "$2" >"$tmp/wrk.out"
  rps=$(awk '/Requests\/sec/ {print $2}' "$tmp/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$tmp/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$tmp/wrk.out")
  printf '%-12s %12s %10s %10s\n' "$1" "$rps" "$p50" "$p99"
  echo "$1 $rps" >>"$tmp/results"
}

printf '%-12s %12s %10s %10s\n' server req/s p50 p99
# Rounds alternate the order (bare first, then cacheproxy first) so that a
# drift in the machine's speed favours neither.
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then
    run bare "http://$bare$path"; run cacheproxy "http://$proxy$path"
  else
    run cacheproxy "http://$proxy$path"; run bare "http://$bare$path"
  fi
done
# Each round's cacheproxy rate over its bare rate, sorted.
ratios=$(awk '{v[$1]=$2; if (NR%2==0) printf "%.3f\n", v["cacheproxy"]/v["bare"]}' "$tmp/results" | sort -n | tr '\n' ' ')
awk -v ratios="$ratios" '{sum[$1]+=$2; n[$1]++}
  END {b=sum["bare"]/n["bare"]; c=sum["cacheproxy"]/n["cacheproxy"];
  k=split(ratios, r, " "); med=(k%2) ? r[(k+1)/2] : (r[k/2]+r[k/2+1])/2;
  printf "mean req/s: bare %.0f, cacheproxy %.0f, ratio %.3f; per round: median %.3f, range %s-%s\n", b, c, c/b, med, r[1], r[k];
  printf "RESULT\thit over loopback: cacheproxy / bare net/http req/s\t%.0f / %.0f = %.3f (per round: median %.3f, %s-%s)\t>= 0.90\t%s\n", c, b, c/b, med, r[1], r[k], (c/b >= 0.9) ? "true" : "false"}' "$tmp/results"
echo "RESULT	hit over loopback: cacheproxy p50 / p99 (last round)	$p50 / $p99	-	-"
echo "($(nproc) cores, $conns connections, wrk -t1, ${secs}s x $rounds rounds; proxy logs one JSON line per request to a file)"

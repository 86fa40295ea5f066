#!/usr/bin/env bash
# Every benchmark in one run, on loopback: builds the proxy, starts fake
# upstreams, runs the loads, and prints each benchmark's output, then one
# table of results against the targets. Takes about two minutes.
# Usage: bash bench/all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT

echo "== hit throughput (bench/hit.sh)";          bash bench/hit.sh        | tee -a "$out"
echo "== stampede (bench/stampede)";              go run ./bench/stampede | tee -a "$out"
echo "== upstream protection (bench/limits)";     go run ./bench/limits   | tee -a "$out"
echo "== fleet (bench/fleet)";                    go run ./bench/fleet    | tee -a "$out"
echo "== memory (bench/memory)";                  go run ./bench/memory   | tee -a "$out"

echo
echo "== results ($(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(go env GOVERSION))"
{
  printf 'measure\tresult\ttarget\tmet\n'
  grep '^RESULT' "$out" | cut -f2-
} | column -t -s $'\t'

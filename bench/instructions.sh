#!/usr/bin/env bash
# Instructions per cache hit, counted by valgrind's callgrind (repeatable on
# a noisy machine, unlike time): the whole BenchmarkHit run at 20,001 hits
# less the run at 1, divided by 20,000. With a revision, the same for the
# code at that revision (a git worktree), side by side.
# Usage: bash bench/instructions.sh [revision]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v valgrind >/dev/null; then
  apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi

tmp=$(mktemp -d)
cleanup() {
  if [ -d "$tmp/rev" ]; then git -C "$root" worktree remove --force "$tmp/rev" >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# count DIR: instructions per hit for the code in DIR.
count() {
  (cd "$1/internal/proxy" && go test -c -o "$tmp/proxy.test" .)
  ir() {
    # No async preemption: its signals upset callgrind. One P: one thread of
    # work. No GC: a cycle that setup started, landing in one run and not the
    # other, moved the count by up to 5,000 per hit.
    (cd "$1/internal/proxy" && GOGC=off GOMAXPROCS=1 GODEBUG=asyncpreemptoff=1 valgrind --tool=callgrind \
      --callgrind-out-file="$tmp/cg.out" "$tmp/proxy.test" -test.run '^$' -test.bench '^BenchmarkHit$' \
      -test.benchtime "$2x" -test.cpu 1 >"$tmp/cg.log" 2>&1) || { cat "$tmp/cg.log" >&2; exit 1; }
    grep -o 'Collected : [0-9]*' "$tmp/cg.log" | awk '{print $3}'
  }
  local a b
  a=$(ir "$1" 1)
  b=$(ir "$1" 20001)
  echo $(( (b - a) / 20000 ))
}

now=$(count "$root")
echo "RESULT	hit: instructions per hit (callgrind, BenchmarkHit)	$now	-	-"
if [ $# -gt 0 ]; then
  git worktree add -q --detach "$tmp/rev" "$1"
  # The proxy tests need the Node client's packages (they are not in git).
  [ -d "$root/clients/node/node_modules" ] && ln -s "$root/clients/node/node_modules" "$tmp/rev/clients/node/node_modules"
  then=$(count "$tmp/rev")
  echo "RESULT	hit: instructions per hit at $1 / now	$then / $now	-	-"
fi

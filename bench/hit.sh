#!/usr/bin/env bash
# Cache-hit throughput over loopback: cacheproxy serving a hit against a bare
# net/http server returning the same bytes and against nginx's proxy_cache
# serving the same hit (keyed by path and Authorization, access log on),
# same load tool (wrk), same connections, alternated in one run (the order
# turning each round). Prints a table, the ratios of the mean rates, and
# the median and range of each round's ratio (this machine is shared:
# rounds vary, adjacent runs vary less). With a revision, cacheproxy built
# at it joins the rotation, and its ratios to bare and to the working tree
# are printed too.
# Usage: bash bench/hit.sh [seconds-per-round] [rounds] [revision]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:-3}
rounds=${2:-10}
rev=${3:-}
conns=${CONNS:-32}

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null
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

go build -o "$tmp/cacheproxy" ./cmd/cacheproxy
go build -o "$tmp/upstream" ./bench/upstream
go build -o "$tmp/bare" ./bench/bare
if [ -n "$rev" ]; then
  git worktree add -q --detach "$tmp/rev" "$rev"
  (cd "$tmp/rev" && go build -o "$tmp/old" ./cmd/cacheproxy)
fi

. bench/hitlib.sh
"$tmp/upstream" >"$tmp/up.addr" & pids+=($!)
up="http://$(addr "$tmp/up.addr")"
if [ -n "$rev" ]; then
  start_proxy "$tmp/old" "$tmp/old.log" "$up"
  old=$proxy
fi
start_proxy "$tmp/cacheproxy" "$tmp/proxy.log" "$up"

"$tmp/bare" -from "http://$proxy$path" -auth "$auth" >"$tmp/bare.addr" & pids+=($!)
bare=$(addr "$tmp/bare.addr")

# nginx's proxy_cache in front of the same upstream, as a sidecar cache
# would be set up: the key holds the credentials, the access log is on
# (buffered, as cacheproxy's is), one worker per core.
nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<CONF
daemon off;
user root;
worker_processes auto;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log $tmp/nginx/access.log combined buffer=64k flush=1s;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  proxy_cache_path $tmp/nginx/cache keys_zone=hits:10m;
  upstream twilio { server ${up#http://}; keepalive 32; }
  server {
    listen 127.0.0.1:$nport;
    location / {
      proxy_pass http://twilio;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache hits;
      proxy_cache_key \$request_uri\$http_authorization;
      proxy_cache_valid 200 1h;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      add_header Cache-Status \$upstream_cache_status;
    }
  }
}
CONF
nginx -c "$tmp/nginx/nginx.conf" & pids+=($!)
for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$nport/" 2>/dev/null && break; curl -sS -o /dev/null "http://127.0.0.1:$nport/" 2>/dev/null && break; sleep 0.1; done
curl -fsS -o /dev/null -H "Authorization: $auth" "http://127.0.0.1:$nport$path"   # miss: fills nginx's cache
nstatus=$(curl -fsS -o /dev/null -D - -H "Authorization: $auth" "http://127.0.0.1:$nport$path" | grep -i '^cache-status' | tr -d '\r')
echo "$nstatus" | grep -q 'HIT' || { echo "nginx: not a hit: $nstatus" >&2; exit 1; }

run() { # name url
  wrk -t1 -c"$conns" -d"${secs}s" --latency -H "Authorization: $auth" "$2" >"$tmp/wrk.out"
  rps=$(awk '/Requests\/sec/ {print $2}' "$tmp/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$tmp/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$tmp/wrk.out")
  printf '%-12s %12s %10s %10s\n' "$1" "$rps" "$p50" "$p99"
  echo "$r $1 $rps" >>"$tmp/results"
  [ "$1" = cacheproxy ] && { cp50=$p50; cp99=$p99; }
  return 0
}

printf '%-12s %12s %10s %10s\n' server req/s p50 p99
# The order turns each round (bare, cacheproxy, nginx; cacheproxy, nginx,
# bare; ...), so that a drift in the machine's speed favours none.
order=(bare cacheproxy nginx)
declare -A url=([bare]="http://$bare$path" [cacheproxy]="http://$proxy$path" [nginx]="http://127.0.0.1:$nport$path")
if [ -n "$rev" ]; then
  order+=("$rev")
  url[$rev]="http://$old$path"
fi
n=${#order[@]}
for r in $(seq "$rounds"); do
  for i in $(seq 0 $((n - 1))); do
    name=${order[$(( (r - 1 + i) % n ))]}
    run "$name" "${url[$name]}"
  done
done
# Each round's rates over its bare rate (and cacheproxy's over nginx's),
# sorted; the medians and ranges of those.
awk '{v[$1" "$2]=$3; rounds[$1]=1}
  END {for (r in rounds) printf "%.3f %.3f %.3f\n", v[r" cacheproxy"]/v[r" bare"], v[r" nginx"]/v[r" bare"], v[r" cacheproxy"]/v[r" nginx"]}' "$tmp/results" >"$tmp/ratios"
awk -v ratios="$(cut -d' ' -f1 "$tmp/ratios" | sort -n | tr '\n' ' ')" \
    -v nratios="$(cut -d' ' -f3 "$tmp/ratios" | sort -n | tr '\n' ' ')" \
    '{sum[$2]+=$3; n[$2]++}
  function med(s, r,   k) { k=split(s, r, " "); return (k%2) ? r[(k+1)/2] : (r[k/2]+r[k/2+1])/2 }
  END {b=sum["bare"]/n["bare"]; c=sum["cacheproxy"]/n["cacheproxy"]; x=sum["nginx"]/n["nginx"];
  k=split(ratios, r, " "); m=med(ratios); j=split(nratios, q, " "); mn=med(nratios);
  printf "mean req/s: bare %.0f, cacheproxy %.0f, nginx %.0f; cacheproxy / bare %.3f, cacheproxy / nginx %.3f\n", b, c, x, c/b, c/x;
  printf "RESULT\thit over loopback: cacheproxy / bare net/http req/s\t%.0f / %.0f = %.3f (per round: median %.3f, %s-%s)\t>= 0.90\t%s\n", c, b, c/b, m, r[1], r[k], (c/b >= 0.9) ? "true" : "false";
  printf "RESULT\thit over loopback: cacheproxy / nginx proxy_cache req/s\t%.0f / %.0f = %.3f (per round: median %.3f, %s-%s)\t-\t-\n", c, x, c/x, mn, q[1], q[j]}' "$tmp/results"
if [ -n "$rev" ]; then
  awk -v rev="$rev" -v ratios="$(awk -v rev="$rev" '{v[$1" "$2]=$3; R[$1]=1} END {for (r in R) printf "%.3f\n", v[r" cacheproxy"]/v[r" "rev]}' "$tmp/results" | sort -n | tr '\n' ' ')" \
    '{sum[$2]+=$3} END {b=sum["bare"]; c=sum["cacheproxy"]; o=sum[rev]; k=split(ratios, q, " "); m=(k%2) ? q[(k+1)/2] : (q[k/2]+q[k/2+1])/2;
    printf "RESULT\thit over loopback: cacheproxy at %s / bare net/http req/s, same run\t%.3f\t-\t-\n", rev, o/b;
    printf "RESULT\thit over loopback: working tree / %s req/s, same run\t%.3f (per round: median %.3f, %s-%s)\t-\t-\n", rev, c/o, m, q[1], q[k]}' "$tmp/results"
fi
echo "RESULT	hit over loopback: cacheproxy p50 / p99 (last round)	$cp50 / $cp99	-	-"
echo "($(nproc) cores, $conns connections, wrk -t1, ${secs}s x $rounds rounds; cacheproxy and nginx each log a line per request to a file)"

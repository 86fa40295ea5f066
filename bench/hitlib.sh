# Shared by hit.sh and ab.sh (sourced, not run): the participant read they
# load, and starting the processes they measure.

auth="Basic $(printf '%s:%s' AC00000000000000000000000000000001 benchtoken | base64 -w0)"
path=/v1/Conversations/CH00000000000000000000000000000001/Participants/MB00000000000000000000000000000001

# addr FILE: wait (bounded) for a process to print its address on line 1.
addr() {
  for _ in $(seq 100); do
    [ -s "$1" ] && { head -1 "$1"; return; }
    sleep 0.1
  done
  echo "no address in $1" >&2; exit 1
}

# start_proxy BINARY LOG UPSTREAM: runs a cacheproxy in front of UPSTREAM
# (its pid joins pids), fills its cache with the read and checks that the
# next one is a hit; sets proxy to its address.
start_proxy() {
  CACHEPROXY_LISTEN=127.0.0.1:0 CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0 \
  CACHEPROXY_UPSTREAMS_CONVERSATIONS_URL="$3" CACHEPROXY_UPSTREAMS_PROXY_URL="$3" \
  CACHEPROXY_CACHE_TTL=1h \
    "$1" >"$2" & pids+=($!)
  for _ in $(seq 100); do grep -q '"listen"' "$2" 2>/dev/null && break; sleep 0.1; done
  proxy=$(grep -o '"listen":"[^"]*"' "$2" | head -1 | cut -d'"' -f4)
  [ -n "$proxy" ] || { echo "$1: no listen address in $2" >&2; exit 1; }
  curl -fsS -o /dev/null -H "Authorization: $auth" "http://$proxy$path"   # miss: fills the cache
  local status
  status=$(curl -fsS -o /dev/null -D - -H "Authorization: $auth" "http://$proxy$path" | grep -i '^cache-status' | tr -d '\r')
  echo "$status" | grep -q 'hit' || { echo "$1: not a hit: $status" >&2; exit 1; }
}

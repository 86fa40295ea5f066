#!/bin/sh
# The release build, shared by the Dockerfile, scripts/release.sh and CI:
# a static binary (no cgo), paths trimmed, symbols stripped. Usage:
#   [REVISION=<git revision>] [GOOS=… GOARCH=…] build-static.sh OUTPUT
# REVISION is recorded for -version when the build does not stamp the
# checkout's itself (the Docker build context leaves .git out; GOFLAGS may
# say -buildvcs=false); by default, the checkout's HEAD if there is one.
set -eu
out=${1:?usage: build-static.sh OUTPUT}
REVISION=${REVISION:-$(git rev-parse HEAD 2>/dev/null || true)}
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.revision=${REVISION:-}" -o "$out" ./cmd/cacheproxy

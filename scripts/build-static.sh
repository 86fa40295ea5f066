#!/bin/sh
# The release build, shared by the Dockerfile, scripts/release.sh and CI:
# a static binary (no cgo), paths trimmed, symbols stripped. Usage:
#   [REVISION=<git revision>] [GOOS=… GOARCH=…] build-static.sh OUTPUT
# REVISION is recorded for -version when the build cannot read .git
# itself (the Docker build context leaves .git out).
set -eu
out=${1:?usage: build-static.sh OUTPUT}
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.revision=${REVISION:-}" -o "$out" ./cmd/cacheproxy

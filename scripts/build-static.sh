#!/bin/sh
# The release build, shared by the Dockerfile and CI: a static binary
# (no cgo), paths trimmed, symbols stripped. Usage: build-static.sh OUTPUT
set -eu
out=${1:?usage: build-static.sh OUTPUT}
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$out" ./cmd/cacheproxy

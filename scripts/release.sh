#!/bin/sh
# Static release binaries for linux/amd64 and linux/arm64, and their
# SHA256SUMS, into DIR (default dist/). Usage: scripts/release.sh [DIR]
set -eu
cd "$(dirname "$0")/.."
dir=${1:-dist}
mkdir -p "$dir"
REVISION=${REVISION:-$(git rev-parse HEAD 2>/dev/null || true)}
export REVISION
for arch in amd64 arm64; do
  GOOS=linux GOARCH=$arch sh scripts/build-static.sh "$dir/cacheproxy-linux-$arch"
done
(cd "$dir" && sha256sum cacheproxy-linux-amd64 cacheproxy-linux-arm64 > SHA256SUMS)
echo "release binaries in $dir:"
cat "$dir/SHA256SUMS"

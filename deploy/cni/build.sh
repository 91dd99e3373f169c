#!/usr/bin/env bash
# Builds the libcni driver (libcni-driver/main.go) once per libcni version
# in libcni-driver/<version>/ (each a pinned go.mod and go.sum): v1.1.2 is
# what Debian 12 packages and containerd 1.6/1.7 and podman 4 vendor, the
# newest is what current containerd 2.x and CRI-O vendor. The binaries go
# into a cache outside the repository keyed by a hash of the recipe,
#
#   $WEFT_CACHE_DIR/libcni-driver/<recipe>/libcni-driver-<version>
#
# and are not built again when present. Prints that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)/libcni-driver
recipe=$(cat "$here/main.go" "$here"/v*/go.* "$0" | sha256sum | cut -c1-12)
out="${WEFT_CACHE_DIR:-/var/cache/weft}/libcni-driver/$recipe"
mkdir -p "$out"
export CGO_ENABLED=0 GOFLAGS=-mod=readonly
for dir in "$here"/v*/; do
  version=$(basename "$dir")
  bin="$out/libcni-driver-$version"
  [ -x "$bin" ] && continue
  echo "building libcni-driver against libcni $version" >&2
  work=$(mktemp -d)
  cp "$here/main.go" "$dir/go.mod" "$dir/go.sum" "$work/"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
  rm -rf "$work"
done
echo "$out"

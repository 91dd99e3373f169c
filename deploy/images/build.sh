#!/usr/bin/env bash
# Builds the weft image offline (deploy/images/Containerfile) from binaries
# already built, and saves it as a docker-archive for `ctr images import`
# or `podman load`.
#
#   deploy/images/build.sh [--bin-dir target/release] [--name localhost/weft:dev] [--archive FILE]
#
# Prints the archive's path. Needs podman (Debian's 4.3 builds FROM scratch
# with no network).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$here/rootfs.sh"

bin_dir="$repo/target/release"
name=localhost/weft:dev
archive=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --archive) archive=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$archive" ] || archive="$bin_dir/weft-image.tar"

# Every binary the chart runs, and weftctl for `kubectl exec`.
binaries=(svc-watcher ipam-svc identity-svc datapath-svc weft-cni weftctl)
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
root="$context/rootfs"
rootfs_base "$root"
rootfs_busybox "$root"
for b in "${binaries[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is missing: build the workspace first" >&2; exit 1; }
  rootfs_binary "$root" "$bin_dir/$b" "/usr/local/bin/$b"
done
image_build "$context" "$here/Containerfile" "$name" "$archive"
echo "$archive"

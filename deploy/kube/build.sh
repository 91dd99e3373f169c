#!/usr/bin/env bash
# Builds the upstream Kubernetes programs the real-cluster tests run, from
# the Go module in deploy/kube/upstream (k8s.io/kubernetes at one release,
# every staging module replaced by its matching v0.x release), into a cache
# outside the repository keyed by that release and by a hash of this recipe:
#
#   $WEFT_CACHE_DIR/kube/<release>-<recipe>/bin/
#     kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl
#     e2e.test ginkgo agnhost pause coredns
#
# What is there already is not built again, so a second run costs nothing
# and a fresh machine builds everything once. Prints the bin directory on
# stdout (progress goes to stderr). Arguments name the programs to build;
# none builds them all.
#
# Why Kubernetes 1.35: it is the last release whose kubelet supports
# containerd 1.x (Debian 12 ships containerd 1.6.20, and 1.36 drops 1.x),
# and it still runs on cgroup v1 with `failCgroupV1: false` (these machines
# mount cgroups hybrid: v1 controllers, v2 only at /sys/fs/cgroup/unified).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
module="$here/upstream"

release=$(sed -n 's/^[[:space:]]*k8s\.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$module/go.mod" | head -1)
[ -n "$release" ] || { echo "no k8s.io/kubernetes version in $module/go.mod" >&2; exit 1; }
recipe=$(cat "$module/go.mod" "$module/go.sum" "$here/coredns/"* "$0" | sha256sum | cut -c1-12)
cache="${WEFT_CACHE_DIR:-/var/cache/weft}/kube/$release-$recipe"
bin="$cache/bin"
mkdir -p "$bin"

all=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl e2e.test ginkgo agnhost pause coredns)
wanted=("$@")
[ "${#wanted[@]}" -gt 0 ] || wanted=("${all[@]}")

# Version stamps as upstream's own build sets them: the API server reports
# this version, and the e2e suite and kubectl compare against it.
minor=${release#v1.}
minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w"
for p in $pkg k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=$release -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

export CGO_ENABLED=0 GOFLAGS=-mod=readonly
cd "$module"
for name in "${wanted[@]}"; do
  [ -x "$bin/$name" ] && continue
  start=$(date +%s)
  echo "building $name ($release)" >&2
  tmp="$bin/.$name.tmp"
  case "$name" in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kubectl)
      go build -trimpath -ldflags "$ldflags" -o "$tmp" "k8s.io/kubernetes/cmd/$name" ;;
    e2e.test)
      go test -c -vet=off -trimpath -ldflags "$ldflags" -o "$tmp" k8s.io/kubernetes/test/e2e ;;
    ginkgo)
      go build -trimpath -ldflags "-s -w" -o "$tmp" github.com/onsi/ginkgo/v2/ginkgo ;;
    agnhost)
      go build -trimpath -ldflags "-s -w" -o "$tmp" k8s.io/kubernetes/test/images/agnhost ;;
    pause)
      # The pod sandbox's process, from upstream's C source in the module.
      src=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
      gcc -Os -static -Wall -Werror -DVERSION="${release}-weft" -o "$tmp" "$src"
      strip "$tmp" ;;
    coredns)
      # Its own module: CoreDNS pins other versions of client-go and gRPC.
      (cd "$here/coredns" && go build -trimpath -ldflags "-s -w" -o "$tmp" .) ;;
    *)
      echo "unknown program $name (known: ${all[*]})" >&2; exit 1 ;;
  esac
  mv -f "$tmp" "$bin/$name"
  echo "built $name in $(( $(date +%s) - start )) s" >&2
done
echo "$bin"

#!/usr/bin/env bash
# Builds the images a real cluster runs besides weft's own (the pod
# sandbox, cluster DNS, and the test images Kubernetes' e2e suite asks
# for), offline, from programs built by deploy/kube/build.sh and from this
# machine's Debian packages, under the exact names the kubelet and the
# suite ask for. Saved as docker-archives for `ctr images import`, in a
# cache beside the upstream binaries, and not built again when present.
#
#   deploy/kube/images.sh UPSTREAM_BIN_DIR    # prints the images directory
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../images/rootfs.sh"
bin=${1:?usage: images.sh UPSTREAM_BIN_DIR}
recipe=$(cat "$0" "$here/../images/rootfs.sh" | sha256sum | cut -c1-12)
out="$(dirname "$bin")/images-$recipe"
mkdir -p "$out"

# name|archive|Containerfile lines after FROM/COPY
images=(
  "registry.k8s.io/pause:3.10.1|pause.tar|USER 65535:65535
ENTRYPOINT [\"/pause\"]"
  "registry.k8s.io/e2e-test-images/agnhost:2.59|agnhost.tar|ENTRYPOINT [\"/agnhost\"]
CMD [\"pause\"]"
  "registry.k8s.io/e2e-test-images/busybox:1.37.0-1|busybox.tar|CMD [\"sh\"]"
  "registry.k8s.io/coredns/coredns:v1.13.1|coredns.tar|ENTRYPOINT [\"/coredns\"]"
)

rootfs_for() {
  local archive=$1 root=$2
  rootfs_base "$root"
  case "$archive" in
    pause.tar)
      install -D -m 0755 "$bin/pause" "$root/pause" ;;
    agnhost.tar)
      # What upstream's agnhost image carries beside agnhost (it is built
      # on Alpine with these): the suite runs them in its pods.
      install -D -m 0755 "$bin/agnhost" "$root/agnhost"
      local tool
      for tool in /usr/bin/curl /usr/bin/dig /usr/bin/nslookup /usr/bin/nc.openbsd /usr/sbin/ip /usr/bin/bash; do
        rootfs_binary "$root" "$tool" "/bin/$(basename "$tool")"
      done
      ln -sf nc.openbsd "$root/bin/nc"
      rootfs_busybox "$root" ;;
    busybox.tar)
      rootfs_busybox "$root" ;;
    coredns.tar)
      install -D -m 0755 "$bin/coredns" "$root/coredns" ;;
  esac
}

for entry in "${images[@]}"; do
  name=${entry%%|*}
  rest=${entry#*|}
  archive=${rest%%|*}
  lines=${rest#*|}
  [ -s "$out/$archive" ] && continue
  echo "building image $name" >&2
  context=$(mktemp -d)
  rootfs_for "$archive" "$context/rootfs"
  printf 'FROM scratch\nCOPY rootfs/ /\n%s\n' "$lines" > "$context/Containerfile"
  image_build "$context" "$context/Containerfile" "$name" "$out/$archive"
  rm -rf "$context"
done
echo "$out"

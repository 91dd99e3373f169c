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
  "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7|jessie-dnsutils.tar|CMD [\"sh\"]"
  "registry.k8s.io/coredns/coredns:v1.13.1|coredns.tar|ENTRYPOINT [\"/coredns\"]"
)

# GNU wget: Debian 12's busybox wget crashes on -T (its timeout), which
# the suite's probes pass.
rootfs_wget() {
  rootfs_binary "$1" /usr/bin/wget /bin/wget
}

# Debian's dynamically linked busybox, for images that carry glibc: a
# static glibc busybox crashes in its name-service lookups (wget, id,
# hostname -i) when it finds the image's shared glibc. It conflicts with
# busybox-static as a package, so it is unpacked here, not installed.
dynamic_busybox() {
  local dir="$out/.busybox"
  if [ ! -x "$dir/bin/busybox" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && { apt-get download -qq busybox 2>/dev/null || { apt-get update -qq && apt-get download -qq busybox; }; }) >&2
    dpkg-deb -x "$dir"/busybox_*.deb "$dir"
  fi
  echo "$dir/bin/busybox"
}

# The network tools upstream's test images carry (they are built on Alpine
# or Debian with these), from this machine's Debian packages.
rootfs_tools() {
  local root=$1 tool
  for tool in /usr/bin/curl /usr/bin/dig /usr/bin/nslookup /usr/bin/nc.openbsd /usr/sbin/ip \
    /usr/bin/getent /usr/bin/bash; do
    rootfs_binary "$root" "$tool" "/bin/$(basename "$tool")"
  done
  ln -sf nc.openbsd "$root/bin/nc"
  rootfs_wget "$root"
  # /bin/sh is dash, as on Debian: Debian's static busybox runs its own
  # applets before anything on PATH, so a busybox sh would run busybox's
  # nc where a test means netcat.
  rootfs_binary "$root" /usr/bin/dash /bin/dash
  ln -sf dash "$root/bin/sh"
}

rootfs_for() {
  local archive=$1 root=$2
  rootfs_base "$root"
  case "$archive" in
    pause.tar)
      install -D -m 0755 "$bin/pause" "$root/pause" ;;
    agnhost.tar)
      # What upstream's agnhost image carries beside agnhost (its
      # Dockerfile, in the module): the tools the suite runs in its pods,
      # CoreDNS for the DNS tests' own servers, the porter's TLS pair, the
      # user and group a sig-node test expects.
      install -D -m 0755 "$bin/agnhost" "$root/agnhost"
      ln -s agnhost "$root/agnhost-2"
      install -D -m 0755 "$bin/coredns" "$root/coredns"
      local src
      src=$(cd "$here/upstream" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' k8s.io/kubernetes)/test/images/agnhost
      install -m 0644 "$src/porter/localhost.crt" "$src/porter/localhost.key" "$root/"
      mkdir -p "$root/uploads"
      rootfs_tools "$root"
      rootfs_binary "$root" /usr/bin/ss /bin/ss
      rootfs_binary "$root" /usr/bin/iperf /bin/iperf
      echo "user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh" >> "$root/etc/passwd"
      printf 'user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' >> "$root/etc/group"
      rootfs_busybox "$root" "$(dynamic_busybox)" ;;
    jessie-dnsutils.tar)
      # Debian with dnsutils upstream: the DNS tests' queriers run dig,
      # getent and a shell in it.
      rootfs_tools "$root"
      rootfs_busybox "$root" "$(dynamic_busybox)" ;;
    busybox.tar)
      rootfs_wget "$root"
      rootfs_busybox "$root" "$(dynamic_busybox)" ;;
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

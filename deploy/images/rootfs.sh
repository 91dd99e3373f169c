# Helpers for assembling an image's root filesystem from this machine's own
# files, for images built offline (FROM scratch: no base image can be
# pulled). Sourced by deploy/images/build.sh and deploy/kube/images.sh.

# rootfs_binary ROOTFS SRC [DEST]: copies SRC to ROOTFS/DEST (default: the
# same path), stripped, with every shared library it loads (from ldd), so
# it runs with nothing else in the image.
rootfs_binary() {
  local root=$1 src=$2 dest=${3:-$2}
  install -D -m 0755 "$src" "$root$dest"
  strip --strip-unneeded "$root$dest" 2>/dev/null || true
  local lib
  for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' || true); do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

# rootfs_busybox ROOTFS [BUSYBOX]: a busybox at /bin/busybox (Debian's
# static one unless BUSYBOX names another, copied with its libraries), with
# a link for each of its applets in /bin (sh, cp, mv, wget, ...), never
# replacing a real binary already there.
rootfs_busybox() {
  local root=$1 busybox=${2:-/bin/busybox} applet
  if [ "$busybox" = /bin/busybox ]; then
    install -D -m 0755 "$busybox" "$root/bin/busybox"
  else
    rootfs_binary "$root" "$busybox" /bin/busybox
  fi
  for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
}

# rootfs_base ROOTFS: users, groups and the few files programs expect.
rootfs_base() {
  local root=$1
  mkdir -p "$root"/{etc,tmp,root} "$root/usr"
  chmod 1777 "$root/tmp"
  [ -e "$root/usr/bin" ] || ln -s ../bin "$root/usr/bin"
  [ -e "$root/sbin" ] || ln -s bin "$root/sbin"
  [ -e "$root/usr/sbin" ] || ln -s ../bin "$root/usr/sbin"
  cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
PASSWD
  cat > "$root/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
nogroup:x:65534:
GROUP
  echo "hosts: files dns" > "$root/etc/nsswitch.conf"
  if [ -e /etc/ssl/certs/ca-certificates.crt ]; then
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  fi
}

# image_build CONTEXT CONTAINERFILE NAME ARCHIVE: builds CONTEXT (which
# holds rootfs/) with podman, offline, and saves it as a docker-archive
# that `ctr images import` loads under NAME.
image_build() {
  local context=$1 file=$2 name=$3 archive=$4
  podman build --quiet --pull=never --network=none -f "$file" -t "$name" "$context" >/dev/null
  rm -f "$archive.tmp"
  podman save --quiet --format docker-archive -o "$archive.tmp" "$name"
  mv -f "$archive.tmp" "$archive"
}

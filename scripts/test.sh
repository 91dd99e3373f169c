#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests of every crate,
# and the end-to-end tests that run every service as a process in network
# namespaces with real eBPF and real packets. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
# Upstream Kubernetes for the real-cluster tests (kube-apiserver, kubelet,
# e2e.test, ...), built from its Go modules once per release into a cache
# outside the repository; a second run finds it there.
deploy/kube/build.sh >/dev/null
# The libcni drivers the plugin is tested through (tests/cni_runtime.rs),
# one per libcni version runtimes ship, cached the same way.
deploy/cni/build.sh >/dev/null
# One build of every binary, shared by all tests (the end-to-end tests run
# them from target/debug).
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast -- --show-output

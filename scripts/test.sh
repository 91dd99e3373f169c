#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests of every crate,
# and the end-to-end tests that run every service as a process in network
# namespaces with real eBPF and real packets. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
# One build of every binary, shared by all tests (the end-to-end tests run
# them from target/debug).
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast -- --show-output

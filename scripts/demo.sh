#!/usr/bin/env bash
# The demo: installs what is missing, builds weft, brings up the local lab
# (one node, three echo pods behind a ClusterIP Service, a client pod) and
# shows the Service being load-balanced. The lab keeps running until Ctrl-C.
# Extra arguments go to `weft-lab demo` (e.g. --nodes 2, --exit).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins --locked
exec target/debug/weft-lab demo "$@"

#!/usr/bin/env bash
# Sets up, builds, and runs the demo: 3 real nodes on loopback, 4 generated VMs, snapshot on
# node 1, node 1 stopped, VM restored on node 3 and checked byte for byte.
# Usage: scripts/demo.sh [vmcsnap-testnet demo options, e.g. --size 64M]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p vmcsnap-cli -p vmcsnap-testnet
exec cargo run --release --locked -q -p vmcsnap-testnet -- demo "$@"

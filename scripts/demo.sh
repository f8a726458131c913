#!/usr/bin/env bash
# Sets up, builds, and runs the demo: 3 real nodes on loopback, 3 small QEMU guests on two of
# them, a live cut of all of them from the third, every guest killed and rolled back on
# another host with its memory checked from inside, the figures beside default KVM's (QEMU's
# own snapshot of each VM to a file) from the same run.
# Usage: scripts/demo.sh [vmcsnap-testnet demo options; --generated for the demo on generated
#        memory images, e.g. --generated --size 64M]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-guest.sh   # the guests' kernel and initrd (cached in guest/cache)
cargo build --release --locked -p vmcsnap-cli -p vmcsnap-testnet
exec cargo run --release --locked -q -p vmcsnap-testnet -- demo "$@"

#!/usr/bin/env bash
# Runs every test: unit and property tests, the data-plane test against a real node, the
# end-to-end tests with real node processes, and the real-QEMU tests (guests booted under KVM
# when it really works, TCG otherwise).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-guest.sh   # the real-QEMU tests boot this guest (cached in guest/cache)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --locked --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "all tests: ${passed} passed, ${failed} failed"
exit "$status"

#!/usr/bin/env bash
# How many members' gossiped states (disk full, VMs: dht/src/state.rs) three nodes of a local
# cluster know, from when `vmcsnap-testnet up` returns until all know all (docs/benchmarks.md,
# "Member states by gossip"). n1 joined first, the last node last.
# Usage: scripts/bench-states.sh [NODES=100] [SECONDS=40]
#   VMCSNAP_BIN, TESTNET_BIN: the binaries (default: target/release, or $CARGO_TARGET_DIR/release)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}; LIMIT=${2:-40}
rel=${CARGO_TARGET_DIR:-target}/release
B=${VMCSNAP_BIN:-$rel/vmcsnap}; T=${TESTNET_BIN:-$rel/vmcsnap-testnet}
D=$(mktemp -d /var/tmp/vmcsnap-bench-states.XXXXXX)
trap 'VMCSNAP_BIN=$B $T down --dir "$D" >/dev/null 2>&1 || true; sleep 2; rm -rf "$D"' EXIT
s=$(date +%s)
VMCSNAP_BIN=$B $T up --nodes "$N" --dir "$D" >/dev/null
echo "up returned after $(( $(date +%s) - s )) s"
mid=$(( (N + 1) / 2 ))
while :; do
  line="t=$(( $(date +%s) - s ))s"; all=1
  for n in n1 "n$mid" "n$N"; do
    c=$($B cluster members --node "$D/$n" --json 2>/dev/null | python3 -c 'import json,sys; m=json.load(sys.stdin)["members"]; print(sum(1 for x in m if x.get("said") is not None), sum(1 for x in m if x["alive"]))' || echo "0 0")
    set -- $c
    line="$line  $n knows $1 states of $2 members up"
    [ "$1" -ge "$N" ] || all=0
  done
  echo "$line"
  [ "$all" = 1 ] && break
  [ $(( $(date +%s) - s )) -ge "$LIMIT" ] && { echo "not all states known after ${LIMIT} s"; break; }
  sleep 2
done

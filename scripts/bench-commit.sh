#!/usr/bin/env bash
# Times `snapshot create` of a small image on a local cluster of many nodes: what a snapshot's
# commit costs as the cluster grows (docs/benchmarks.md, "A commit that waits on a handful of
# members").
# Usage: scripts/bench-commit.sh [NODES=48] [RUNS=7]
#   VMCSNAP_BIN, TESTNET_BIN: the binaries (default: target/release, or $CARGO_TARGET_DIR/release)
# Prints each create's wall time and the CLI's elapsed_ms (the first create opens connections),
# and when the last other member logged "snapshot recorded" for it (the record's gossip).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-48}; RUNS=${2:-7}
rel=${CARGO_TARGET_DIR:-target}/release
B=${VMCSNAP_BIN:-$rel/vmcsnap}; T=${TESTNET_BIN:-$rel/vmcsnap-testnet}
D=$(mktemp -d /var/tmp/vmcsnap-bench-commit.XXXXXX)
VMCSNAP_BIN=$B $T up --nodes "$N" --dir "$D" >/dev/null
trap 'VMCSNAP_BIN=$B $T down --dir "$D" >/dev/null 2>&1 || true; sleep 2; rm -rf "$D"' EXIT
up=0
for _ in $(seq 1 120); do
  up=$($B cluster members --node "$D/n1" --json 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for m in json.load(sys.stdin)["members"] if m["alive"]))' || echo 0)
  [ "$up" -ge "$N" ] && break
  sleep 1
done
echo "$up of $N members up"
head -c $((8 << 20)) /dev/urandom > "$D/img"
for r in $(seq 1 "$RUNS"); do
  head -c 4096 /dev/urandom | dd of="$D/img" conv=notrunc status=none
  s=$(date +%s%N)
  $B snapshot create "s$r" --vm "vm0=file:$D/img" --node "$D/n$(( (r % N) + 1 ))" --json > "$D/out" 2>/dev/null
  e=$(date +%s%N)
  sleep 2
  spread=$(python3 - "$D" "s$r" "$s" "$N" <<'PY'
import glob, sys, datetime
d, name, start_ns, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
last, nodes = None, 0
for log in glob.glob(f"{d}/n*/node.log"):
    for line in open(log, errors="replace"):
        if "snapshot recorded" in line and f"name={name} " in line:
            t = datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()
            last, nodes = max(last or t, t), nodes + 1
            break
print(f"on {nodes + 1} of {n} members" + (f", the last {last - start_ns / 1e9:.2f} s after the create began" if last else ""))
PY
)
  echo "create $r: $(( (e - s) / 1000000 )) ms (elapsed_ms $(python3 -c "import json; print(json.load(open('$D/out'))['elapsed_ms'])")); record $spread"
done

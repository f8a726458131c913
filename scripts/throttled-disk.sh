#!/usr/bin/env bash
# A directory on a block device whose writes are capped, for the I/O-bound benchmark setting
# (the paper's): default KVM's snapshot files and every node's data directory then share one
# write bandwidth. Built from a file-backed loop device (direct I/O, so the cap is the
# device's), ext4 on it, and a blkio throttle rule on the device in the root cgroup (cgroup
# v1: it holds the kernel's writeback threads too, so buffered writes and fsync are capped).
# Needs root.
#
# Usage: scripts/throttled-disk.sh up DIR [MB_PER_S (200)] [SIZE_GIB (16)]
#        scripts/throttled-disk.sh down DIR
# Then, for example: target/release/vmcsnap-testnet bench --dir DIR/bench --modes live
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { sed -n '2,12p' "$0" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "throttled-disk: needs root" >&2; exit 1; }
rule=/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device
img="$dir.img"

case $cmd in
up)
  mbps=${3:-200}; gib=${4:-16}
  [ -w "$rule" ] || { echo "throttled-disk: no cgroup v1 blkio throttle here ($rule)" >&2; exit 1; }
  mountpoint -q "$dir" 2>/dev/null && { echo "throttled-disk: $dir is already mounted" >&2; exit 1; }
  mkdir -p "$dir"
  truncate -s "${gib}G" "$img"
  dev=$(losetup --direct-io=on --find --show "$img")
  # Half-way failures leave nothing behind.
  trap 'umount "$dir" 2>/dev/null; losetup -d "$dev"; rm -f "$img"' ERR
  mkfs.ext4 -q -F "$dev"
  mount "$dev" "$dir"
  majmin=$(lsblk -no MAJ:MIN "$dev" | tr -d ' ')
  echo "$majmin $((mbps * 1000 * 1000))" > "$rule"
  echo "throttled-disk: $dir on $dev ($majmin), writes capped at $mbps MB/s"
  ;;
down)
  dev=$(findmnt -no SOURCE "$dir" 2>/dev/null || true)
  if [ -n "$dev" ]; then
    majmin=$(lsblk -no MAJ:MIN "$dev" | tr -d ' ')
    echo "$majmin 0" > "$rule" 2>/dev/null || true
    umount "$dir"
    losetup -d "$dev"
  fi
  rm -f "$img"
  rmdir "$dir" 2>/dev/null || true
  echo "throttled-disk: $dir removed"
  ;;
*)
  echo "throttled-disk: up or down, not $cmd" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Installs what building and testing vmcsnap needs on Debian 12 (idempotent; quiet when done).
#   libclang-dev     bindgen, for the RocksDB bindings
#   librocksdb-dev   Debian's RocksDB 7.8, linked instead of compiling RocksDB's C++
#   qemu-system-x86, busybox-static, cpio, lz4, e2fsprogs   real guests (scripts/build-guest.sh;
#                    e2fsprogs also checks restored disks in tests)
#   systemd          systemd-analyze, which checks the service unit in tests (nothing is started)
set -euo pipefail
pkgs=(libclang-dev librocksdb-dev pkg-config qemu-system-x86 busybox-static cpio lz4 gzip e2fsprogs systemd)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found. vmcsnap needs Rust 1.88 or newer (https://rustup.rs)." >&2
  exit 1
fi
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "${rustc_minor:-0}" -lt 88 ]; then
  echo "setup: $(rustc --version) is too old; vmcsnap needs Rust 1.88 or newer." >&2
  exit 1
fi

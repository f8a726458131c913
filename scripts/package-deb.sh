#!/usr/bin/env bash
# Builds a Debian package of vmcsnap: the binary, the systemd unit, a default config
# (/etc/vmcsnap/node.toml, a conffile), shell completions, man pages generated from the CLI,
# and the docs. Needs dpkg-deb (Debian has it).
#   scripts/package-deb.sh [--bin PATH] [--out DIR]
#     --bin PATH   package this vmcsnap binary instead of building one (cargo build --release)
#     --out DIR    where the .deb goes (default: target/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="" out="target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--bin PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  cargo build --release --locked -p vmcsnap-cli
  bin="${CARGO_TARGET_DIR:-target}/release/vmcsnap"
fi
version=$(sed -nE 's/^version = "([^"]+)".*/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -s -m 0755 "$bin" "$root/usr/bin/vmcsnap"   # stripped, as Debian ships binaries
install -D -m 0644 packaging/vmcsnap-node.service "$root/lib/systemd/system/vmcsnap-node.service"
install -d -m 0755 "$root/etc/vmcsnap"
"$bin" node config-example > "$root/etc/vmcsnap/node.toml"
chmod 0640 "$root/etc/vmcsnap/node.toml"
install -d "$root/usr/share/man/man1"
"$bin" man-pages "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash > "$root/usr/share/bash-completion/completions/vmcsnap"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_vmcsnap"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/vmcsnap.fish"
install -d "$root/usr/share/doc/vmcsnap"
install -m 0644 README.md docs/*.md "$root/usr/share/doc/vmcsnap/"
install -d "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: vmcsnap
Version: $version
Architecture: $arch
Maintainer: vmcsnap developers <vmcsnap@localhost>
Section: admin
Priority: optional
Depends: libc6, librocksdb7.8
Recommends: qemu-system-x86, systemd
Installed-Size: $(du -sk "$root" | cut -f1)
Description: deduplicated snapshots of whole QEMU/KVM VM clusters
 Every KVM host runs a vmcsnap node; a snapshot of many VMs is one cut, each VM
 paused for milliseconds, and every distinct 4 KiB page of memory and disk is
 stored once (times the replicas) across all hosts. Any host restores any VM.
CONTROL
echo /etc/vmcsnap/node.toml > "$root/DEBIAN/conffiles"
mkdir -p "$out"
deb="$out/vmcsnap_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"

#!/usr/bin/env bash
# Builds a small Linux guest for tests and demos from Debian packages only, and caches it:
#   guest/cache/vmlinux     Debian's cloud kernel, decompressed (boots directly via PVH)
#   guest/cache/initrd.gz   busybox-static initramfs with vmcsnap's init script
#   guest/cache/disk.img    a 64 MiB ext4 image (mke2fs -d) holding /base.txt (4 MiB of `seq`
#                           text), for guests with a disk: copy it, attach the copy with
#                           -drive file=COPY,if=virtio,format=raw and boot with disk=1
# Usage: scripts/build-guest.sh [--force]
#
# Kernel command-line options the init understands:
#   fill=N     write N MiB of random data to /tmp/fill and print "FILL-DONE <md5> /tmp/fill"
#   cache=N    fill the page cache with N MiB of text that every guest generates identically
#              (/tmp/cache, from `seq`), print "CACHE-DONE <md5>"
#   writer=1   keep rewriting 8 MiB of random data in the background (dirties memory)
#   disk=1     load the virtio block driver, mount /dev/vda on /mnt, print "DISK-OK"
# After boot it prints "BOOT-OK uptime=<s>" and runs a shell on the serial console; the line
# "vmcsnap-check" prints "CHECK <md5 of /tmp/fill>" (used by tests after a restore);
# "vmcsnap-write N" writes N MiB of fresh memory and prints "WROTE <start> <end>" (guest uptimes).
# With a disk: "vmcsnap-disk-write NAME N" writes N MiB of random data to /mnt/NAME, syncs, and
# prints "DISKWROTE NAME <md5>"; "vmcsnap-disk-check NAME" prints "DISKCHECK NAME <md5>" or
# "DISKCHECK NAME missing"; "vmcsnap-umount" syncs, unmounts /mnt and prints "UMOUNTED".
set -euo pipefail
cd "$(dirname "$0")/.."
out=${VMCSNAP_GUEST_DIR:-guest/cache}
# Bump when the init script changes, so that cached guests are rebuilt.
version=5
if [ "${1:-}" != "--force" ] && [ -s "$out/vmlinux" ] && [ -s "$out/initrd.gz" ] && [ -s "$out/disk.img" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
scripts/setup.sh
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Kernel: the package linux-image-cloud-amd64 depends on.
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/{print $2; exit}')
[ -n "$pkg" ] || { echo "build-guest: cannot find the cloud kernel package (apt-get update?)" >&2; exit 1; }
(cd "$work" && apt-get download -qq "$pkg" >/dev/null 2>&1) || { echo "build-guest: cannot download $pkg" >&2; exit 1; }
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
vmlinuz=$(ls "$work"/k/boot/vmlinuz-* | head -n1)
# The bzImage payload is LZ4 legacy (magic 02 21 4c 18); decompressed it is an ELF with a PVH
# entry point, which QEMU boots directly (faster than the bzImage decompressor).
python3 - "$vmlinuz" "$work/k.lz4" <<'PY'
import sys
d = open(sys.argv[1], 'rb').read()
i = d.find(b'\x02\x21\x4c\x18')
if i < 0:
    sys.exit('build-guest: no LZ4 payload in the kernel image')
open(sys.argv[2], 'wb').write(d[i:])
PY
lz4 -dc "$work/k.lz4" > "$work/vmlinux" 2>/dev/null || true
head -c 4 "$work/vmlinux" | grep -q ELF || { echo "build-guest: kernel did not decompress to an ELF" >&2; exit 1; }

# initramfs
r="$work/initrd"
mkdir -p "$r"/{bin,proc,sys,dev,tmp,mnt,lib/modules}
cp /bin/busybox "$r/bin/"
# virtio is modular in the cloud kernel (ext4 is built in): the block driver and what it needs.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  ko=$(find "$work/k/lib/modules" -name "$m.ko*" | head -n1)
  [ -n "$ko" ] || { echo "build-guest: no $m module in $pkg" >&2; exit 1; }
  case $ko in
    *.xz) xz -dc "$ko" > "$r/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$ko" > "$r/lib/modules/$m.ko" ;;
    *) cp "$ko" "$r/lib/modules/$m.ko" ;;
  esac
done
cat > "$r/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=90% tmp /tmp
for x in $(cat /proc/cmdline); do
  case $x in
    fill=*) FILL=${x#fill=} ;;
    writer=*) WRITER=${x#writer=} ;;
    cache=*) CACHE=${x#cache=} ;;
    disk=*) DISK=${x#disk=} ;;
  esac
done
echo "BOOT-OK uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$DISK" = 1 ]; then
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko
  done
  i=0
  while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if mount -t ext4 /dev/vda /mnt; then echo "DISK-OK"; else echo "DISK-FAILED"; fi
fi
if [ -n "$FILL" ]; then
  dd if=/dev/urandom of=/tmp/fill bs=1M count="$FILL" 2>/dev/null
  echo "FILL-DONE $(md5sum /tmp/fill)"
fi
if [ -n "$CACHE" ]; then
  i=0
  : > /tmp/cache
  while [ "$i" -lt "$CACHE" ]; do
    seq $((i * 120000 + 1)) $((i * 120000 + 120000)) >> /tmp/cache
    i=$((i + 1))
  done
  echo "CACHE-DONE $(md5sum /tmp/cache | cut -d' ' -f1)"
fi
if [ "$WRITER" = 1 ]; then
  (while true; do dd if=/dev/urandom of=/tmp/writer bs=1M count=8 2>/dev/null; done) &
  echo "WRITER-STARTED"
fi
cat > /bin/vmcsnap-check <<'EOC'
#!/bin/sh
echo "CHECK $(md5sum /tmp/fill 2>/dev/null | cut -d' ' -f1) uptime=$(cut -d' ' -f1 /proc/uptime)"
EOC
chmod +x /bin/vmcsnap-check
cat > /bin/vmcsnap-write <<'EOC'
#!/bin/sh
a=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/tmp/w bs=1M count="$1" 2>/dev/null
rm -f /tmp/w
echo "WROTE $a $(cut -d' ' -f1 /proc/uptime)"
EOC
chmod +x /bin/vmcsnap-write
cat > /bin/vmcsnap-disk-write <<'EOC'
#!/bin/sh
dd if=/dev/urandom of="/mnt/$1" bs=1M count="$2" 2>/dev/null
sync
echo "DISKWROTE $1 $(md5sum "/mnt/$1" | cut -d' ' -f1)"
EOC
chmod +x /bin/vmcsnap-disk-write
cat > /bin/vmcsnap-disk-check <<'EOC'
#!/bin/sh
if [ -f "/mnt/$1" ]; then echo "DISKCHECK $1 $(md5sum "/mnt/$1" | cut -d' ' -f1)"; else echo "DISKCHECK $1 missing"; fi
EOC
chmod +x /bin/vmcsnap-disk-check
cat > /bin/vmcsnap-umount <<'EOC'
#!/bin/sh
sync
if umount /mnt; then echo "UMOUNTED"; else echo "UMOUNT-FAILED"; fi
EOC
chmod +x /bin/vmcsnap-umount
exec sh </dev/console >/dev/console 2>&1
INIT
chmod +x "$r/init"
(cd "$r" && find . | cpio -o -H newc --quiet | gzip -9) > "$work/initrd.gz"
# The disk: ext4 with a file of text every guest has alike.
mkdir -p "$work/diskroot"
seq 1 560000 > "$work/diskroot/base.txt"
# Inode tables and journal initialised now: else the guest kernel zeroes them in the background
# after the first mount, and every disk looks written to.
mke2fs -q -t ext4 -F -L vmcsnap -E lazy_itable_init=0,lazy_journal_init=0 -d "$work/diskroot" "$work/disk.img" 64M >/dev/null
cp --sparse=always "$work/disk.img" "$out/disk.img.tmp" && mv "$out/disk.img.tmp" "$out/disk.img"
cp "$work/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$work/initrd.gz" "$out/initrd.gz.tmp" && mv "$out/initrd.gz.tmp" "$out/initrd.gz"
echo "$version" > "$out/version"
echo "build-guest: $(du -h "$out/vmlinux" | cut -f1) kernel ($pkg), $(du -h "$out/initrd.gz" | cut -f1) initramfs in $out" >&2

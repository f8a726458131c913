#!/usr/bin/env python3
"""QEMU alone: the pause of its background snapshot, taken several times on one guest.

Boots the test guest (scripts/build-guest.sh builds it), then takes ROUNDS background
snapshots of it to /dev/null, one after another, and prints each one's downtime as QEMU
reports it, with the guest's AnonHugePages (transparent huge pages of QEMU's process) before
it. No vmcsnap involved: this is the default-KVM side's own pause, first and later.

Usage: scripts/qemu-bg-pause.py [--hugepages DIR] [--collapse full|all] [MEM_MIB] [ROUNDS] [GUEST_ARGS]
  e.g. scripts/qemu-bg-pause.py 1024 4 fill=128

--hugepages DIR   back guest RAM with private huge pages from the hugetlbfs mount DIR
                  (as root: mount -t hugetlbfs none DIR; echo 600 > /proc/sys/vm/nr_hugepages)
--collapse full   after each snapshot, ask the kernel (process_madvise MADV_COLLAPSE) to map
                  back in huge pages every 2 MiB range of guest RAM whose 512 pages are all
                  the guest's own (present, exclusive: no zero page), which costs no memory
--collapse all    the same for every fully mapped 2 MiB range, zero-page ranges included
                  (those become real memory: see the Rss printed)
"""
import ctypes
import json
import os
import shutil
import socket
import subprocess
import struct
import sys
import tempfile
import time

args = sys.argv[1:]
hugepages = collapse = None
while args and args[0].startswith("--"):
    flag, value = args[0], args[1]
    args = args[2:]
    if flag == "--hugepages":
        hugepages = value
    elif flag == "--collapse" and value in ("full", "all"):
        collapse = value
    else:
        raise SystemExit(f"unknown option {flag} {value}")
mem = args[0] if len(args) > 0 else "1024"
rounds = int(args[1]) if len(args) > 1 else 4
kargs = args[2] if len(args) > 2 else ""
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cache = os.path.join(root, "guest", "cache")
accel = open(os.path.join(cache, "accel")).read().strip() if os.path.exists(os.path.join(cache, "accel")) else "tcg"
work = tempfile.mkdtemp(prefix="qemu-bg-pause-")
qmp = os.path.join(work, "g.qmp")
argv = ["qemu-system-x86_64", "-accel", accel, "-cpu", "max", "-m", mem, "-display", "none", "-no-reboot",
        "-nic", "none", "-kernel", os.path.join(cache, "vmlinux"), "-initrd", os.path.join(cache, "initrd.gz"),
        "-append", f"console=ttyS0 quiet panic=-1 {kargs}", "-serial", f"file:{work}/serial.log",
        "-qmp", f"unix:{qmp},server=on,wait=off"]
if hugepages:
    argv += ["-object", f"memory-backend-file,id=ram,mem-path={hugepages},size={mem}M,share=off", "-machine", "memory-backend=ram"]


def guest_ram(pid):
    """The guest RAM's mapping in QEMU: its largest one marked for huge pages (MADV_HUGEPAGE)."""
    best = cur = None
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if "-" in f[0] and ":" not in f[0]:
            cur = tuple(int(x, 16) for x in f[0].split("-"))
        elif f[0] == "VmFlags:" and "hg" in f[1:] and (best is None or cur[1] - cur[0] > best[1] - best[0]):
            best = cur
    return best


def collapse_ram(pid, which):
    """process_madvise(MADV_COLLAPSE) on the 2 MiB ranges of guest RAM `which` selects."""
    libc = ctypes.CDLL(None, use_errno=True)
    start, end = guest_ram(pid)
    huge = 2 << 20
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    done = failed = 0
    t0 = time.monotonic()
    addr = (start + huge - 1) // huge * huge
    while addr + huge <= end:
        entries = struct.unpack("512Q", os.pread(pagemap, 512 * 8, addr // 4096 * 8))
        present = [e >> 63 & 1 for e in entries]
        own = [e >> 63 & 1 and e >> 56 & 1 for e in entries]  # present and exclusively mapped
        if all(own) or (which == "all" and all(present)):
            iov = (ctypes.c_uint64 * 2)(addr, huge)
            if libc.syscall(440, pidfd, ctypes.byref(iov), 1, 25, 0) < 0:  # process_madvise, MADV_COLLAPSE
                failed += 1
            else:
                done += 1
        addr += huge
    os.close(pagemap)
    os.close(pidfd)
    return f"collapsed {done} ranges of 2 MiB ({failed} failed) in {(time.monotonic() - t0) * 1e3:.0f} ms"


qemu = subprocess.Popen(argv)
try:
    for _ in range(200):
        if os.path.exists(qmp):
            break
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX)
    s.connect(qmp)
    f = s.makefile("rw")

    def cmd(name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        f.write(json.dumps(msg) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise SystemExit(f"{name}: {r['error']}")

    json.loads(f.readline())
    cmd("qmp_capabilities")
    ready = "FILL-DONE" if "fill=" in kargs else "BOOT-OK"
    for _ in range(600):
        if ready in open(f"{work}/serial.log", errors="replace").read():
            break
        time.sleep(0.1)
    else:
        raise SystemExit(f"the guest did not print {ready}")
    cmd("migrate-set-capabilities", {"capabilities": [{"capability": "background-snapshot", "state": True}]})
    memory = f"huge pages from {hugepages}" if hugepages else "anonymous memory"
    print(f"{mem} MiB guest ({accel}, {memory}{', ' + kargs if kargs else ''}), QEMU's own background snapshot to /dev/null:")
    for i in range(rounds):
        smaps = open(f"/proc/{qemu.pid}/smaps_rollup").read().splitlines()
        huge = next((l.split()[1] for l in smaps if l.startswith("AnonHugePages")), "?")
        rss = next((l.split()[1] for l in smaps if l.startswith("Rss")), "?")
        cmd("migrate", {"uri": "exec:cat > /dev/null"})
        while True:
            st = cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        print(f"  snapshot {i + 1}: {st['status']}, downtime {st.get('downtime')} ms; AnonHugePages before it {huge} kB, Rss {rss} kB", flush=True)
        if collapse:
            time.sleep(0.5)
            print(f"    {collapse_ram(qemu.pid, collapse)}", flush=True)
        time.sleep(2)
finally:
    qemu.kill()
    qemu.wait()
    shutil.rmtree(work, ignore_errors=True)

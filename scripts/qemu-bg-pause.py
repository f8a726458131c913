#!/usr/bin/env python3
"""QEMU alone: the pause of its background snapshot, taken several times on one guest.

Boots the test guest (scripts/build-guest.sh builds it), then takes ROUNDS background
snapshots of it to /dev/null, one after another, and prints each one's downtime as QEMU
reports it, with the guest's AnonHugePages (transparent huge pages of QEMU's process) before
it. No vmcsnap involved: this is the default-KVM side's own pause, first and later.

Usage: scripts/qemu-bg-pause.py [MEM_MIB] [ROUNDS] [GUEST_ARGS]
  e.g. scripts/qemu-bg-pause.py 1024 4 fill=128
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

mem = sys.argv[1] if len(sys.argv) > 1 else "1024"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
kargs = sys.argv[3] if len(sys.argv) > 3 else ""
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cache = os.path.join(root, "guest", "cache")
accel = open(os.path.join(cache, "accel")).read().strip() if os.path.exists(os.path.join(cache, "accel")) else "tcg"
work = tempfile.mkdtemp(prefix="qemu-bg-pause-")
qmp = os.path.join(work, "g.qmp")
argv = ["qemu-system-x86_64", "-accel", accel, "-cpu", "max", "-m", mem, "-display", "none", "-no-reboot",
        "-nic", "none", "-kernel", os.path.join(cache, "vmlinux"), "-initrd", os.path.join(cache, "initrd.gz"),
        "-append", f"console=ttyS0 quiet panic=-1 {kargs}", "-serial", f"file:{work}/serial.log",
        "-qmp", f"unix:{qmp},server=on,wait=off"]
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
    print(f"{mem} MiB guest ({accel}{', ' + kargs if kargs else ''}), QEMU's own background snapshot to /dev/null:")
    for i in range(rounds):
        smaps = open(f"/proc/{qemu.pid}/smaps_rollup").read().splitlines()
        huge = next((l.split()[1] for l in smaps if l.startswith("AnonHugePages")), "?")
        cmd("migrate", {"uri": "exec:cat > /dev/null"})
        while True:
            st = cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        print(f"  snapshot {i + 1}: {st['status']}, downtime {st.get('downtime')} ms; AnonHugePages before it {huge} kB", flush=True)
        time.sleep(2)
finally:
    qemu.kill()
    qemu.wait()
    shutil.rmtree(work, ignore_errors=True)

#!/usr/bin/env bash
# Runs a real libvirtd (the qemu:///system instance) on a machine without systemd, e.g. a CI
# container, so that tests can boot guests under libvirt (see scripts/libvirt-guest.xml.in).
#
#   scripts/libvirt.sh up     install what is missing, configure, start libvirtd in the background,
#                             return once `virsh -c qemu:///system version` answers (0 at once when
#                             some libvirtd already answers)
#   scripts/libvirt.sh down   destroy the running domains of the libvirtd that `up` started, stop
#                             that libvirtd (by its pid file) and nothing else
#
# State: $VMCSNAP_LIBVIRT_DIR (default /var/tmp/vmcsnap-libvirt): libvirtd.pid, libvirtd.log.
# Each domain's QEMU stderr goes to /var/log/libvirt/qemu/NAME.log.
#
# Packages: libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-clients only (with
# --no-install-recommends: 8 packages, no systemd, no dnsmasq, no default network).
# libvirt-daemon-system is not used; the one thing of it that libvirtd cannot do without is the
# libvirt-qemu user: Debian's libvirtd looks that compiled-in user up before it reads qemu.conf,
# and without it the QEMU driver fails ("Failed to parse user 'libvirt-qemu'").
#
# /etc/libvirt/qemu.conf (written here; any other one is kept as qemu.conf.orig):
#   user/group root      QEMU runs as root, as vmcsnap and the tests do; as libvirt-qemu it cannot
#                        create the vmcsnap QMP socket in a root-owned directory ("Failed to bind
#                        socket to ...-vmcsnap.qmp: Permission denied")
#   stdio_handler file   QEMU's stderr and the serial log go straight to files; the default
#                        ("logd") needs a running virtlogd ("Failed to connect socket to
#                        '/run/libvirt/virtlogd-sock'")
#   cgroup_controllers [] QEMU stays in libvirtd's (the caller's) cgroups; otherwise libvirt
#                        creates /sys/fs/cgroup/*/machine/qemu-N-NAME.libvirt-qemu at the top of
#                        each hierarchy and moves QEMU there, out of the session's memory cgroup
#   dynamic_ownership 0, remember_owner 0, security_driver none, namespaces []
#                        no chown and no trusted.libvirt.security.* xattrs on the guest's kernel
#                        and initrd (left behind if libvirtd dies while a domain runs), no
#                        AppArmor/SELinux, no private /dev mount namespace: nothing that a
#                        container may refuse
# QEMU's seccomp sandbox stays on as in real libvirt deployments ("-sandbox on,...,spawn=deny"):
# a migration to "exec:..." kills QEMU with SIGSYS there; vmcsnap migrates to unix: sockets.
set -euo pipefail

uri=qemu:///system
state=${VMCSNAP_LIBVIRT_DIR:-/var/tmp/vmcsnap-libvirt}
pidfile=$state/libvirtd.pid
log=$state/libvirtd.log
conf=/etc/libvirt/qemu.conf
pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)
t0=$(date +%s%N)

say() { echo "libvirt.sh: $*" >&2; }
elapsed() { echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms"; }
answers() { command -v virsh >/dev/null && timeout 10 virsh -c "$uri" version >/dev/null 2>&1; }
# Whether a process runs (a zombie does not).
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
# The pid of the libvirtd that `up` started, if it still runs.
our_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = libvirtd ] && echo "$pid"
}

write_conf() {
  local want
  want=$(cat <<'EOF'
# Written by vmcsnap's scripts/libvirt.sh: libvirtd as root in a container without systemd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
)
  if [ -f "$conf" ] && [ "$(cat "$conf")" = "$want" ]; then return; fi
  if [ -f "$conf" ] && ! grep -q "vmcsnap's scripts/libvirt.sh" "$conf" && [ ! -e "$conf.orig" ]; then
    cp -p "$conf" "$conf.orig"
  fi
  mkdir -p "$(dirname "$conf")"
  printf '%s\n' "$want" > "$conf"
}

up() {
  if answers; then
    say "libvirtd already answers on $uri ($(elapsed))"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || { say "must run as root"; exit 1; }
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    local out
    if ! out=$(apt-get update -qq 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1); then
      printf '%s\n' "$out" >&2
      say "cannot install ${missing[*]}"
      exit 1
    fi
    say "installed ($(elapsed))"
  fi
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
      --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
  write_conf
  local pid
  if ! pid=$(our_pid); then
    rm -f "$pidfile"
    echo "=== $(date -Is) libvirtd start" >> "$log"
    # Its own session, output to the log only: nothing holds the caller's pipes open.
    setsid libvirtd --pid-file "$pidfile" >> "$log" 2>&1 < /dev/null 9>&- &
    pid=$!
  fi
  # The first start on a machine probes QEMU's capabilities (some seconds, cached after in
  # /var/cache/libvirt/qemu/capabilities).
  local i
  for ((i = 0; i < 1200; i++)); do
    if answers; then
      say "libvirtd $pid answers on $uri ($(elapsed); log $log)"
      return 0
    fi
    if ! alive "$pid"; then
      say "libvirtd exited; the end of $log:"
      tail -n 20 "$log" >&2
      exit 1
    fi
    sleep 0.05
  done
  say "libvirtd $pid did not answer within 60 s; the end of $log:"
  tail -n 20 "$log" >&2
  exit 1
}

down() {
  local pid d i
  if ! pid=$(our_pid); then
    rm -f "$pidfile"
    say "no libvirtd of ours runs ($(elapsed))"
    return 0
  fi
  # QEMU outlives libvirtd: destroy the running domains first.
  for d in $(timeout 10 virsh -c "$uri" list --name 2>/dev/null || true); do
    timeout 30 virsh -c "$uri" destroy "$d" >/dev/null 2>&1 || say "cannot destroy domain $d"
  done
  kill -TERM "$pid" 2>/dev/null || true
  i=0
  while alive "$pid" && [ $i -lt 300 ]; do sleep 0.05; i=$((i + 1)); done
  if alive "$pid"; then
    say "libvirtd $pid ignores SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  say "libvirtd $pid stopped ($(elapsed))"
}

# One `up` or `down` at a time (tests may call `up` in parallel).
lock() {
  mkdir -p "$state"
  exec 9> "$state/lock"
  flock 9
}

case "${1:-}" in
  up) lock; up ;;
  down) lock; down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac

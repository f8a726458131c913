//! `vmcsnap doctor`: what works on this host for vmcsnap and, where something does not, why and
//! what to do. Each check is independent and reads the host as it is (nothing is changed).

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
    /// Works.
    Ok,
    /// Works, with less (slower, fewer features) or unknown.
    Warn,
    /// Does not work: vmcsnap cannot do its job here until fixed.
    Fail,
}

/// One check: what it looked at, the verdict, and what it found.
#[derive(Debug, Serialize)]
pub(crate) struct Check {
    pub(crate) name: &'static str,
    pub(crate) verdict: Verdict,
    pub(crate) detail: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check { name, verdict, detail: detail.into() }
}

/// The QEMU binary's version, from `--version`'s first line.
fn qemu_version(bin: &Path) -> Result<(u32, u32, String), String> {
    let out = Command::new(bin).arg("--version").output().map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_default().to_string();
    let v = line.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit())).ok_or_else(|| format!("no version in {line:?}"))?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0), line))
}

/// QEMU: present in `qemu_dir`, and new enough for live snapshots (6.0) and postcopy.
pub(crate) fn qemu(qemu_dir: &Path) -> Check {
    let bin = qemu_dir.join("qemu-system-x86_64");
    match qemu_version(&bin) {
        Err(e) => check("qemu", Verdict::Fail, format!("{e}; install QEMU (Debian: qemu-system-x86) or point --qemu-dir at it")),
        Ok((major, minor, line)) if major < 6 => {
            check("qemu", Verdict::Warn, format!("{line}: before 6.0, no background-snapshot: live mode falls back to pre-copy ({major}.{minor})"))
        }
        Ok((_, _, line)) => check("qemu", Verdict::Ok, format!("{line} ({}): live mode, postcopy restores", bin.display())),
    }
}

/// KVM: `/dev/kvm` opens read-write for this user.
pub(crate) fn kvm() -> Check {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => check("kvm", Verdict::Ok, "/dev/kvm opens read-write: guests run with KVM"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            check("kvm", Verdict::Warn, "no /dev/kvm (no virtualization extensions, or kvm_intel/kvm_amd not loaded): guests run under TCG, many times slower")
        }
        Err(e) => check("kvm", Verdict::Warn, format!("/dev/kvm: {e} (add this user to group kvm, or run as root): guests run under TCG")),
    }
}

/// userfaultfd, which QEMU's live snapshots (write protection) and postcopy restores need.
pub(crate) fn userfaultfd() -> Check {
    // SAFETY: userfaultfd(2) with O_CLOEXEC only creates a descriptor, closed at once below.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: closing the descriptor the call above returned, once.
        #[allow(unsafe_code)]
        unsafe {
            libc::close(fd as i32);
        }
        return check("userfaultfd", Verdict::Ok, "available to this user: live snapshots and lazy restores work (QEMU must run as a user that has it too)");
    }
    let err = std::io::Error::last_os_error();
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into());
    check(
        "userfaultfd",
        Verdict::Warn,
        format!("not available ({err}; vm.unprivileged_userfaultfd = {sysctl}): live mode falls back to pre-copy and restores are eager; run QEMU as root, give it CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd=1"),
    )
}

/// The system clock: synchronized (the cut's pause skew and record times rely on it).
pub(crate) fn clock() -> Check {
    let mut tx: libc::timex = unsafe_zeroed_timex();
    // SAFETY: adjtimex(2) with modes = 0 only reads the kernel's clock state into `tx`.
    #[allow(unsafe_code)]
    let state = unsafe { libc::adjtimex(&mut tx) };
    match state {
        -1 => check("clock", Verdict::Warn, format!("cannot read the clock state: {}", std::io::Error::last_os_error())),
        libc::TIME_ERROR => check("clock", Verdict::Warn, "not synchronized (no NTP): pause skews across hosts and snapshot times may be off; run chrony or systemd-timesyncd"),
        _ => check("clock", Verdict::Ok, format!("synchronized (estimated error {} µs)", tx.esterror)),
    }
}

fn unsafe_zeroed_timex() -> libc::timex {
    // SAFETY: timex is a plain C struct of integers; all-zero is a valid value (modes = 0: read).
    #[allow(unsafe_code)]
    unsafe {
        std::mem::zeroed()
    }
}

/// Free space where the node keeps its data.
pub(crate) fn disk(dir: &Path) -> Check {
    let at = std::iter::successors(Some(dir), |d| d.parent()).find(|d| d.exists()).unwrap_or(Path::new("/"));
    let Ok(c) = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()) else { return check("disk", Verdict::Warn, "a path with a NUL byte") };
    // SAFETY: an all-zero statvfs is valid; statvfs(3) fills it for a NUL-terminated path.
    #[allow(unsafe_code)]
    let (rc, st) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return check("disk", Verdict::Warn, format!("{}: {}", at.display(), std::io::Error::last_os_error()));
    }
    let free = st.f_bavail * st.f_frsize;
    let gib = free as f64 / (1u64 << 30) as f64;
    let verdict = if free < 1 << 30 { Verdict::Fail } else if free < 16 << 30 { Verdict::Warn } else { Verdict::Ok };
    check("disk", verdict, format!("{gib:.1} GiB free on {} (the node refuses pages below --min-free, default 1 GiB; a stop-copy spools up to a VM's memory there)", at.display()))
}

/// Whether RocksDB's checksums (every stored page's, at each flush) run on the CPU's
/// instruction or on the library's table-driven loop.
pub(crate) fn checksums() -> Check {
    match crate::rocksdb_crc::in_use() {
        Ok(()) => check("checksums", Verdict::Ok, "RocksDB's CRC32C runs on the CPU's SSE4.2 instruction"),
        Err(why) => check("checksums", Verdict::Warn, format!("{why}; the node's flushes take more CPU")),
    }
}

/// Where the checks look: the data directory of the node on this host.
pub(crate) fn data_dir(node: Option<&Path>) -> PathBuf {
    node.map(|p| if p.is_dir() { p.to_path_buf() } else { p.parent().map(Path::to_path_buf).unwrap_or_default() }).unwrap_or_else(|| PathBuf::from("/var/lib/vmcsnap"))
}

//! Starting a VM's recorded QEMU command line on this host, waiting for a stream.
//!
//! The command line is the one read from the captured QEMU process, adjusted: any
//! `-incoming` and `-daemonize` are dropped, and `-incoming unix:SOCK` (a socket in the node's
//! data directory) is added. QEMU runs in its own process group with its output in
//! `DIR/launch-VM.log`, so it outlives the node. Every other path (kernel, disks, QMP and
//! serial sockets) is used as recorded, so it must exist on this host.
//!
//! What may be launched is this host's decision ([`LaunchPolicy`]), never a record's: the
//! binary is the host's own `qemu-system-*` of the recorded name, from the policy's directory
//! (default `/usr/bin`); every socket or file QEMU would create, write or unlink (QMP, chardev
//! sockets and log files, serial and monitor files, pid and debug log files, guest memory's
//! `mem-path`, e.g. a hugetlbfs mount) must lie inside
//! the policy's directories; options that run host code (`-plugin`, tap `script=` and
//! `downscript=`) are refused. A record that breaks the policy is refused before anything is
//! unlinked or spawned.

use super::qmp_paths_of;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmcsnap_protocol::manifest::QemuState;

/// Time for a launched QEMU to start listening for its stream.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A QEMU started by [`launch`].
pub struct Launched {
    /// Its process id.
    pub pid: u32,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// The socket it listens on for the migration stream.
    pub incoming: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

/// The recorded command line, adjusted to wait for a stream on `incoming`.
pub fn adjusted_cmdline(cmdline: &[String], incoming: &std::path::Path) -> Vec<String> {
    let mut out = Vec::with_capacity(cmdline.len() + 2);
    let mut i = 0;
    while i < cmdline.len() {
        match cmdline[i].as_str() {
            "-incoming" => i += 2,
            "-daemonize" => i += 1,
            a => {
                out.push(a.to_string());
                i += 1;
            }
        }
    }
    out.push("-incoming".into());
    out.push(format!("unix:{}", incoming.display()));
    out
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &std::path::Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// What this host lets a restore launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPolicy {
    /// Where this host's `qemu-system-*` binaries are.
    pub qemu_dir: PathBuf,
    /// Directories QEMU's sockets and files may be in (the node's data directory, its
    /// `--vm-dir`, and any `--launch-dir`).
    pub dirs: Vec<PathBuf>,
}

/// Options that make QEMU run host code: refused whatever their value.
const HOST_CODE_OPTIONS: &[&str] = &["-plugin"];
/// Options whose value names sockets or files QEMU creates, writes or unlinks.
const PATH_OPTIONS: &[&str] =
    &["-chardev", "-qmp", "-qmp-pretty", "-monitor", "-serial", "-parallel", "-debugcon", "-mon", "-pidfile", "-D", "-mem-path", "-object"];

impl LaunchPolicy {
    /// Checks `cmdline` against the policy; returns the program to run (the host's own).
    pub fn check(&self, cmdline: &[String]) -> Result<PathBuf, LaunchError> {
        let refused = |m: String| Err(LaunchError::Refused(m));
        let Some(first) = cmdline.first() else { return refused("the snapshot has no QEMU command line".into()) };
        let name = Path::new(first).file_name().and_then(|n| n.to_str()).unwrap_or("");
        let arch = name.strip_prefix("qemu-system-").unwrap_or("");
        if arch.is_empty() || !arch.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return refused(format!("the recorded command line runs {first:?}, not a qemu-system-* binary; refusing to start it"));
        }
        let prog = self.qemu_dir.join(name);
        if !prog.is_file() {
            return refused(format!("this host has no {} (the launch policy allows QEMU from {} only)", name, self.qemu_dir.display()));
        }
        let mut i = 1;
        while i < cmdline.len() {
            let opt = cmdline[i].as_str();
            let value = cmdline.get(i + 1).map(String::as_str).unwrap_or("");
            if HOST_CODE_OPTIONS.contains(&opt) {
                return refused(format!("the recorded command line has {opt}, which runs host code; refusing to start it"));
            }
            if value.split(',').any(|kv| matches!(kv.split_once('='), Some(("script" | "downscript", v)) if v != "no" && !v.is_empty())) {
                return refused(format!("the recorded command line runs a host script ({opt} {value}); refusing to start it"));
            }
            if PATH_OPTIONS.contains(&opt) {
                for p in paths_in(opt, value) {
                    self.check_path(&p, opt)?;
                }
            }
            i += 1;
        }
        Ok(prog)
    }

    fn check_path(&self, p: &str, opt: &str) -> Result<(), LaunchError> {
        let path = Path::new(p);
        let inside = path.is_absolute()
            && !path.components().any(|c| matches!(c, Component::ParentDir))
            && self.dirs.iter().any(|d| path.starts_with(d));
        if !inside {
            return Err(LaunchError::Refused(format!(
                "the recorded command line's {opt} uses {p}, outside the directories this host's launch policy allows ({}); refusing to start it",
                self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }
}

/// The paths in an option's value: `unix:P`, `file:P`, `path=P`, `logfile=P`, `mem-path=P` (a
/// memory backend's file or directory), or the value itself for options that take a file name.
fn paths_in(opt: &str, value: &str) -> Vec<String> {
    if matches!(opt, "-pidfile" | "-D" | "-mem-path") {
        return vec![value.to_string()];
    }
    let mut out = Vec::new();
    for (k, part) in value.split(',').enumerate() {
        if k == 0 {
            for prefix in ["unix:", "file:", "pipe:"] {
                if let Some(p) = part.strip_prefix(prefix) {
                    out.push(p.to_string());
                }
            }
        }
        if let Some((key, v)) = part.split_once('=') {
            if matches!(key, "path" | "logfile" | "mem-path") {
                out.push(v.to_string());
            }
        }
    }
    out
}

/// Why a QEMU could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The recorded command line cannot or must not be started here.
    #[error("{0}")]
    Refused(String),
    /// QEMU did not start, or did not start listening.
    #[error("{0}")]
    Failed(String),
}

/// Starts the VM's QEMU on this host, waiting for its migration stream. `beside` runs as soon
/// as QEMU is started, with its monitor's path (its socket may not be there yet); what it
/// returns comes back with the launch.
pub fn launch<T>(data_dir: &std::path::Path, vm: &str, state: &QemuState, policy: &LaunchPolicy, beside: impl FnOnce(&std::path::Path) -> T) -> Result<(Launched, T), LaunchError> {
    // A record can come from any member: the host's policy decides, before anything is touched.
    let prog = policy.check(&state.cmdline)?;
    // The monitor the VM was captured through (of several, the one its manager left to
    // vmcsnap), else its first.
    let monitors = qmp_paths_of(&state.cmdline);
    let qmp = monitors.iter().find(|p| **p == state.qmp).or(monitors.first()).cloned().ok_or_else(|| {
        LaunchError::Refused(
            "the recorded command line has no -qmp unix:PATH; start QEMU yourself with -incoming unix:PATH and restore with --to qemu:unix:PATH".into(),
        )
    })?;
    let qmp = PathBuf::from(qmp);
    if std::os::unix::net::UnixStream::connect(&qmp).is_ok() {
        return Err(LaunchError::Refused(format!("QMP socket {} is in use: a QEMU with it is still running here (stop it first)", qmp.display())));
    }
    // Stale sockets of the old QEMU go first, so that a socket file appearing means the new
    // QEMU is listening (probing by connecting would take QEMU's one monitor client, or worse,
    // be taken as the migration stream).
    let _ = std::fs::remove_file(&qmp);
    let incoming = data_dir.join(format!("incoming-{vm}.sock"));
    let _ = std::fs::remove_file(&incoming);
    let log = data_dir.join(format!("launch-{vm}.log"));
    let argv = adjusted_cmdline(&state.cmdline, &incoming);
    let failed = LaunchError::Failed;
    let out = std::fs::File::create(&log).map_err(|e| failed(format!("cannot create {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| failed(e.to_string()))?;
    let mut cmd = Command::new(&prog);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(out).stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| failed(format!("cannot start {}: {e}", prog.display())))?;
    let pid = child.id();
    let besides = beside(&qmp);
    let t0 = Instant::now();
    loop {
        use std::os::unix::fs::FileTypeExt;
        let is_socket = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.file_type().is_socket()).unwrap_or(false);
        if is_socket(&incoming) && is_socket(&qmp) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(failed(format!("QEMU exited ({st}) before listening: {}", log_tail(&log))));
        }
        if t0.elapsed() > LAUNCH_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("QEMU did not start listening within {LAUNCH_TIMEOUT:?}: {}", log_tail(&log))));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Reap it when it exits, whenever that is.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok((Launched { pid, qmp, incoming, log }, besides))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> LaunchPolicy {
        LaunchPolicy { qemu_dir: PathBuf::from("/usr/bin"), dirs: vec![dir.to_path_buf()] }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_host_policy_decides_what_runs() {
        if !Path::new("/usr/bin/qemu-system-x86_64").is_file() {
            eprintln!("no /usr/bin/qemu-system-x86_64 here: policy test skipped");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display().to_string();
        let p = policy(dir.path());
        let ok = args(&[
            "/some/where/qemu-system-x86_64",
            "-m",
            "128",
            "-qmp",
            &format!("unix:{d}/v.qmp,server=on,wait=off"),
            "-chardev",
            &format!("socket,id=s,path={d}/v.ser,server=on,logfile={d}/v.log"),
            "-object",
            &format!("memory-backend-file,id=m0,mem-path={d}/huge,size=128M,share=off"),
            "-object",
            "memory-backend-memfd,id=m1,hugetlb=on,size=128M",
        ]);
        // The host's own binary runs, whatever path the record names.
        assert_eq!(p.check(&ok).expect("allowed"), PathBuf::from("/usr/bin/qemu-system-x86_64"));
        let refused: Vec<Vec<String>> = vec![
            args(&["/tmp/x/evil", "-m", "128"]),
            args(&["qemu-system-x86_64;rm", "-m", "128"]),
            args(&["qemu-system-nosuch", "-m", "128"]),
            args(&["qemu-system-x86_64", "-plugin", "/tmp/evil.so"]),
            args(&["qemu-system-x86_64", "-netdev", "tap,id=n,script=/tmp/evil.sh"]),
            args(&["qemu-system-x86_64", "-qmp", "unix:/etc/passwd,server=on"]),
            args(&["qemu-system-x86_64", "-chardev", "file,id=f,path=/etc/shadow"]),
            args(&["qemu-system-x86_64", "-chardev", &format!("socket,id=s,path={d}/../../etc/x,server=on")]),
            args(&["qemu-system-x86_64", "-serial", "file:/root/.bashrc"]),
            args(&["qemu-system-x86_64", "-pidfile", "/etc/motd"]),
            args(&["qemu-system-x86_64", "-mem-path", "/etc/motd"]),
            args(&["qemu-system-x86_64", "-object", "memory-backend-file,id=m0,mem-path=/etc/motd,size=128M,share=on"]),
        ];
        for c in refused {
            assert!(matches!(p.check(&c), Err(LaunchError::Refused(_))), "{c:?} was allowed");
        }
    }

    #[test]
    fn a_refused_record_touches_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        let state = QemuState {
            qmp: victim.display().to_string(),
            head: vec![],
            machine: String::new(),
            ram_section: (0, 0, 0),
            footers: false,
            device_state: vmcsnap_protocol::manifest::BlobRef { len: 0, chunks: vec![] },
            qemu_version: String::new(),
            accel: "tcg".into(),
            cmdline: args(&["qemu-system-x86_64", "-qmp", &format!("unix:{},server=on,wait=off", victim.display())]),
            mode: vmcsnap_protocol::manifest::CaptureMode::StopCopy,
            was_running: true,
        };
        assert!(matches!(launch(dir.path(), "v", &state, &policy(dir.path()), |_| ()), Err(LaunchError::Refused(_))));
        assert_eq!(std::fs::read(&victim).expect("still there"), b"keep");
        assert!(!dir.path().join("launch-v.log").exists(), "nothing was started");
    }

    #[test]
    fn cmdline_is_adjusted_for_incoming() {
        let c: Vec<String> = ["qemu", "-m", "256", "-daemonize", "-incoming", "defer", "-qmp", "unix:/q,server=on"].iter().map(|s| s.to_string()).collect();
        let a = adjusted_cmdline(&c, std::path::Path::new("/d/in.sock"));
        assert_eq!(a, ["qemu", "-m", "256", "-qmp", "unix:/q,server=on", "-incoming", "unix:/d/in.sock"]);
    }
}

//! Starting a VM's recorded QEMU command line on this host, waiting for a stream.
//!
//! The command line is the one read from the captured QEMU process, adjusted: any
//! `-incoming` and `-daemonize` are dropped, and `-incoming unix:SOCK` (a socket in the node's
//! data directory) is added. QEMU runs in its own process group with its output in
//! `DIR/launch-VM.log`, so it outlives the node. Every other path (kernel, disks, QMP and
//! serial sockets) is used as recorded, so it must exist on this host.

use super::qmp_path_of;
use std::path::PathBuf;
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

/// Starts the VM's QEMU on this host, waiting for its migration stream.
pub fn launch(data_dir: &std::path::Path, vm: &str, state: &QemuState) -> Result<Launched, LaunchError> {
    if state.cmdline.is_empty() {
        return Err(LaunchError::Refused("the snapshot has no QEMU command line".into()));
    }
    // A record can come from any member: run QEMU and nothing else.
    let prog = std::path::Path::new(&state.cmdline[0]).file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !prog.starts_with("qemu-system-") {
        return Err(LaunchError::Refused(format!(
            "the recorded command line runs {:?}, not a qemu-system-* binary; refusing to start it",
            state.cmdline[0]
        )));
    }
    let qmp = qmp_path_of(&state.cmdline).ok_or_else(|| {
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
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(out).stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| failed(format!("cannot start {}: {e}", argv[0])))?;
    let pid = child.id();
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
        std::thread::sleep(Duration::from_millis(10));
    }
    // Reap it when it exits, whenever that is.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(Launched { pid, qmp, incoming, log })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_adjusted_for_incoming() {
        let c: Vec<String> = ["qemu", "-m", "256", "-daemonize", "-incoming", "defer", "-qmp", "unix:/q,server=on"].iter().map(|s| s.to_string()).collect();
        let a = adjusted_cmdline(&c, std::path::Path::new("/d/in.sock"));
        assert_eq!(a, ["qemu", "-m", "256", "-qmp", "unix:/q,server=on", "-incoming", "unix:/d/in.sock"]);
    }
}

//! The stream relay of a live capture: a small process (`vmcsnap stream-relay LISTEN TO`, the
//! node's own binary) that QEMU's migration connects to and that passes the stream on to the
//! node's capture socket — and, should the node die or stop reading, reads the rest of the
//! stream and drops it. QEMU's background snapshot then ends as a completed one, which releases
//! its write protection; one that breaks off can deadlock QEMU 7.2 under TCG (see
//! [`super::qmp::Qmp::cancel_migration`]).
//!
//! The node starts the relay before the cut's barrier, so that QEMU's `migrate` at `Release`
//! costs the paused VM no process start.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// The hidden subcommand of the `vmcsnap` binary that runs [`run`].
pub const SUBCOMMAND: &str = "stream-relay";

/// Time the relay has to start and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay process listening for QEMU; killed when dropped (by then QEMU's stream has ended,
/// or never began).
pub struct Relay {
    child: tokio::process::Child,
    /// The socket QEMU's `migrate` connects to.
    pub listen: PathBuf,
}

impl Relay {
    /// Starts a relay listening on `listen` that passes what it receives on to `to`; returns
    /// once it listens.
    pub async fn start(listen: &Path, to: &Path) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmcsnap binary for the stream relay: {e}"))?;
        let mut child = tokio::process::Command::new(&exe)
            .arg(SUBCOMMAND)
            .arg(listen)
            .arg(to)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a ^C to the node's must not end a stream it drains.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the stream relay {}: {e}", exe.display()))?;
        let stdout = child.stdout.take().ok_or("the stream relay has no output")?;
        let mut line = String::new();
        let ready = tokio::time::timeout(READY_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line)).await;
        if !matches!(ready, Ok(Ok(_)) if line.trim() == "ready") {
            return Err(format!("the stream relay did not start listening on {}", listen.display()));
        }
        Ok(Self { child, listen: listen.to_path_buf() })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.listen);
    }
}

/// Listens on `listen`, says `ready` on standard output, takes one connection and copies it
/// to the unix socket `to` until its end; from the first failure to connect or write on,
/// drains the connection instead. Gives up waiting for the connection once the node that
/// started it is gone. Returns the exit status: 0 when every byte was delivered.
pub fn run(listen: &Path, to: &Path) -> i32 {
    let _ = std::fs::remove_file(listen);
    let l = match UnixListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stream-relay: cannot listen on {}: {e}", listen.display());
            return 2;
        }
    };
    let node = std::os::unix::process::parent_id();
    println!("ready");
    let _ = std::io::stdout().flush();
    if l.set_nonblocking(true).is_err() {
        return 2;
    }
    let mut conn = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::os::unix::process::parent_id() != node {
                    let _ = std::fs::remove_file(listen);
                    return 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return 2,
        }
    };
    drop(l);
    let _ = std::fs::remove_file(listen);
    if conn.set_nonblocking(false).is_err() {
        return 2;
    }
    let mut out = UnixStream::connect(to).ok();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return if out.is_some() { 0 } else { 1 },
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return 1,
        };
        if let Some(o) = out.as_mut() {
            if o.write_all(&buf[..n]).is_err() {
                out = None;
            }
        }
    }
}

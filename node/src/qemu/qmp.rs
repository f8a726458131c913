//! A small QMP client: JSON commands over QEMU's monitor socket.

use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Time for one QMP command to answer.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest QMP line accepted.
pub const QMP_LINE_BYTES_MAX: usize = 4 << 20;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Could not reach the socket.
    #[error("cannot connect to QMP socket {path}: {reason}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The monitor went away or sent nonsense.
    #[error("QMP: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QEMU's error description.
        desc: String,
    },
}

/// What one message from QEMU means for `command` waiting on it: `None` for an event or an
/// answer to another client (keep reading), else its result or error.
///
/// This client never sends an `id`, so an answer that carries one was meant for an earlier
/// client: QEMU keeps monitor output it could not deliver (its client hung up while a command
/// ran, as a lazy restore's monitor keeper does when the migration completes) and writes it to
/// the next client, before even the greeting.
pub fn reply(command: &str, mut v: Value) -> Option<Result<Value, QmpError>> {
    if v.get("event").is_some() || v.get("id").is_some() {
        return None;
    }
    if let Some(r) = v.get_mut("return") {
        return Some(Ok(r.take()));
    }
    if let Some(e) = v.get("error") {
        return Some(Err(QmpError::Refused {
            command: command.to_string(),
            desc: e.get("desc").and_then(|d| d.as_str()).unwrap_or("unknown error").to_string(),
        }));
    }
    Some(Err(QmpError::Protocol(format!("unexpected QMP message: {v}"))))
}

/// Whether a migration in status `status` (`query-migrate`) is still under way.
pub fn migration_active(status: &str) -> bool {
    matches!(status, "setup" | "active" | "pre-switchover" | "device" | "postcopy-active" | "cancelling" | "wait-unplug")
}

/// Most messages left over from an earlier client skipped before QEMU's greeting.
const GREETING_SKIP_MAX: usize = 64;

/// A connected, negotiated QMP session.
pub struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    pid: Option<u32>,
    /// When QEMU last reported the VM stopped and resumed (`STOP`/`RESUME` events, µs since
    /// the epoch by QEMU's clock): the pause as the guest had it.
    stopped_us: Option<u64>,
    resumed_us: Option<u64>,
    /// Commands sent whose answers were not read yet. More than one while a command runs
    /// means an earlier one timed out or was abandoned: its answer, when it comes, is
    /// skipped (QEMU answers in order), never taken for a later command's.
    pending: usize,
    /// The message being read: a read given up part-way (its command abandoned) leaves its
    /// bytes here for the next one.
    line: Vec<u8>,
}

impl Qmp {
    /// Connects and leaves capability negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let connect_err = |reason: String| QmpError::Connect { path: path.display().to_string(), reason };
        let s = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let pid = s.peer_cred().ok().and_then(|c| c.pid()).map(|p| p as u32);
        let (rd, wr) = s.into_split();
        let mut q = Self { rd: BufReader::new(rd), wr, pid, stopped_us: None, resumed_us: None, pending: 0, line: Vec::new() };
        let mut skipped = 0;
        loop {
            let v = q.read_value().await?;
            if v.get("QMP").is_some() {
                break;
            }
            // What `reply` would skip (an event, another client's answer) may come first.
            if skipped >= GREETING_SKIP_MAX || reply("", v.clone()).is_some() {
                return Err(QmpError::Protocol(format!("not a QMP greeting: {v}")));
            }
            skipped += 1;
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    /// The QEMU process id (from the socket's peer credentials).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    async fn read_value(&mut self) -> Result<Value, QmpError> {
        tokio::time::timeout(QMP_TIMEOUT, self.next_value()).await.map_err(|_| QmpError::Protocol("QEMU did not answer in time".into()))?
    }

    /// The next message. Cancel-safe: what was read of a message given up part-way (its
    /// command abandoned, as `select!` and `timeout` do) stays in `self.line` for the next
    /// call.
    async fn next_value(&mut self) -> Result<Value, QmpError> {
        let left = QMP_LINE_BYTES_MAX.saturating_sub(self.line.len()) as u64;
        (&mut self.rd).take(left).read_until(b'\n', &mut self.line).await.map_err(|e| QmpError::Protocol(e.to_string()))?;
        if !self.line.ends_with(b"\n") {
            return Err(QmpError::Protocol(if self.line.len() >= QMP_LINE_BYTES_MAX {
                format!("a message from QEMU longer than {QMP_LINE_BYTES_MAX} bytes")
            } else {
                "QEMU closed the monitor".into()
            }));
        }
        let line = std::mem::take(&mut self.line);
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")))
    }

    /// Notes the VM's stops and resumes from a message, if it is such an event.
    fn note_event(&mut self, v: &Value) {
        if let Some(event) = v.get("event").and_then(|e| e.as_str()) {
            let ts = &v["timestamp"];
            let us = ts["seconds"].as_u64().zip(ts["microseconds"].as_u64()).map(|(s, u)| s * 1_000_000 + u);
            match event {
                "STOP" => self.stopped_us = us,
                "RESUME" => self.resumed_us = us,
                _ => {}
            }
        }
    }

    /// Runs `command` with `arguments`; returns its `return` value. Events are skipped.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = if arguments.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut line = msg.to_string();
        line.push('\n');
        self.wr.write_all(line.as_bytes()).await.map_err(|e| QmpError::Protocol(e.to_string()))?;
        self.answer(command).await
    }

    /// [`Qmp::execute`] with a file descriptor passed along (`SCM_RIGHTS`), as `getfd` and
    /// `add-fd` take theirs.
    pub async fn execute_with_fd(&mut self, command: &str, arguments: Value, fd: std::os::fd::BorrowedFd<'_>) -> Result<Value, QmpError> {
        use std::os::fd::AsRawFd;
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        let sock = self.wr.as_ref();
        let sent = loop {
            sock.writable().await.map_err(|e| QmpError::Protocol(e.to_string()))?;
            match sock.try_io(tokio::io::Interest::WRITABLE, || send_with_fd(sock.as_raw_fd(), line.as_bytes(), fd.as_raw_fd())) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(QmpError::Protocol(format!("cannot pass a file descriptor to QEMU: {e}"))),
            }
        };
        // The descriptor went with the first byte; the rest of a short send follows.
        self.wr.write_all(&line.as_bytes()[sent..]).await.map_err(|e| QmpError::Protocol(e.to_string()))?;
        self.answer(command).await
    }

    /// Starts a migration into `fd`: passes it to QEMU under `name` (`getfd`) and sends
    /// `migrate fd:name`; if QEMU refuses the migration, its copy of the descriptor is closed
    /// again (`closefd`).
    pub async fn migrate_to_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd).await?;
        if let Err(e) = self.execute("migrate", json!({ "uri": format!("fd:{name}") })).await {
            let _ = self.execute("closefd", json!({ "fdname": name })).await;
            return Err(e);
        }
        Ok(())
    }

    /// Reads the answer to `command`, just sent.
    async fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        self.pending += 1;
        loop {
            let v = self.read_value().await?;
            self.note_event(&v);
            if let Some(r) = reply(command, v) {
                self.pending -= 1;
                if self.pending == 0 {
                    return r;
                }
                tracing::debug!(target: "vmcsnap::qmp", command, "skipped the late answer to an earlier command");
            }
        }
    }

    /// Resolves once QEMU reports the VM stopped (a `STOP` event on this connection, read
    /// now or earlier and not followed by a `RESUME`), sending nothing: for a wait in which
    /// QEMU may pause the VM on its own. Answers to abandoned commands that come meanwhile
    /// are skipped. Cancel-safe; an error if the monitor closes.
    pub async fn stop_seen(&mut self) -> Result<(), QmpError> {
        loop {
            if self.stopped_us.is_some_and(|s| self.resumed_us.is_none_or(|r| s > r)) {
                return Ok(());
            }
            let v = self.next_value().await?;
            self.note_event(&v);
            if reply("", v).is_some() {
                self.pending = self.pending.saturating_sub(1);
            }
        }
    }

    /// The last pause QEMU reported on this connection: (stopped, resumed), µs since the
    /// epoch, if it reported both and in that order.
    pub fn reported_pause(&self) -> Option<(u64, u64)> {
        self.reported_pause_inner()
    }

    /// When QEMU last reported the VM resumed (`RESUME`) on this connection, µs since the
    /// epoch.
    pub fn last_resume(&self) -> Option<u64> {
        self.resumed_us
    }

    fn reported_pause_inner(&self) -> Option<(u64, u64)> {
        self.stopped_us.zip(self.resumed_us).filter(|(s, r)| r >= s)
    }

    /// The run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", json!({})).await?;
        Ok(v.get("status").and_then(|s| s.as_str()).unwrap_or("unknown").to_string())
    }

    /// `query-migrate`'s answer.
    pub async fn migrate_info(&mut self) -> Result<Value, QmpError> {
        self.execute("query-migrate", json!({})).await
    }

    /// The migration's status (`active`, `completed`, ...), `none` when there is none.
    pub async fn migrate_status(&mut self) -> Result<String, QmpError> {
        let info = self.migrate_info().await?;
        Ok(info.get("status").and_then(|s| s.as_str()).unwrap_or("none").to_string())
    }

    /// QEMU's version (`7.2.22`).
    pub async fn version(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-version", json!({})).await?;
        Ok(format!(
            "{}.{}.{}",
            v["qemu"]["major"].as_u64().unwrap_or(0),
            v["qemu"]["minor"].as_u64().unwrap_or(0),
            v["qemu"]["micro"].as_u64().unwrap_or(0)
        ))
    }

    /// The accelerator: `kvm` or `tcg`.
    pub async fn accel(&mut self) -> Result<String, QmpError> {
        let kvm = self.execute("query-kvm", json!({})).await?;
        Ok(if kvm["enabled"].as_bool().unwrap_or(false) { "kvm" } else { "tcg" }.to_string())
    }

    /// The QEMU process's command line (from `/proc/PID/cmdline`, the PID from the socket's
    /// peer credentials), with the program replaced by the binary the process really runs
    /// (`/proc/PID/exe`): a process can rewrite its own argv, not what the kernel executed.
    pub fn cmdline(&self) -> Result<Vec<String>, QmpError> {
        let pid = self.pid.ok_or_else(|| QmpError::Protocol("cannot tell which process serves the QMP socket".into()))?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| QmpError::Protocol(format!("cannot read QEMU's command line: {e}")))?;
        let mut argv: Vec<String> = raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| QmpError::Protocol(format!("cannot tell which binary QEMU runs (/proc/{pid}/exe): {e}")))?;
        // A binary replaced by a package upgrade while QEMU runs reads "PATH (deleted)".
        let exe = exe.to_string_lossy();
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe).to_string();
        match argv.first_mut() {
            Some(a0) => *a0 = exe,
            None => argv.push(exe),
        }
        Ok(argv)
    }

    /// Waits (up to `timeout`) for a migration whose stream has ended to be `completed`;
    /// returns QEMU's downtime in ms, if it says.
    pub async fn wait_migration_completed(&mut self, timeout: Duration) -> Result<Option<u64>, QmpError> {
        let t0 = std::time::Instant::now();
        loop {
            let info = self.migrate_info().await?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(info.get("downtime").and_then(|d| d.as_u64())),
                Some(st @ ("failed" | "cancelled")) => {
                    return Err(QmpError::Protocol(format!("QEMU reports the migration {st}")));
                }
                _ if t0.elapsed() > timeout => return Err(QmpError::Protocol("QEMU did not finish the migration".into())),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Ends a migration under way; returns whether it stopped the VM (the caller then resumes
    /// it, with [`Qmp::resume_settled`]).
    ///
    /// A background snapshot (live capture) is not cancelled: QEMU 7.2 leaves pages of a
    /// cancelled one write-protected, and the guest hangs at its next write to one of them
    /// (seen here under TCG). It is left to complete — whoever reads its stream must drain
    /// it (a live capture's relay does) — and waited for while it makes progress; only one
    /// that made none for `timeout` is cancelled, as a last resort. Any other migration is
    /// cancelled with the VM stopped first (a stopped VM touches no memory) and waited for
    /// (up to `timeout`) until QEMU has cleaned up.
    pub async fn cancel_migration(&mut self, timeout: Duration) -> Result<bool, QmpError> {
        let active = migration_active;
        let info = self.migrate_info().await?;
        if !active(info["status"].as_str().unwrap_or("none")) {
            return Ok(false);
        }
        let caps = self.execute("query-migrate-capabilities", json!({})).await?;
        let background = caps.as_array().into_iter().flatten().any(|c| c["capability"] == "background-snapshot" && c["state"] == true);
        if background {
            let (mut sent, mut since) = (info["ram"]["transferred"].as_u64(), std::time::Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let info = self.migrate_info().await?;
                if !active(info["status"].as_str().unwrap_or("none")) {
                    return Ok(false);
                }
                let now = info["ram"]["transferred"].as_u64();
                if now != sent {
                    (sent, since) = (now, std::time::Instant::now());
                } else if since.elapsed() > timeout {
                    tracing::warn!(target: "vmcsnap::snapshot", "a background snapshot made no progress for {timeout:?}; cancelling it (QEMU may leave the guest's memory write-protected)");
                    break;
                }
            }
        }
        let mut stopped = false;
        let t0 = std::time::Instant::now();
        let mut cancelled = false;
        loop {
            if self.status().await? == "running" {
                self.execute("stop", json!({})).await?;
                stopped = true;
            }
            if !cancelled {
                self.execute("migrate_cancel", json!({})).await?;
                cancelled = true;
            }
            let st = self.migrate_status().await?;
            if !active(&st) {
                return Ok(stopped);
            }
            if t0.elapsed() > timeout {
                return Err(QmpError::Protocol(format!("QEMU did not end the migration within {timeout:?} (still {st})")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resumes a VM that a migration left paused (`cont`) as soon as QEMU takes it: QEMU
    /// refuses ("Migration is not finalized yet") while it finalizes the migration (runstate
    /// `finish-migrate`, from the stream's last byte until it marks the migration done), so the
    /// command goes again every millisecond until taken, for up to `timeout`. Any other
    /// refusal is returned at once.
    pub async fn cont_when_finalized(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let t0 = std::time::Instant::now();
        loop {
            match self.execute("cont", json!({})).await {
                Err(QmpError::Refused { desc, .. }) if desc.contains("not finalized") && t0.elapsed() < timeout => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                r => return r.map(drop),
            }
        }
    }

    /// Leaves the VM running if a migration (finished, failed or cancelled) left it paused:
    /// waits out QEMU's passing states (`finish-migrate`, `cancelling`) for up to `timeout`,
    /// then `cont`s a `paused` or `postmigrate` VM.
    pub async fn resume_settled(&mut self, timeout: Duration) -> Result<Settled, QmpError> {
        let t0 = std::time::Instant::now();
        loop {
            let s = self.status().await?;
            match s.as_str() {
                "running" => return Ok(Settled::Running),
                "paused" | "postmigrate" => {
                    self.execute("cont", json!({})).await?;
                    return Ok(Settled::Resumed(s));
                }
                "finish-migrate" | "cancelling" | "save-vm" => {
                    if t0.elapsed() > timeout {
                        return Err(QmpError::Protocol(format!("QEMU did not settle within {timeout:?} (still {s})")));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => return Ok(Settled::Other(s)),
            }
        }
    }
}

/// What [`Qmp::resume_settled`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The VM was running.
    Running,
    /// The VM was in this state and is running now.
    Resumed(String),
    /// The VM is in a state that `cont` does not leave (`shutdown`, `inmigrate`, ...).
    Other(String),
}

/// sendmsg(2) of `data` on the socket `sock` with the descriptor `fd` attached
/// (`SCM_RIGHTS`); returns the bytes sent (at least one, or an error).
#[allow(unsafe_code)]
pub(super) fn send_with_fd(sock: std::os::fd::RawFd, data: &[u8], fd: std::os::fd::RawFd) -> std::io::Result<usize> {
    const FD_BYTES: u32 = std::mem::size_of::<std::os::fd::RawFd>() as u32;
    // u64s: a control buffer aligned as a `cmsghdr` must be.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: `msghdr` is plain data (all-zero is valid: no name, no buffers); the pointers set
    // below point at `iov` and `control`, which outlive the sendmsg(2) call; CMSG_SPACE(4) is
    // 24 bytes on every Linux target, within `control`'s 32, so CMSG_FIRSTHDR is non-null and
    // the header and the descriptor written through it stay inside `control`; sendmsg only
    // reads `data` (through `iov`) and the control buffer, and a failure changes nothing.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(FD_BYTES) as _;
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(FD_BYTES) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<std::os::fd::RawFd>(), fd);
        let n = libc::sendmsg(sock, &raw const msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// What QEMU 7.2 sent a node once (a lazy restore's cluster rollback): the answer to the
    /// monitor keeper's last command, which the keeper hung up on, came to the next client
    /// before the greeting. Answers carrying an `id` (this client sends none) are skipped,
    /// before the greeting and after.
    #[tokio::test]
    async fn answers_left_over_from_an_earlier_client_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            wr.write_all(b"{\"id\":\"keeper-2\",\"return\":{\"status\":\"completed\"}}\n").await.expect("write");
            wr.write_all(b"{\"QMP\":{\"version\":{},\"capabilities\":[\"oob\"]}}\n").await.expect("write");
            let mut line = String::new();
            rd.read_line(&mut line).await.expect("read");
            assert!(line.contains("qmp_capabilities"), "{line}");
            wr.write_all(b"{\"return\":{}}\n").await.expect("write");
            line.clear();
            rd.read_line(&mut line).await.expect("read");
            assert!(line.contains("query-status"), "{line}");
            wr.write_all(b"{\"id\":\"keeper-3\",\"return\":{\"status\":\"postcopy-active\"}}\n").await.expect("write");
            wr.write_all(b"{\"return\":{\"status\":\"running\",\"running\":true}}\n").await.expect("write");
        });
        let mut q = Qmp::connect(&path).await.expect("connects past the stale answer");
        let v = q.execute("query-status", json!({})).await.expect("answer");
        assert_eq!(v["status"], "running");
        server.await.expect("server");
    }

    /// A fake QEMU's side of a session, past the greeting and `qmp_capabilities`: reads one
    /// command line at a time, writes raw bytes.
    struct Fake {
        rd: BufReader<tokio::net::unix::OwnedReadHalf>,
        wr: tokio::net::unix::OwnedWriteHalf,
    }

    impl Fake {
        /// Listens at a fresh socket; the path and the task that accepts one client.
        fn listen() -> (tempfile::TempDir, std::path::PathBuf, tokio::task::JoinHandle<Fake>) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("qmp.sock");
            let l = tokio::net::UnixListener::bind(&path).expect("bind");
            let accept = tokio::spawn(async move {
                let (s, _) = l.accept().await.expect("accept");
                let (rd, wr) = s.into_split();
                let mut f = Fake { rd: BufReader::new(rd), wr };
                f.write(b"{\"QMP\":{\"version\":{},\"capabilities\":[]}}\n").await;
                assert!(f.command().await.contains("qmp_capabilities"));
                f.write(b"{\"return\":{}}\n").await;
                f
            });
            (dir, path, accept)
        }

        async fn command(&mut self) -> String {
            let mut line = String::new();
            self.rd.read_line(&mut line).await.expect("read");
            line
        }

        async fn write(&mut self, bytes: &[u8]) {
            self.wr.write_all(bytes).await.expect("write");
        }
    }

    /// A wait for QEMU to pause the VM on its own: the late answer to an abandoned command
    /// and other events pass, the `STOP` event ends it (and a second wait at once, until a
    /// `RESUME`); the next command still gets its own answer.
    #[tokio::test]
    async fn a_stop_is_seen_without_a_command_and_a_late_answer_passes() {
        let (_dir, path, accept) = Fake::listen();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut f = accept.await.expect("accept");
            let line = f.command().await;
            assert!(line.contains("query-migrate"), "{line}");
            go_rx.await.expect("waiting");
            f.write(b"{\"return\":{\"status\":\"active\"}}\n").await;
            f.write(b"{\"event\":\"MIGRATION_PASS\",\"timestamp\":{\"seconds\":1,\"microseconds\":0}}\n").await;
            f.write(b"{\"event\":\"STOP\",\"timestamp\":{\"seconds\":2,\"microseconds\":0}}\n").await;
            let line = f.command().await;
            assert!(line.contains("query-status"), "{line}");
            f.write(b"{\"return\":{\"status\":\"finish-migrate\",\"running\":false}}\n").await;
        });
        let mut q = Qmp::connect(&path).await.expect("connect");
        let abandoned = tokio::time::timeout(Duration::from_millis(50), q.execute("query-migrate", json!({}))).await;
        assert!(abandoned.is_err(), "no answer yet");
        let early = tokio::time::timeout(Duration::from_millis(50), q.stop_seen()).await;
        assert!(early.is_err(), "nothing stopped yet");
        go_tx.send(()).expect("server waits");
        tokio::time::timeout(Duration::from_secs(5), q.stop_seen()).await.expect("STOP seen").expect("monitor open");
        tokio::time::timeout(Duration::from_millis(50), q.stop_seen()).await.expect("still stopped").expect("monitor open");
        assert_eq!(q.status().await.expect("its own answer"), "finish-migrate");
        server.await.expect("server");
    }

    /// `cont` right after a migration's last byte: QEMU refuses it until the migration is
    /// finalized, then takes it; another refusal ends the wait at once.
    #[tokio::test]
    async fn cont_is_sent_again_until_the_migration_is_finalized() {
        let (_dir, path, accept) = Fake::listen();
        let server = tokio::spawn(async move {
            let mut f = accept.await.expect("accept");
            for answer in [
                &b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"Migration is not finalized yet\"}}\n"[..],
                b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"Migration is not finalized yet\"}}\n",
                b"{\"return\":{}}\n",
                b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"Resetting the Virtual Machine is required\"}}\n",
            ] {
                let line = f.command().await;
                assert!(line.contains("\"cont\""), "{line}");
                f.write(answer).await;
            }
        });
        let mut q = Qmp::connect(&path).await.expect("connect");
        q.cont_when_finalized(Duration::from_secs(5)).await.expect("taken at the third");
        let e = q.cont_when_finalized(Duration::from_secs(5)).await.expect_err("not a wait");
        assert!(e.to_string().contains("Resetting"), "{e}");
        server.await.expect("server");
    }

    /// Once seen with QEMU 7.2: a command timed out while QEMU's main loop was blocked; its
    /// answer came later and was read as the next command's (`query-status` said the VM was
    /// "completed"). The late answer is now skipped.
    #[tokio::test]
    async fn a_late_answer_is_not_taken_for_the_next_commands() {
        let (_dir, path, accept) = Fake::listen();
        let server = tokio::spawn(async move {
            let mut f = accept.await.expect("accept");
            let line = f.command().await;
            assert!(line.contains("query-migrate"), "{line}");
            // No answer until the next command has come.
            let line = f.command().await;
            assert!(line.contains("query-status"), "{line}");
            f.write(b"{\"return\":{\"status\":\"completed\"}}\n").await;
            f.write(b"{\"event\":\"STOP\",\"timestamp\":{\"seconds\":1,\"microseconds\":0}}\n").await;
            f.write(b"{\"return\":{\"status\":\"postmigrate\",\"running\":false}}\n").await;
        });
        let mut q = Qmp::connect(&path).await.expect("connect");
        let late = tokio::time::timeout(Duration::from_millis(200), q.execute("query-migrate", json!({}))).await;
        assert!(late.is_err(), "no answer yet");
        assert_eq!(q.status().await.expect("answer"), "postmigrate");
        server.await.expect("server");
    }

    /// A command given up while its answer was half read (`live_rounds` gives up a
    /// `query-migrate` when the parser closes its gate): the rest of the answer comes later,
    /// is read whole and skipped, and the next command gets its own answer. (Before, the
    /// half read was lost and the rest taken for a message: "bad JSON from QEMU".)
    #[tokio::test]
    async fn an_answer_half_read_when_its_command_was_given_up_is_skipped_whole() {
        let (_dir, path, accept) = Fake::listen();
        let (half_tx, half_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut f = accept.await.expect("accept");
            let line = f.command().await;
            assert!(line.contains("query-migrate"), "{line}");
            let late = b"{\"return\":{\"status\":\"active\"}}\n";
            f.write(&late[..12]).await;
            half_rx.await.expect("given up");
            f.write(&late[12..]).await;
            f.write(b"{\"event\":\"RESUME\",\"timestamp\":{\"seconds\":5,\"microseconds\":20000}}\n").await;
            let line = f.command().await;
            assert!(line.contains("query-status"), "{line}");
            f.write(b"{\"return\":{\"status\":\"running\",\"running\":true}}\n").await;
        });
        let mut q = Qmp::connect(&path).await.expect("connect");
        let given_up = tokio::time::timeout(Duration::from_millis(50), q.execute("query-migrate", json!({}))).await;
        assert!(given_up.is_err(), "only half the answer has come");
        half_tx.send(()).expect("server waits");
        assert_eq!(q.status().await.expect("status"), "running");
        assert_eq!(q.last_resume(), Some(5_020_000));
        server.await.expect("server");
    }

    #[tokio::test]
    async fn something_else_before_the_greeting_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"{\"hello\":1}\n").await.expect("write");
        });
        let e = Qmp::connect(&path).await.err().expect("refused");
        assert!(e.to_string().contains("not a QMP greeting"), "{e}");
        server.await.expect("server");
    }
}

//! The monitor keeper of a lazy restore: a small process (`vmcsnap qmp-keeper QMP LISTEN`,
//! the node's own binary) that holds QEMU's monitor, negotiated with out-of-band commands
//! enabled, for as long as the restore's postcopy lasts, and passes single commands from the
//! node on to it.
//!
//! Why: once a guest runs on memory that is still arriving, a vCPU can block on a missing page
//! while it holds QEMU's big lock (under TCG, an interrupt reads the guest's IDT and stack with
//! the lock held). If the node dies then, QEMU's main loop waits on that lock: a new monitor
//! client never gets past `qmp_capabilities`, so nobody could say `migrate-recover`. A client
//! that negotiated before can, out of band (`exec-oob`), which needs no main loop. The keeper
//! is that client, and it outlives the node: it ignores SIGTERM, SIGINT and SIGHUP, and exits
//! when QEMU's incoming migration completes or fails (its `MIGRATION` events) or QEMU goes.
//!
//! While it runs, QEMU's monitor (one client at a time) answers only through it.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The hidden subcommand of the `vmcsnap` binary that runs [`run`].
pub const SUBCOMMAND: &str = "qmp-keeper";
/// Time the keeper has to connect to QEMU and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Time QEMU has to answer one command passed on.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line accepted from a client.
const LINE_BYTES_MAX: u64 = 64 << 10;

/// What the restore turned on, turned off once QEMU has all the memory: the QEMU is the VM
/// now, and with `postcopy-ram` left on its next pre-copy migration (its manager's, or a
/// migration to a file) never completes (QEMU 7.2). Waits briefly for QEMU's answer.
fn capabilities_off(rd: &mut BufReader<UnixStream>, wr: &mut UnixStream) {
    let off = json!({ "execute": "migrate-set-capabilities", "id": "keeper-off", "arguments": { "capabilities": [
        { "capability": "postcopy-ram", "state": false },
        { "capability": "events", "state": false },
    ] } });
    let mut out = serde_json::to_vec(&off).unwrap_or_default();
    out.push(b'\n');
    if wr.write_all(&out).is_err() {
        return;
    }
    let _ = rd.get_ref().set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    while matches!(rd.read_line(&mut line), Ok(n) if n > 0) {
        if line.contains("keeper-off") {
            return;
        }
        line.clear();
    }
}

/// The keeper's socket for VM `vm` in the node's data directory `dir`.
pub fn socket_of(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("qmp-keeper-{vm}.sock"))
}

/// A keeper process of one QEMU's monitor. Dropped, it is killed, unless [`Keeper::detach`]ed
/// (then it lives on, and tokio reaps it whenever it exits).
pub struct Keeper {
    child: tokio::process::Child,
    qmp: PathBuf,
    detached: bool,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.child.start_kill();
        }
    }
}

impl Keeper {
    /// Starts a keeper of the monitor at `qmp`, to listen on `listen`. The monitor's socket
    /// need not exist yet: the keeper waits for it (up to [`READY_TIMEOUT`]), so that it can
    /// start beside the QEMU it is to keep.
    pub fn spawn(qmp: &Path, listen: &Path) -> Result<Self, String> {
        let child = tokio::process::Command::new("/proc/self/exe")
            .arg(SUBCOMMAND)
            .arg(qmp)
            .arg(listen)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a ^C to the node's must not end it.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start the monitor keeper: {e}"))?;
        Ok(Self { child, qmp: qmp.to_path_buf(), detached: false })
    }

    /// Waits until the keeper holds the monitor and listens.
    pub async fn ready(&mut self) -> Result<(), String> {
        let stdout = self.child.stdout.take().ok_or("the monitor keeper has no output")?;
        let mut line = String::new();
        let ready = tokio::time::timeout(READY_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line)).await;
        if !matches!(ready, Ok(Ok(_)) if line.trim() == "ready") {
            let _ = self.child.start_kill();
            return Err(format!("the monitor keeper of {} did not start", self.qmp.display()));
        }
        Ok(())
    }

    /// Ends the keeper (it ignores gentler signals) and waits for it: QEMU's monitor is free
    /// for another client once this returns.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.detached = true;
    }

    /// Lets the keeper outlive this handle (and the node).
    pub fn detach(mut self) {
        self.detached = true;
    }
}

/// Passes one command (`{"execute": ...}` or `{"exec-oob": ...}`) to QEMU through the keeper
/// on `listen`; returns QEMU's `return` value.
pub async fn call(listen: &Path, command: Value) -> Result<Value, String> {
    let ask = async {
        let s = tokio::net::UnixStream::connect(listen).await.map_err(|e| format!("monitor keeper {}: {e}", listen.display()))?;
        let (rd, mut wr) = s.into_split();
        let mut line = serde_json::to_vec(&command).map_err(|e| e.to_string())?;
        line.push(b'\n');
        wr.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut answer = String::new();
        tokio::io::AsyncReadExt::take(tokio::io::BufReader::new(rd), LINE_BYTES_MAX).read_line(&mut answer).await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&answer).map_err(|_| format!("the monitor keeper answered {answer:?}"))?;
        match (v.get("return"), v.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (_, Some(e)) => Err(e["desc"].as_str().unwrap_or("QEMU refused").to_string()),
            _ => Err(format!("QEMU answered {v}")),
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT + Duration::from_secs(1), ask).await.map_err(|_| "QEMU did not answer in time".to_string())?
}

/// Holds the monitor at `qmp` and serves commands on `listen` (see the module). Returns the
/// exit status.
pub fn run(qmp: &Path, listen: &Path) -> i32 {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: signal(2) with SIG_IGN, before any other thread of this process exists; no
        // handler code runs. The keeper must outlive the node it serves.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let fail = |m: String| {
        eprintln!("qmp-keeper: {m}");
        2
    };
    // QEMU may still be starting: its socket missing, or a stale one nobody listens on.
    let t0 = std::time::Instant::now();
    let q = loop {
        match UnixStream::connect(qmp) {
            Ok(q) => break q,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) && t0.elapsed() < READY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return fail(format!("cannot connect to {}: {e}", qmp.display())),
        }
    };
    let _ = q.set_read_timeout(Some(READY_TIMEOUT));
    let mut rd = BufReader::new(match q.try_clone() {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    });
    let mut wr = q;
    let mut line = String::new();
    // The greeting, then capabilities with out-of-band commands.
    if rd.read_line(&mut line).is_err() || !line.contains("\"QMP\"") {
        return fail(format!("no QMP greeting on {}", qmp.display()));
    }
    if wr.write_all(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n").is_err() {
        return fail("QEMU closed its monitor".into());
    }
    loop {
        line.clear();
        match rd.read_line(&mut line) {
            Ok(n) if n > 0 && line.contains("\"return\"") => break,
            Ok(n) if n > 0 && line.contains("\"error\"") => return fail(format!("QEMU refused out-of-band commands: {}", line.trim())),
            Ok(n) if n > 0 => continue,
            _ => return fail("QEMU closed its monitor".into()),
        }
    }
    let _ = rd.get_ref().set_read_timeout(None);
    let _ = std::fs::remove_file(listen);
    let l = match UnixListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", listen.display())),
    };
    // QEMU's answers go to the client waiting (by id); its events end the keeper.
    let (tx, rx) = mpsc::channel::<Value>();
    let gone = listen.to_path_buf();
    let mut last_word = wr.try_clone().ok();
    std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if !matches!(rd.read_line(&mut line), Ok(n) if n > 0) {
                break; // QEMU is gone
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if v["event"] == "MIGRATION" && matches!(v["data"]["status"].as_str(), Some("completed" | "failed")) {
                if v["data"]["status"] == "completed" {
                    if let Some(w) = last_word.as_mut() {
                        capabilities_off(&mut rd, w);
                    }
                }
                break;
            }
            if v.get("id").is_some() {
                let _ = tx.send(v);
            }
        }
        let _ = std::fs::remove_file(&gone);
        std::process::exit(0);
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut next_id = 0u64;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let _ = c.set_read_timeout(Some(ANSWER_TIMEOUT));
        let mut req = String::new();
        let read = c.try_clone().map(|r| std::io::Read::take(BufReader::new(r), LINE_BYTES_MAX).read_line(&mut req));
        let Ok(Ok(_)) = read else { continue };
        let Ok(mut cmd) = serde_json::from_str::<Value>(&req) else {
            let _ = c.write_all(b"{\"error\":{\"desc\":\"not JSON\"}}\n");
            continue;
        };
        next_id += 1;
        let id = format!("keeper-{next_id}");
        cmd["id"] = json!(id);
        let mut out = serde_json::to_vec(&cmd).unwrap_or_default();
        out.push(b'\n');
        if wr.write_all(&out).is_err() {
            break;
        }
        // Answers to earlier clients that gave up are skipped.
        let answer = loop {
            match rx.recv_timeout(ANSWER_TIMEOUT) {
                Ok(v) if v["id"] == json!(id) => break Some(v),
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let mut reply = answer.map(|v| serde_json::to_vec(&v).unwrap_or_default()).unwrap_or_else(|| b"{\"error\":{\"desc\":\"QEMU did not answer in time\"}}".to_vec());
        reply.push(b'\n');
        let _ = c.write_all(&reply);
    }
    0
}

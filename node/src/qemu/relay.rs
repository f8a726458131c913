//! The stream relay of a live capture: a small process (`vmcsnap stream-relay LISTEN TO`, the
//! node's own binary) that QEMU's migration connects to and that hands the connection on to
//! the node's capture socket (the descriptor itself, `SCM_RIGHTS`: the node reads QEMU's
//! stream directly, and no byte of it is copied through this process) while keeping a
//! descriptor of its own. Should the node die, or give the capture up, the relay reads the
//! rest of the stream and drops it. QEMU's background snapshot then ends as a completed one,
//! which releases its write protection; one that breaks off can deadlock QEMU 7.2 under TCG
//! (see [`super::qmp::Qmp::cancel_migration`]).
//!
//! The node starts the relay before the cut's barrier, so that QEMU's `migrate` at `Release`
//! costs the paused VM no process start. Its standard input is the node's lifeline: until QEMU
//! connects, the relay lives only as long as it; once QEMU streams, the relay lives until the
//! stream ends, whatever happens to the node, ignores SIGTERM, SIGINT and SIGHUP, and drains
//! the stream from the moment the lifeline closes (the node died, or dropped its [`Relay`]:
//! it read the stream to its end, or gave it up). Two readers never split a stream the node
//! keeps: the relay reads only once the node no longer does.
//!
//! **Held** (`--held`, QEMU 7.x; see `capture::arm`): the node itself connects to the relay,
//! fills that connection's send buffer with filler bytes and hands its end to QEMU
//! (`getfd`, then `migrate fd:`) before the cut's barrier. The relay reads nothing until the
//! node writes `go FILLER` on its lifeline at `Release`: until then QEMU's migration thread,
//! having done its setup while the VM ran, waits on its first write, before it stops the VM.
//! The relay then skips the filler and hands the connection on. A lifeline that closes first
//! (the node died, or gave the capture up) lets the whole stream drain instead, so that QEMU's
//! background snapshot completes.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// The hidden subcommand of the `vmcsnap` binary that runs [`run`].
pub const SUBCOMMAND: &str = "stream-relay";

/// Time the relay has to start and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay process listening for QEMU. Dropping this closes the relay's lifeline: a relay that
/// QEMU never reached exits; one that QEMU streams into passes on or drains the stream to its
/// end (tokio reaps it). The relay decides, so no moment of QEMU's connecting is missed.
pub struct Relay {
    _child: tokio::process::Child,
    /// The write end of the relay's lifeline; closed when this drops or the node dies.
    lifeline: Option<tokio::process::ChildStdin>,
    /// The socket QEMU's `migrate` connects to.
    pub listen: PathBuf,
    /// Whether it reads only once released ([`Relay::release`]).
    pub held: bool,
}

impl Relay {
    /// Starts a relay listening on `listen` that passes what it receives on to `to` (once
    /// [`Relay::release`]d if `held`); returns once it listens.
    pub async fn start(listen: &Path, to: &Path, held: bool) -> Result<Self, String> {
        // The running binary itself, even if a package upgrade replaced its file.
        let exe = Path::new("/proc/self/exe");
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg(SUBCOMMAND).arg(listen).arg(to);
        if held {
            cmd.arg(HELD_FLAG);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a ^C to the node's must not end a stream it drains.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start the stream relay: {e}"))?;
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take().ok_or("the stream relay has no output")?;
        let relay = Self { _child: child, lifeline, listen: listen.to_path_buf(), held };
        let mut line = String::new();
        let ready = tokio::time::timeout(READY_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line)).await;
        if !matches!(ready, Ok(Ok(_)) if line.trim() == "ready") {
            // Dropped: its lifeline closes, so it exits; its socket file is removed.
            return Err(format!("the stream relay did not start listening on {}", listen.display()));
        }
        Ok(relay)
    }

    /// Lets a held relay read: it skips the `filler` bytes the node wrote ahead of QEMU's
    /// stream, then passes the stream on.
    pub async fn release(&mut self, filler: u64) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let l = self.lifeline.as_mut().ok_or("the stream relay was already let go")?;
        l.write_all(format!("go {filler}\n").as_bytes()).await.map_err(|e| format!("the stream relay is gone: {e}"))?;
        l.flush().await.map_err(|e| format!("the stream relay is gone: {e}"))
    }

    /// Closes the lifeline now: a relay QEMU never reached exits, one that QEMU streams into
    /// drains the stream (QEMU's background snapshot runs to its end, into nothing).
    pub fn let_go(&mut self) {
        self.lifeline = None;
    }
}

/// The node's side of the hand-over: on `conn`, the relay's connection to the capture
/// socket, receives QEMU's connection. The relay keeps a descriptor of it, and drains it once
/// the [`Relay`] is dropped or [let go](Relay::let_go).
pub async fn take_stream(conn: &tokio::net::UnixStream) -> Result<UnixStream, String> {
    loop {
        conn.readable().await.map_err(|e| format!("the stream relay's connection: {e}"))?;
        match conn.try_io(tokio::io::Interest::READABLE, || recv_fd(conn.as_raw_fd())) {
            Ok(fd) => {
                let s = UnixStream::from(fd);
                // Blocking, as the relay left it (the flag is the relay's too: one open file).
                s.set_nonblocking(false).map_err(|e| format!("QEMU's connection: {e}"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("the stream relay handed over no stream: {e}")),
        }
    }
}

/// recvmsg(2) of one byte with one descriptor attached (`SCM_RIGHTS`) on `sock`; any further
/// descriptors are closed.
#[allow(unsafe_code)]
fn recv_fd(sock: RawFd) -> std::io::Result<OwnedFd> {
    const FD_BYTES: usize = std::mem::size_of::<RawFd>();
    let mut byte = [0u8; 1];
    // u64s: a control buffer aligned as a `cmsghdr` must be; room for a few descriptors.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: byte.len() };
    // SAFETY: `msghdr` is plain data (all-zero is valid); its pointers point at `iov`, `byte`
    // and `control`, which outlive the recvmsg(2) call, with their true lengths, so the kernel
    // writes only inside them. The header CMSG_FIRSTHDR returns (null-checked) lies inside
    // `control` (the kernel wrote at most `msg_controllen` bytes); descriptors are read
    // unaligned from within its `cmsg_len`, each a new descriptor of this process that is
    // owned exactly once (the first returned, the rest closed).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(sock, &raw mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(c);
                for i in 0..len / FD_BYTES {
                    let fd = std::ptr::read_unaligned(data.add(i * FD_BYTES).cast::<RawFd>());
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
        if n == 0 && fds.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the connection closed"));
        }
        // Further descriptors (none from a relay) close as the vector drops.
        fds.into_iter().next().ok_or_else(|| std::io::Error::other("no descriptor came with the message"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The lifeline closes with this. A relay still listening removes the file too.
        let _ = std::fs::remove_file(&self.listen);
    }
}

/// The argument that makes a relay held.
pub const HELD_FLAG: &str = "--held";

/// Listens on `listen`, says `ready` on standard output, takes one connection and hands it to
/// the node at the unix socket `to` (the descriptor, [`take_stream`]); once standard input
/// (the node's lifeline) closes, drains what the node left of it — all of it, when the
/// hand-over failed. Exits if the lifeline closes before the connection came. If `held`,
/// reads nothing of the connection until a line `go FILLER` on standard input, then skips
/// FILLER bytes; drains it if the lifeline closes first. Returns the exit status: 0 when the
/// connection was handed over.
pub fn run(listen: &Path, to: &Path, held: bool) -> i32 {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: signal(2) with SIG_IGN, before any other thread of this process exists;
        // no handler code runs. A stream must be drained to its end (a relay QEMU never
        // reached exits when its lifeline closes).
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    serve(listen, to, held, std::io::stdin(), &mut std::io::stdout())
}

/// [`run`], its lifeline and its `ready` line given.
fn serve(listen: &Path, to: &Path, held: bool, lifeline: impl Read + Send + 'static, ready: &mut impl Write) -> i32 {
    let _ = std::fs::remove_file(listen);
    let l = match UnixListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stream-relay: cannot listen on {}: {e}", listen.display());
            return 2;
        }
    };
    // `Some(filler)` at `go`; `None` once the lifeline closed.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<Option<u64>>();
    let closed = std::sync::Arc::new(AtomicBool::new(false));
    let closing = closed.clone();
    std::thread::spawn(move || {
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(lifeline));
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("go ").and_then(|n| n.trim().parse().ok()) {
                let _ = go_tx.send(Some(n));
            }
        }
        closing.store(true, Ordering::SeqCst);
        let _ = go_tx.send(None);
    });
    let _ = writeln!(ready, "ready").and_then(|_| ready.flush());
    let Some(mut conn) = accept(&l, &closed) else {
        let _ = std::fs::remove_file(listen);
        return 1;
    };
    drop(l);
    // Removed once the stream starts: a held relay's connection is the node's until then.
    if !held {
        let _ = std::fs::remove_file(listen);
    }
    let mut go = true;
    if held {
        let released = go_rx.recv();
        let _ = std::fs::remove_file(listen);
        match released {
            Ok(Some(filler)) => {
                // What the node wrote ahead of QEMU's stream.
                if std::io::copy(&mut (&mut conn).take(filler), &mut std::io::sink()).ok() != Some(filler) {
                    return 1;
                }
            }
            _ => go = false,
        }
    }
    if go {
        // Handed over, the stream is the node's to read until the lifeline closes: then (the
        // node died, or is done with it) whatever is left is drained here.
        let handed = UnixStream::connect(to).and_then(|out| super::qmp::send_with_fd(out.as_raw_fd(), b"S", conn.as_raw_fd()));
        if handed.is_ok() {
            while let Ok(Some(_)) = go_rx.recv() {}
            drain(&mut conn);
            return 0;
        }
    }
    drain(&mut conn);
    1
}

/// Reads `conn` to its end (or its first error) and drops what it read.
fn drain(conn: &mut UnixStream) {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The one connection; `None` once the lifeline closed with none made. The lifeline is read
/// before each try: whoever connected before closing it (the node, for a held relay) is
/// taken, however late this process runs, rather than left to a reset.
fn accept(l: &UnixListener, closed: &AtomicBool) -> Option<UnixStream> {
    l.set_nonblocking(true).ok()?;
    loop {
        let gone = closed.load(Ordering::SeqCst);
        match l.accept() {
            Ok((c, _)) => return c.set_nonblocking(false).ok().map(|_| c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if gone {
                    return None;
                }
                let mut fd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(l), events: libc::POLLIN, revents: 0 };
                // SAFETY: poll(2) on one valid pollfd that lives across the call; it only
                // writes `revents`. The timeout bounds how late a closed lifeline is seen.
                #[allow(unsafe_code)]
                unsafe {
                    libc::poll(&mut fd, 1, LIFELINE_POLL_MS);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// How often a relay waiting for its connection looks at its lifeline.
const LIFELINE_POLL_MS: i32 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs [`serve`] on a thread with a socket pair as its lifeline; returns the lifeline's
    /// other end and the relay's exit status to come.
    fn relay(dir: &Path, held: bool) -> (UnixStream, std::thread::JoinHandle<i32>) {
        let (node, lifeline) = UnixStream::pair().expect("pair");
        let (listen, to) = (dir.join("relay.sock"), dir.join("to.sock"));
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            struct Ready(std::sync::mpsc::Sender<()>);
            impl Write for Ready {
                fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                    Ok(b.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    self.0.send(()).map_err(std::io::Error::other)
                }
            }
            serve(&listen, &to, held, lifeline, &mut Ready(tx))
        });
        rx.recv().expect("ready");
        (node, t)
    }

    /// The node's side: accepts the relay on `to` and receives QEMU's connection.
    fn taken(to: &UnixListener) -> UnixStream {
        let (c, _) = to.accept().expect("the relay connects");
        UnixStream::from(recv_fd(c.as_raw_fd()).expect("a stream handed over"))
    }

    #[test]
    fn a_held_relay_skips_the_filler_at_go_and_hands_the_stream_over() {
        let dir = tempfile::tempdir().expect("tmp");
        let to = UnixListener::bind(dir.path().join("to.sock")).expect("to");
        let (mut node, relay) = relay(dir.path(), true);
        let mut qemu = UnixStream::connect(dir.path().join("relay.sock")).expect("connect");
        qemu.write_all(&[0u8; 1000]).expect("filler");
        node.write_all(b"go 1000\n").expect("go");
        let stream: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        let mut conn = taken(&to);
        std::thread::scope(|s| {
            s.spawn(|| {
                qemu.write_all(&stream).expect("stream");
                drop(qemu);
            });
            conn.read_to_end(&mut got).expect("read");
        });
        assert_eq!(got.len(), stream.len());
        assert!(got == stream, "the stream, without the filler, read by the node alone");
        drop(node); // done: the lifeline closes, the relay finds the stream ended
        assert_eq!(relay.join().expect("relay"), 0);
    }

    /// The node reads part of the stream and dies (its lifeline closes, its descriptor of the
    /// stream too): the relay drains the rest, so QEMU's writes all complete.
    #[test]
    fn a_stream_the_node_stops_reading_is_drained_once_its_lifeline_closes() {
        let dir = tempfile::tempdir().expect("tmp");
        let to = UnixListener::bind(dir.path().join("to.sock")).expect("to");
        let (node, relay) = relay(dir.path(), false);
        let mut qemu = UnixStream::connect(dir.path().join("relay.sock")).expect("connect");
        let mut conn = taken(&to);
        let writer = std::thread::spawn(move || qemu.write_all(&vec![9u8; 16 << 20]).is_ok());
        let mut head = vec![0u8; 1 << 20];
        conn.read_exact(&mut head).expect("the node reads the stream's start");
        assert!(head.iter().all(|&b| b == 9));
        drop(conn);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "nothing drains while the node may still read");
        drop(node);
        assert!(writer.join().expect("writer"), "every write completed: the relay drained the rest");
        assert_eq!(relay.join().expect("relay"), 0);
    }

    /// The lifeline closes right after the connection is made — before the relay may have
    /// taken it: the stream drains to its end rather than being reset, and nothing is passed on.
    #[test]
    fn a_held_relay_whose_lifeline_closes_right_after_the_connection_drains_it() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("tmp");
            let to = UnixListener::bind(dir.path().join("to.sock")).expect("to");
            to.set_nonblocking(true).expect("nonblocking");
            let (node, relay) = relay(dir.path(), true);
            let mut qemu = UnixStream::connect(dir.path().join("relay.sock")).expect("connect");
            drop(node);
            qemu.write_all(&vec![7u8; 8 << 20]).expect("drained, not reset");
            drop(qemu);
            assert_eq!(relay.join().expect("relay"), 1, "nothing was delivered");
            assert!(to.accept().is_err(), "nothing is passed on without go");
        }
    }

    #[test]
    fn a_relay_whose_lifeline_closes_with_no_connection_ends_and_removes_its_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let (node, relay) = relay(dir.path(), false);
        drop(node);
        assert_eq!(relay.join().expect("relay"), 1);
        assert!(!dir.path().join("relay.sock").exists());
    }
}

//! The stream relay of a live capture: QEMU's `exec:` migration runs `vmcsnap stream-relay
//! SOCKET`, which copies QEMU's stream to the capture socket of the node, and — should the
//! node die or stop reading — reads the rest of the stream and drops it. QEMU's background
//! snapshot then ends as a completed one, which releases its write protection; one that fails
//! part-way can deadlock QEMU 7.2 under TCG (see [`super::qmp::Qmp::cancel_migration`]).

use std::io::{Read, Write};
use std::path::Path;

/// The hidden subcommand of the `vmcsnap` binary that runs [`run`].
pub const SUBCOMMAND: &str = "stream-relay";

/// The `exec:` URI that has QEMU run this binary's relay to `sock`.
pub fn uri(sock: &Path) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmcsnap binary for the stream relay: {e}"))?;
    let quote = |p: &Path| {
        let s = p.display().to_string();
        if s.contains('\'') {
            Err(format!("cannot pass {s} to QEMU's shell (it has a quote)"))
        } else {
            Ok(format!("'{s}'"))
        }
    };
    Ok(format!("exec:{} {SUBCOMMAND} {}", quote(&exe)?, quote(sock)?))
}

/// Copies standard input to the unix socket `sock` until its end; from the first failure to
/// connect or write on, drains standard input instead. Returns the exit status: 0 when every
/// byte was delivered, 1 when the rest was dropped.
pub fn run(sock: &Path) -> i32 {
    let mut input = std::io::stdin().lock();
    let mut out = std::os::unix::net::UnixStream::connect(sock).ok();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match input.read(&mut buf) {
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

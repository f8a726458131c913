//! VM memory sources, and the contract every capture of one shares.
//!
//! `file:PATH` is a raw guest-memory image (what `pmemsave` or a mapped memory file holds): a
//! whole number of 4 KiB pages, read as one RAM block named `ram`. `qemu:QMP_SOCKET` is a
//! running QEMU VM ([`crate::qemu::capture`]).
//!
//! A capture is paced from outside (by the cut, in the engine) and knows nothing of who paces
//! it: it reports [`Reached::Prepared`] and [`Reached::Paused`] through its [`Pacer`], waits
//! for [`Step::Pause`] before pausing the VM and for [`Step::Resume`] before resuming it, and
//! gives up at [`Step::Cancel`]. Pages go to a [`PageSink`]; the result is a [`Captured`].

use bytes::Bytes;
use std::future::Future;
use std::path::PathBuf;
use tokio::sync::{mpsc, watch};
use vmcsnap_protocol::manifest::{Block, QemuState, VmStats};
use vmcsnap_protocol::{PageHash, PAGE_SIZE};

/// How far a capture may go, as set by whoever paces it. Steps only move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Prepare (and, with pre-copy, copy live); do not pause yet.
    Prepare,
    /// Pause the VM now.
    Pause,
    /// Resume the VM as soon as it is captured.
    Resume,
    /// Give up: resume the VM, keep nothing.
    Cancel,
}

/// What a capture reports to its pacer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reached {
    /// Ready to pause (pre-copy: the live copy is held at the end of its first pass).
    Prepared,
    /// The VM is paused (or, if it was not running, would be).
    Paused,
}

/// The capture was cancelled by its pacer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the capture was cancelled")]
pub struct Cancelled;

/// One capture's handle on its pacing: the current [`Step`] and a channel for what it reached,
/// tagged with the capture's index.
pub struct Pacer {
    step: watch::Receiver<Step>,
    reached: mpsc::UnboundedSender<(usize, Reached)>,
    index: usize,
    /// The node's [`Quiet`], held from the pause until the VM runs again (or the pacer goes).
    quiet: Option<(Quiet, Option<QuietHold>)>,
}

impl Pacer {
    /// A pacer following `step`, reporting on `reached` as capture `index`.
    pub fn new(step: watch::Receiver<Step>, reached: mpsc::UnboundedSender<(usize, Reached)>, index: usize) -> Self {
        Self { step, reached, index, quiet: None }
    }

    /// This pacer holds `quiet` while its VM is paused for the cut: from [`Step::Pause`] until
    /// [`Pacer::resumed`].
    pub fn quieting(mut self, quiet: Quiet) -> Self {
        self.quiet = Some((quiet, None));
        self
    }

    /// Reports that the capture is prepared.
    pub fn prepared(&self) {
        let _ = self.reached.send((self.index, Reached::Prepared));
    }

    /// Reports that the VM is paused.
    pub fn paused(&mut self) {
        self.hold_quiet();
        let _ = self.reached.send((self.index, Reached::Paused));
    }

    /// The VM runs again (or the capture will not pause it again): the node's background work
    /// need not wait for it any more.
    pub fn resumed(&mut self) {
        if let Some((_, hold)) = &mut self.quiet {
            *hold = None;
        }
    }

    fn hold_quiet(&mut self) {
        if let Some((q, hold @ None)) = &mut self.quiet {
            *hold = Some(q.hold());
        }
    }

    /// Waits until the pacing reaches `step`; fails if it is cancelled first. Reaching
    /// [`Step::Pause`] holds the node's [`Quiet`] (the VM is about to pause).
    pub async fn wait(&mut self, step: Step) -> Result<(), Cancelled> {
        loop {
            let now = *self.step.borrow_and_update();
            if now == Step::Cancel {
                return Err(Cancelled);
            }
            if now >= step {
                if step == Step::Pause {
                    self.hold_quiet();
                }
                return Ok(());
            }
            if self.step.changed().await.is_err() {
                return Err(Cancelled);
            }
        }
    }

    /// A watch on cancellation alone, for work that runs beside the paced steps.
    pub fn cancel_watch(&self) -> CancelWatch {
        CancelWatch(self.step.clone())
    }
}

/// Longest a node's background work waits for [`Quiet`] in one quiet spell: a cut whose VMs
/// stay paused longer (a slow peer, a stop-copy of much memory) no longer holds it back.
pub const QUIET_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// While VMs of this node are paused for a cut, the node's background work of snapshots
/// (hashing pages, sending them to their owners) waits: on a busy host the pause's own work —
/// QEMU's final round and device state, the parser, the cut's messages, `cont` — then gets
/// the CPU, and the pause is shorter. The wait ends when no VM is paused any more, or
/// [`QUIET_MAX`] after the spell began.
#[derive(Clone, Default)]
pub struct Quiet(std::sync::Arc<watch::Sender<(usize, Option<tokio::time::Instant>)>>);

/// One paused VM's hold on a [`Quiet`]; released when dropped.
pub struct QuietHold(Quiet);

impl Quiet {
    /// Holds the quiet until the returned hold is dropped.
    pub fn hold(&self) -> QuietHold {
        self.0.send_modify(|(n, since)| {
            *n += 1;
            since.get_or_insert_with(tokio::time::Instant::now);
        });
        QuietHold(self.clone())
    }

    /// [`Quiet::hold`], starting a new spell: the wait's [`QUIET_MAX`] counts from now, also
    /// while other holds last (a cut's pause after its wait for `Go`).
    pub fn hold_anew(&self) -> QuietHold {
        self.0.send_modify(|(n, since)| {
            *n += 1;
            *since = Some(tokio::time::Instant::now());
        });
        QuietHold(self.clone())
    }

    /// Whether a VM holds the quiet now (and its spell has not outlasted [`QUIET_MAX`]).
    #[cfg(test)]
    fn is_held(&self) -> bool {
        let (n, since) = *self.0.borrow();
        n > 0 && since.is_some_and(|s| s.elapsed() < QUIET_MAX)
    }

    /// Waits while the quiet is held (see [`Quiet`]).
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        loop {
            let (n, since) = *rx.borrow_and_update();
            let Some(end) = since.filter(|_| n > 0).map(|s| s + QUIET_MAX) else { return };
            if !matches!(tokio::time::timeout_at(end, rx.changed()).await, Ok(Ok(()))) {
                return;
            }
        }
    }
}

impl Drop for QuietHold {
    fn drop(&mut self) {
        self.0 .0.send_modify(|(n, since)| {
            *n -= 1;
            if *n == 0 {
                *since = None;
            }
        });
    }
}

/// Notices that a capture was cancelled.
#[derive(Clone)]
pub struct CancelWatch(watch::Receiver<Step>);

impl CancelWatch {
    /// Fails if the capture was cancelled.
    pub fn check(&self) -> Result<(), Cancelled> {
        if *self.0.borrow() == Step::Cancel {
            return Err(Cancelled);
        }
        Ok(())
    }

    /// Resolves once the capture is cancelled (or nobody paces it any more).
    pub async fn cancelled(mut self) {
        while *self.0.borrow_and_update() != Step::Cancel {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A sink's failure, as the capture passes it back untouched (the engine downcasts it).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where a capture puts the non-zero pages it reads.
pub trait PageSink: Sync {
    /// Takes a batch of pages with their hashes; may wait (backpressure).
    fn push(&self, pages: Vec<(PageHash, Bytes)>) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// One VM's memory, captured.
#[derive(Clone, Debug)]
pub struct Captured {
    /// The hash (or zero mark) of every page, in block order.
    pub hashes: Vec<PageHash>,
    /// RAM blocks, in order.
    pub blocks: Vec<Block>,
    /// Counters (total, zero, non-zero, pause); the engine adds what the owners said.
    pub stats: VmStats,
    /// What a QEMU restore needs; `None` for a memory image.
    pub qemu: Option<QemuState>,
    /// Non-zero pages the capture read besides guest memory (QEMU's device state, as the
    /// chunks of `qemu.device_state`): to be stored like pages, but not counted as the VM's.
    pub extra_pages: Vec<(PageHash, Bytes)>,
}

/// A parsed memory source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A raw memory image.
    File(PathBuf),
    /// A running QEMU VM, through its QMP socket.
    Qemu(PathBuf),
}

/// A parsed restore target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Write the VM's RAM as a raw image.
    File(PathBuf),
    /// Write a migration stream into a QEMU listening with `-incoming unix:PATH`.
    QemuIncoming(PathBuf),
}

fn abs_path(kind: &str, p: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(p);
    if p.is_empty() {
        return Err(format!("{kind}: empty path"));
    }
    if !path.is_absolute() {
        return Err(format!("{kind}:{p}: the node needs an absolute path (the CLI makes paths absolute)"));
    }
    Ok(path)
}

impl Source {
    /// Parses `file:/abs/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", p)) => Ok(Source::File(abs_path("file", p)?)),
            Some(("qemu", p)) => Ok(Source::Qemu(abs_path("qemu", p)?)),
            Some((kind, _)) => Err(format!("unknown memory source kind {kind:?} (supported: file:PATH, qemu:QMP_SOCKET)")),
            None => Err(format!("memory source {s:?} must look like file:PATH or qemu:QMP_SOCKET")),
        }
    }

    /// Checks the source can be read and returns its size in bytes (0 for a QEMU VM, whose
    /// size is known once its stream arrives).
    pub fn probe(&self) -> Result<u64, String> {
        match self {
            Source::Qemu(p) => {
                // Only that a socket is there: no connection. A blocking connect to a monitor
                // whose backlog is full (another client holds it, and attempts that gave up
                // are still queued) waits until that client leaves, holding a runtime thread
                // and the cut with it; and each connection left queued makes the next fail.
                // The capture's own connect has timeouts and says what it found.
                use std::os::unix::fs::FileTypeExt;
                let meta = std::fs::metadata(p).map_err(|e| format!("cannot reach QMP socket {}: {e} (is the VM running?)", p.display()))?;
                if !meta.file_type().is_socket() {
                    return Err(format!("{} is not a socket (a VM's QMP socket is given to QEMU as -qmp unix:PATH,server=on,wait=off)", p.display()));
                }
                Ok(0)
            }
            Source::File(p) => {
                let meta = std::fs::metadata(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                if !meta.is_file() {
                    return Err(format!("{} is not a regular file", p.display()));
                }
                let len = meta.len();
                if len == 0 || len % PAGE_SIZE as u64 != 0 {
                    return Err(format!(
                        "{} is {len} bytes, not a whole number of {PAGE_SIZE}-byte pages",
                        p.display()
                    ));
                }
                // Opening proves permission, not just existence.
                std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
                Ok(len)
            }
        }
    }
}

impl Target {
    /// Parses `file:/abs/path` or `qemu:unix:/abs/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", p)) => Ok(Target::File(abs_path("file", p)?)),
            Some(("qemu", rest)) => match rest.split_once(':') {
                Some(("unix", p)) => Ok(Target::QemuIncoming(abs_path("qemu:unix", p)?)),
                _ => Err(format!("restore target {s:?}: QEMU targets look like qemu:unix:PATH (QEMU started with -incoming unix:PATH)")),
            },
            Some((kind, _)) => Err(format!("unknown restore target kind {kind:?} (supported: file:PATH, qemu:unix:PATH, or --launch)")),
            None => Err(format!("restore target {s:?} must look like file:PATH or qemu:unix:PATH")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pacers_follow_their_steps_and_cancel() {
        let (step_tx, step_rx) = watch::channel(Step::Prepare);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut p = Pacer::new(step_rx, tx, 3);
        p.prepared();
        assert_eq!(rx.recv().await, Some((3, Reached::Prepared)));
        step_tx.send_replace(Step::Resume);
        // A later step includes the earlier ones.
        p.wait(Step::Pause).await.expect("pause");
        let watch = p.cancel_watch();
        assert!(watch.check().is_ok());
        step_tx.send_replace(Step::Cancel);
        assert_eq!(p.wait(Step::Resume).await, Err(Cancelled));
        assert!(watch.check().is_err());
        watch.cancelled().await;
    }

    #[tokio::test(start_paused = true)]
    async fn background_work_waits_while_a_vm_holds_the_quiet_and_no_longer_than_its_max() {
        let quiet = Quiet::default();
        // Nobody holds it: no wait.
        tokio::time::timeout(Duration::from_millis(1), quiet.wait()).await.expect("not held");
        let (a, b) = (quiet.hold(), quiet.hold());
        assert!(quiet.is_held());
        let waiter = tokio::spawn({
            let q = quiet.clone();
            async move { q.wait().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "one VM still holds it");
        drop(b);
        tokio::time::timeout(Duration::from_millis(1), waiter).await.expect("released").expect("join");
        assert!(!quiet.is_held());
        // A spell that outlasts QUIET_MAX holds nothing back any more.
        let _c = quiet.hold();
        let t = tokio::time::Instant::now();
        quiet.wait().await;
        assert_eq!(t.elapsed(), QUIET_MAX);
        assert!(!quiet.is_held());
        quiet.wait().await;
        assert_eq!(t.elapsed(), QUIET_MAX);
    }

    /// A cut's wait for `Go` holds the quiet; its pause starts a spell of its own, which the
    /// wait's length does not shorten.
    #[tokio::test(start_paused = true)]
    async fn a_hold_anew_starts_its_own_spell() {
        let quiet = Quiet::default();
        let waiting = quiet.hold();
        tokio::time::sleep(QUIET_MAX - Duration::from_millis(100)).await;
        assert!(quiet.is_held());
        let paused = quiet.hold_anew();
        drop(waiting);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(quiet.is_held(), "the pause's spell began 500 ms ago");
        let t = tokio::time::Instant::now();
        quiet.wait().await;
        assert_eq!(t.elapsed(), QUIET_MAX - Duration::from_millis(500));
        drop(paused);
        assert!(!quiet.is_held());
    }

    #[tokio::test]
    async fn a_pacer_holds_the_quiet_from_the_pause_until_its_vm_runs() {
        let quiet = Quiet::default();
        let (step_tx, step_rx) = watch::channel(Step::Prepare);
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut p = Pacer::new(step_rx, tx, 0).quieting(quiet.clone());
        p.prepared();
        assert!(!quiet.is_held());
        step_tx.send_replace(Step::Pause);
        p.wait(Step::Pause).await.expect("pause");
        assert!(quiet.is_held());
        p.paused();
        p.resumed();
        assert!(!quiet.is_held());
        // A capture that ends without saying so lets go too.
        p.paused();
        assert!(quiet.is_held());
        drop(p);
        assert!(!quiet.is_held());
    }

    #[test]
    fn sources_parse_and_probe() {
        assert!(Source::parse("file:relative").is_err());
        assert!(Source::parse("qcow:/x").is_err());
        assert!(Source::parse("/x").is_err());
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 3 * PAGE_SIZE + 1]).expect("write");
        let s = Source::parse(&format!("file:{}", p.display())).expect("parse");
        assert!(s.probe().expect_err("odd size").contains("whole number"));
        std::fs::write(&p, vec![0u8; 3 * PAGE_SIZE]).expect("write");
        assert_eq!(s.probe().expect("probe"), 3 * PAGE_SIZE as u64);
        let missing = Source::parse("file:/nonexistent/vmcsnap").expect("parse");
        assert!(missing.probe().expect_err("missing").contains("cannot read"));
        // A QMP socket is looked at, not connected to (a real monitor that is busy with its
        // backlog full: cli/tests/cluster.rs, the held live cut's abort).
        let sock = dir.path().join("vm.qmp");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert_eq!(Source::Qemu(sock).probe().expect("a socket"), 0);
        assert!(Source::Qemu(p).probe().expect_err("a file").contains("not a socket"));
        assert!(Source::Qemu(dir.path().join("gone.qmp")).probe().expect_err("missing").contains("cannot reach"));
    }
}

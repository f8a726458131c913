//! Capturing a running QEMU VM: the node becomes the VM's migration destination.
//!
//! 1. **Inspect** over QMP: the VM is running or paused and not migrating; its QEMU version,
//!    accelerator and command line.
//! 2. **Configure**: turn off [`super::CAPABILITIES_OFF`]; raise `max-bandwidth`; lower
//!    `downtime-limit` (the old values come back at the end).
//! 3. **Migrate**: listen on a unix socket in the work directory; for stop-copy, wait for the
//!    pacer's [`Step::Pause`] and `stop` first; `migrate unix:SOCK`. A blocking thread parses
//!    the stream as it arrives and passes the non-zero pages on in batches, in memory up to
//!    [`CAPTURE_MEMORY_BYTES`] queued and beyond that through a spool file (unlinked), so
//!    QEMU sends at stream speed whatever the sink's pace; the async side hashes the pages,
//!    keeps the VM's page map (last copy wins) and hands the pages to the sink. For
//!    pre-copy, the live rounds run until one pass is (nearly) done, the copy is held there,
//!    and the VM is stopped at [`Step::Pause`].
//! 4. **Resume**: once QEMU reports the migration `completed` and the pacer says
//!    [`Step::Resume`], `cont` the VM if it was running — while the sink may still be busy.
//!
//! Whatever fails, the migration is cancelled, the VM is resumed if it was running and the
//! old parameters come back. A [`PauseJournal`] notes the VM before anything can pause it and
//! forgets it once it runs again, so a node that dies in between resumes it on its next start.

use super::disks::Fleece;
use super::qmp::{Qmp, QmpError, Settled};
use super::stream::{self, StreamError};
use super::QemuFacts;
use crate::source::{CancelWatch, Cancelled, Captured, PageSink, Pacer, SinkError, Step};
use bytes::Bytes;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_protocol::manifest::{Block, CaptureMode, DiskBlock, VmStats};
use vmcsnap_protocol::wire::DiskChoice;
use vmcsnap_protocol::{hash_page, is_zero_page, PageHash, PAGE_SIZE, ZERO_HASH};

/// Page records handed from the parser thread to the hashing side in one message. The queue
/// of such messages is unbounded on purpose (records are 48 bytes; the pages are in memory
/// only up to [`CAPTURE_MEMORY_BYTES`], else in the spool), so that the VM's pause never waits
/// on the sink.
pub const CAPTURE_BATCH_PAGES: usize = 256;
/// Time for QEMU to connect to the node's socket after `migrate`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for QEMU to report the migration finished after the stream ended.
pub const COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for QEMU to leave a passing state (`finish-migrate`, `cancelling`) before the VM is
/// resumed after a failure.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time QEMU has to end a cancelled migration.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// Unsent bytes left in pre-copy's first pass at which the live copy is held (see
/// [`live_rounds`]); what is left then goes in the final round, while the VM is paused.
pub const HOLD_REMAINING_BYTES: u64 = 8 << 20;
/// The parser's reads from QEMU's stream, bytes.
const PARSER_READ_BYTES: usize = 1 << 20;
/// The same for pre-copy: QEMU can run ahead of the gate by this buffer and the socket's, and
/// a pass whose last pages are zero (a few bytes each in the stream) must not fit in them, or
/// QEMU ends the pass past a closed gate and pauses the VM on its own (seen with 1 MiB).
const PARSER_READ_BYTES_HELD: usize = 64 << 10;
/// The send buffer of QEMU's end of a pre-copy or stop-copy stream while its VM is paused
/// (from the pause on; during pre-copy's live rounds it keeps the system's default, which
/// bounds how far QEMU runs past a closed gate). With Linux's default (about 200 KiB) QEMU's
/// migration thread waits for the parser every 200 KiB of a final round of megabytes (a
/// writer guest's: 9–14 MiB), each wait a wake-up on cores that the paused cut's other QEMUs
/// and nodes want too; with this one it need not. Kernel memory, used only while the parser
/// lags.
const PAUSED_SEND_BUFFER: usize = 16 << 20;
/// Longest a held pre-copy capture waits for its hashing side to catch up with its parser
/// before it reports itself prepared (see [`Gate::settled`]).
pub const SETTLE_MAX: Duration = Duration::from_secs(2);

/// Holds a pre-copy stream: while closed, the parser reads nothing more, so QEMU's migration
/// thread blocks writing once the socket's buffers are full (the VM runs on). It cannot
/// finish the pass, so it never finds the copy converged and pauses the VM on its own before
/// the pacer's [`Step::Pause`]; and once opened, it goes on at once. (A hold by QEMU's own
/// `max-bandwidth` left its migration thread asleep until its 100 ms rate-limit period ended,
/// up to 100 ms into the VM's pause: QEMU 7.2 wakes it early only for postcopy's requests.)
///
/// The parser closes it itself once it has read `hold_at` page records ([`Gate::hold_at`]):
/// a hold decided from QMP's `remaining` came too late now and then (QEMU ended the first pass
/// of an idle VM between two queries and paused it on its own, for the whole wait of the cut).
#[derive(Clone)]
pub struct Gate(std::sync::Arc<GateState>);

struct GateState {
    closed: std::sync::Mutex<bool>,
    turned: std::sync::Condvar,
    /// Page records after which the parser closes the gate (once); `u64::MAX`: never.
    hold_at: std::sync::atomic::AtomicU64,
    /// Whether the parser waits at the closed gate (it has sent every whole batch it read).
    parked: std::sync::atomic::AtomicBool,
    /// Batches the parser sent, and those the hashing side has handed to the sink.
    sent: std::sync::atomic::AtomicU64,
    drained: std::sync::atomic::AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self(std::sync::Arc::new(GateState {
            closed: Default::default(),
            turned: Default::default(),
            hold_at: u64::MAX.into(),
            parked: Default::default(),
            sent: Default::default(),
            drained: Default::default(),
        }))
    }
}

impl Gate {
    /// Stops the reads.
    pub fn close(&self) {
        *self.0.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Lets the reads go on (and the parser never closes the gate again).
    pub fn open(&self) {
        let mut closed = self.0.closed.lock().unwrap_or_else(|e| e.into_inner());
        self.0.hold_at.store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
        *closed = false;
        self.0.turned.notify_all();
    }

    /// Whether the reads are stopped.
    pub fn is_closed(&self) -> bool {
        *self.0.closed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has the parser close the gate once it has read `records` page records.
    pub fn hold_at(&self, records: u64) {
        let _ = self.0.hold_at.compare_exchange(u64::MAX, records, std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst);
    }

    /// Called by the parser with the page records read so far. (Under the lock, so that an
    /// [`Gate::open`] is never undone by a close decided just before it.)
    fn records(&self, n: u64) -> bool {
        if n < self.0.hold_at.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut closed = self.0.closed.lock().unwrap_or_else(|e| e.into_inner());
        if n >= self.0.hold_at.load(std::sync::atomic::Ordering::SeqCst) {
            self.0.hold_at.store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
            *closed = true;
            return true;
        }
        false
    }

    /// Resolves once the gate is closed.
    async fn closing(&self) {
        while !self.is_closed() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn wait_open(&self) {
        use std::sync::atomic::Ordering;
        let mut closed = self.0.closed.lock().unwrap_or_else(|e| e.into_inner());
        while *closed {
            self.0.parked.store(true, Ordering::SeqCst);
            closed = self.0.turned.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
        self.0.parked.store(false, Ordering::SeqCst);
    }

    /// Counts a batch the parser sent to the hashing side.
    fn batch_sent(&self) {
        self.0.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts a batch the hashing side handed to the sink.
    fn batch_drained(&self) {
        self.0.drained.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Resolves once the parser waits at the closed gate and every batch it sent has been
    /// hashed and handed to the sink, or after `max`: whether it settled. A held pre-copy
    /// capture waits for this before it reports itself prepared, so that the cut's pause
    /// (its `Go`, QEMU's `stop`, its `Release`) is not left waiting for cores that the first
    /// pass's backlog keeps busy; the VM runs meanwhile.
    async fn settled(&self, max: Duration) -> bool {
        use std::sync::atomic::Ordering;
        let until = tokio::time::Instant::now() + max;
        loop {
            // `drained` before `sent`: a batch sent in between reads as not drained.
            let drained = self.0.drained.load(Ordering::SeqCst);
            if self.0.parked.load(Ordering::SeqCst) && drained >= self.0.sent.load(Ordering::SeqCst) {
                return true;
            }
            if tokio::time::Instant::now() >= until || !self.is_closed() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Opens a [`Gate`] when dropped: whatever ends a hold, QEMU must be able to send again
/// (a migration thread blocked in a write while it holds QEMU's big lock — after it paused
/// the VM on its own — would block every monitor command, the cancel too).
struct Opens(Gate);

impl Drop for Opens {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A reader that waits while its [`Gate`] is closed.
struct Gated<R> {
    inner: R,
    gate: Gate,
}

impl<R: std::io::Read> std::io::Read for Gated<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.gate.wait_open();
        self.inner.read(buf)
    }
}

/// Why a capture failed. The VM is left running if it was (except for
/// [`CaptureError::NotResumed`]).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// QMP failed or QEMU refused a command.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The VM cannot be captured in its state.
    #[error("{0}")]
    Refused(String),
    /// The migration stream was refused.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A local file or socket failed.
    #[error("{0}")]
    Io(String),
    /// The pacer cancelled the capture.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    /// The page sink failed; its error, untouched.
    #[error("{0}")]
    Sink(SinkError),
    /// The capture ended (`what`), but the VM could not be resumed.
    #[error("{what}, but could not resume the VM: {reason}")]
    NotResumed {
        /// `captured` or `aborted`.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Which VM to capture, and how.
#[derive(Clone, Debug)]
pub struct CaptureRequest<'a> {
    /// The VM's id (names the socket and spool files, and the journal entry).
    pub vm: &'a str,
    /// Its QMP socket.
    pub qmp: &'a Path,
    /// Stop-copy or pre-copy.
    pub mode: CaptureMode,
    /// Live-copy bandwidth cap for pre-copy, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Which of its disks to capture with its memory (see [`super::disks`]).
    pub disks: &'a DiskChoice,
    /// The snapshot being taken (names the disks' dirty bitmaps).
    pub snapshot: &'a str,
    /// Earlier snapshots' disk hashes, for reading only what changed since.
    pub bases: &'a dyn DiskBases,
    /// Directory for the capture socket and the spool file.
    pub work_dir: &'a Path,
    /// Distinguishes concurrent captures of this process in file names.
    pub tag: u32,
}

/// Why a VM's disks can be captured only in live mode.
const DISKS_LIVE_ONLY: &str = "a running VM's disks are captured only with a live snapshot (QEMU 7.2 ends a stop-copy or pre-copy migration by deactivating the VM's disks, which the disk views forbid): snapshot it with --mode live, or with --no-disks";

/// VMs (by QMP socket) this process is capturing: one capture per VM at a time.
static CAPTURING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A VM marked as being captured by this process, until dropped.
struct CaptureLock(PathBuf);

impl CaptureLock {
    fn take(qmp: &Path) -> Result<Self, CaptureError> {
        let mut v = CAPTURING.lock().unwrap_or_else(|p| p.into_inner());
        if v.iter().any(|p| p == qmp) {
            return Err(CaptureError::Refused("another snapshot of this VM is being taken on this host; try again when it is done".into()));
        }
        v.push(qmp.to_path_buf());
        Ok(Self(qmp.to_path_buf()))
    }
}

impl Drop for CaptureLock {
    fn drop(&mut self) {
        CAPTURING.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != self.0);
    }
}

/// The disk hashes earlier snapshots recorded, for an incremental disk read.
pub trait DiskBases: Sync {
    /// The hashes (one per 4 KiB block) of disk `device` (`size` bytes) of VM `vm` as snapshot
    /// `snapshot` recorded them, with the snapshot's creation time (ms since the epoch), if
    /// that snapshot is one this capture may build on (committed, its pages where this
    /// snapshot's placement puts them).
    fn hashes<'a>(&'a self, snapshot: &'a str, vm: &'a str, device: &'a str, size: u64) -> futures::future::BoxFuture<'a, Option<(u64, Vec<PageHash>)>>;
}

impl std::fmt::Debug for dyn DiskBases + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskBases")
    }
}

/// Where a capture notes a VM it may leave paused, so that a restarted node resumes it.
pub trait PauseJournal: Sync {
    /// VM `vm`'s migration settings are about to change and, if `touched.resume`, the VM may
    /// be paused from now on: what undoes it.
    fn touched(&self, vm: &str, touched: &Touched);
    /// VM `vm` runs again (if it ran) and its settings are back.
    fn restored(&self, vm: &str);
    /// VM `vm` (QMP socket `qmp`) may have disk views of a capture in its QEMU from now on.
    fn fleeced(&self, vm: &str, qmp: &Path);
    /// VM `vm`'s disk views are gone.
    fn unfleeced(&self, vm: &str);
}

/// When the VM was paused and resumed.
#[derive(Default)]
struct Timing {
    /// The pause: monotonic and wall-clock (µs since the epoch) time.
    paused_at: Option<(Instant, u64)>,
    resumed_at: Option<Instant>,
    /// Whether the VM was stopped to cancel the migration (and so must be resumed).
    stopped_to_cancel: bool,
}

/// What a capture changes in a VM's QEMU, and so what undoes it: journaled before the change
/// (a node that dies mid-capture undoes it on its next start, [`undo`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Touched {
    /// The VM's QMP socket.
    pub qmp: PathBuf,
    /// The VM ran: resume it (a VM paused before the capture stays paused).
    pub resume: bool,
    /// QEMU's `max-bandwidth` before.
    pub bandwidth: Option<u64>,
    /// QEMU's `downtime-limit` before.
    pub downtime: Option<u64>,
    /// Migration capabilities that were on and that the capture turns off.
    pub caps_on: Vec<String>,
}

impl Touched {
    /// Reads what [`configure`] is going to change.
    async fn read(q: &mut Qmp, qmp: &Path, resume: bool) -> Result<Self, QmpError> {
        let caps = q.execute("query-migrate-capabilities", json!({})).await?;
        let caps_on = caps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["state"].as_bool() == Some(true))
            .filter_map(|c| c["capability"].as_str())
            .filter(|c| super::CAPABILITIES_OFF.contains(c))
            .map(String::from)
            .collect();
        let params = q.execute("query-migrate-parameters", json!({})).await?;
        Ok(Self { qmp: qmp.to_path_buf(), resume, bandwidth: params["max-bandwidth"].as_u64(), downtime: params["downtime-limit"].as_u64(), caps_on })
    }

    /// Sets the settings back: the old bandwidth and downtime, `background-snapshot` off (any
    /// later migration of this VM, by its manager or ours, must be an ordinary one), then the
    /// capabilities that were on. Best effort: returns what QEMU refused.
    pub async fn put_back(&self, q: &mut Qmp) -> Vec<String> {
        let mut refused = vec![];
        if let (Some(b), Some(d)) = (self.bandwidth, self.downtime) {
            if let Err(e) = q.execute("migrate-set-parameters", json!({ "max-bandwidth": b, "downtime-limit": d })).await {
                refused.push(format!("max-bandwidth/downtime-limit: {e}"));
            }
        }
        // A QEMU without it refuses; nothing to undo then.
        let _ = q.execute("migrate-set-capabilities", json!({ "capabilities": [{ "capability": "background-snapshot", "state": false }] })).await;
        if !self.caps_on.is_empty() {
            let on: Vec<_> = self.caps_on.iter().map(|c| json!({ "capability": c, "state": true })).collect();
            if let Err(e) = q.execute("migrate-set-capabilities", json!({ "capabilities": on })).await {
                refused.push(format!("capabilities {}: {e}", self.caps_on.join(", ")));
            }
        }
        refused
    }
}

/// Undoes what a capture that never finished left in a VM's QEMU (the node died): ends its
/// migration, resumes the VM if it ran, sets its migration settings back. Returns the run
/// state the VM was resumed from, if it was.
pub async fn undo(touched: &Touched) -> Result<Option<String>, QmpError> {
    let mut q = Qmp::connect(&touched.qmp).await?;
    // A live capture's stream may still be draining through its relay. Resumed below even if
    // QEMU is slow to end it (then the next start tries again).
    if let Err(e) = q.cancel_migration(CANCEL_TIMEOUT).await {
        tracing::warn!(target: "vmcsnap::vms", qmp = %touched.qmp.display(), error = %e, "cannot end a migration a crashed snapshot left");
    }
    let mut was = None;
    if touched.resume {
        if let Settled::Resumed(w) = q.resume_settled(SETTLE_TIMEOUT).await? {
            was = Some(w);
        }
    }
    for e in touched.put_back(&mut q).await {
        tracing::warn!(target: "vmcsnap::vms", qmp = %touched.qmp.display(), error = %e, "cannot set a migration setting back");
    }
    Ok(was)
}

/// The capture socket QEMU connects to (a live capture's through its relay) and the spool
/// file; the socket file is removed on drop.
struct CaptureIo {
    sock: PathBuf,
    listener: tokio::net::UnixListener,
    spool: std::fs::File,
    relay: Option<super::relay::Relay>,
    /// A live capture's background snapshot started before the barrier and held (see
    /// [`arm`]): the filler bytes ahead of its stream, and QEMU's last `RESUME` seen then.
    armed: Option<(u64, Option<u64>)>,
}

impl Drop for CaptureIo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// A stream parsed, with each block's page map and QEMU's downtime.
type Streamed = (stream::Parsed, Vec<Vec<PageHash>>, Option<u64>);

/// Captures the VM `req` names, paced by `pacer`, handing its pages to `sink`: its memory,
/// then the disks `req.disks` chooses, as they were at the pause.
pub async fn capture(req: &CaptureRequest<'_>, pacer: &mut Pacer, sink: &impl PageSink, journal: &dyn PauseJournal) -> Result<Captured, CaptureError> {
    let _busy = CaptureLock::take(req.qmp)?;
    let mut q = Qmp::connect(req.qmp).await?;
    let facts = inspect(&mut q, req).await?;
    let disks = super::disks::list(&mut q, req.vm, &facts.cmdline, req.disks).await.map_err(CaptureError::Refused)?;
    let mut fleece = None;
    if !disks.is_empty() {
        if req.mode != CaptureMode::Live && facts.was_running {
            return Err(CaptureError::Refused(DISKS_LIVE_ONLY.into()));
        }
        // The views keep, in the data directory, the old data of every block the guest
        // rewrites while they are read: at worst the disks' whole size.
        let need: u64 = disks.iter().map(|d| d.size).sum();
        let free = crate::store::fs_free_bytes(req.work_dir);
        if free < need {
            return Err(CaptureError::Refused(format!(
                "the disk views may need up to {} in {} (the old data of every block the guest rewrites while they are read), and it has {} free: free space there, or take the snapshot with --no-disks",
                vmcsnap_protocol::units::human_bytes(need),
                req.work_dir.display(),
                vmcsnap_protocol::units::human_bytes(free)
            )));
        }
        journal.fleeced(req.vm, req.qmp);
        // What a node that died in a snapshot of this VM left behind goes first.
        match super::disks::remove_leftovers(&mut q).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(target: "vmcsnap::snapshot", vm = req.vm, removed = n, "removed disk views an interrupted snapshot had left in QEMU"),
            Err(e) => tracing::warn!(target: "vmcsnap::snapshot", vm = req.vm, error = %e, "cannot look for disk views an interrupted snapshot left"),
        }
        let tag = format!("{:012x}", rand::random::<u64>() >> 16);
        let prepared = if facts.was_running {
            super::disks::Fleece::prepare(&mut q, req.vm, disks, req.work_dir, &tag, req.snapshot).await
        } else {
            // Paused, and it stays paused: its disks are read as they are.
            Ok(super::disks::Fleece::direct(disks, req.work_dir, &tag, req.snapshot, req.vm))
        };
        let mut f = match prepared {
            Ok(f) => f,
            Err(e) => {
                journal.unfleeced(req.vm);
                return Err(e.into());
            }
        };
        // The newest earlier snapshot each disk has a bitmap of, and that snapshot's hashes.
        for k in 0..f.disks().len() {
            let d = f.disks()[k].clone();
            let mut best: Option<(u64, String, Vec<PageHash>)> = None;
            for since in d.since.iter().filter(|s| *s != req.snapshot && !f.is_direct()) {
                match req.bases.hashes(since, req.vm, &d.device, d.size).await {
                    Some((at, h)) if h.len() as u64 == d.size.div_ceil(PAGE_SIZE as u64) && best.as_ref().is_none_or(|b| at > b.0) => {
                        best = Some((at, since.clone(), h));
                    }
                    _ => {}
                }
            }
            if let Some((_, since, h)) = best {
                f.set_base(k, since, h);
            }
        }
        fleece = Some(f);
    }
    let watch = pacer.cancel_watch();
    let mut r = capture_memory(&mut q, req, facts, pacer, sink, journal, fleece.as_mut()).await;
    if let (Ok(c), Some(f)) = (&mut r, fleece.as_mut()) {
        if let Err(e) = read_disks(&mut q, req.vm, f, sink, &watch, c).await {
            r = Err(e);
        }
    }
    if let Some(f) = fleece {
        // Whatever happened: the VM runs on its disks as before, with nothing of ours.
        f.remove(&mut q, r.is_ok()).await;
        journal.unfleeced(req.vm);
    }
    r
}

/// The memory part of [`capture`]; `fleece`'s views start while the VM is paused.
async fn capture_memory(
    q: &mut Qmp,
    req: &CaptureRequest<'_>,
    mut facts: QemuFacts,
    pacer: &mut Pacer,
    sink: &impl PageSink,
    journal: &dyn PauseJournal,
    fleece: Option<&mut Fleece>,
) -> Result<Captured, CaptureError> {
    // Before anything in QEMU's migration changes: a failure here has nothing to undo.
    let mut io = CaptureIo::open(req)?;
    // Journaled before anything changes (QEMU itself may pause the VM, in pre-copy).
    let saved = Touched::read(q, req.qmp, facts.was_running).await?;
    journal.touched(req.vm, &saved);
    if let Err(e) = configure(q, req, &mut facts, &mut io, &saved).await {
        // As at the end of a capture: the entry stays if QEMU refused to take a setting back.
        if saved.put_back(q).await.is_empty() {
            journal.restored(req.vm);
        }
        return Err(e);
    }
    let req = &CaptureRequest { mode: facts.mode, ..req.clone() };
    let mut timing = Timing::default();
    let result = migrate(q, req, &facts, &mut io, pacer, sink, &mut timing, fleece).await;

    // Whatever happened: no migration left running, the VM as it was, the old parameters.
    if result.is_err() {
        // A held background snapshot is drained to its end, not cancelled (see
        // `Qmp::cancel_migration`): its relay reads it from now on.
        if let Some(r) = io.relay.as_mut() {
            r.let_go();
        }
        timing.stopped_to_cancel |= q.cancel_migration(CANCEL_TIMEOUT).await.unwrap_or(true);
    }
    // Only now (its relay is left to drain a stream QEMU may still be sending).
    drop(io);
    let mut resume_err = None;
    // Also a live capture's VM that QEMU had resumed and that was stopped to cancel.
    if facts.was_running && (timing.resumed_at.is_none() || timing.stopped_to_cancel) {
        resume_err = match q.resume_settled(SETTLE_TIMEOUT).await {
            Ok(Settled::Running | Settled::Resumed(_)) => None,
            Ok(Settled::Other(s)) => Some(format!("the VM is {s}")),
            Err(e) => Some(e.to_string()),
        };
    }
    let measured_ms = timing.paused_at.map(|(t, _)| timing.resumed_at.unwrap_or_else(Instant::now).duration_since(t).as_millis() as u64);
    let refused = saved.put_back(q).await;
    for e in &refused {
        tracing::warn!(target: "vmcsnap::snapshot", vm = req.vm, error = %e, "cannot set a migration setting back");
    }
    if resume_err.is_none() && refused.is_empty() {
        journal.restored(req.vm);
    }
    if let Some(e) = &resume_err {
        // The journal keeps the VM: the node's next start tries again.
        tracing::error!(target: "vmcsnap::snapshot", vm = req.vm, error = %e, "could not resume the VM");
    }
    if let Some(reason) = resume_err {
        return Err(CaptureError::NotResumed { what: if result.is_ok() { "captured" } else { "aborted" }, reason });
    }
    let (parsed, maps, downtime) = result?;
    // The pause as QEMU reported it (its STOP and RESUME events: what the guest had, without
    // the monitor's round trips); else as this node saw it, from before `stop` to `running`.
    let reported = q.reported_pause().filter(|_| timing.paused_at.is_some());
    let pause_ms = reported.map(|(s, r)| (r - s).div_ceil(1000)).or(measured_ms);
    let paused_unix_us = reported.map(|(s, _)| s).or(timing.paused_at.map(|(_, u)| u));
    tracing::debug!(target: "vmcsnap::cut", vm = req.vm, pause_ms, qemu_downtime_ms = downtime, "pause, and the part of it QEMU counts as its downtime");
    let mut stats = VmStats { pause_ms: pause_ms.or(downtime), paused_unix_us, ..Default::default() };
    let hashes: Vec<PageHash> = maps.into_iter().flatten().collect();
    stats.pages_total = hashes.len() as u64;
    stats.pages_zero = hashes.iter().filter(|h| h.is_zero()).count() as u64;
    stats.pages_nonzero = stats.pages_total - stats.pages_zero;
    let (device_state, tail_pages) = super::blob_chunks(&parsed.tail);
    let extra_pages = device_state.chunks.iter().zip(tail_pages).filter(|(h, _)| !h.is_zero()).map(|(h, p)| (*h, Bytes::from(p))).collect();
    let (state, blocks) = super::recorded_state(parsed.meta, device_state, facts);
    Ok(Captured { hashes, blocks, stats, qemu: Some(state), extra_pages })
}

/// The disks of `fleece`, frozen in the capture's pause, read over NBD into `sink` and added
/// to `c` as blocks after its memory.
async fn read_disks(q: &mut Qmp, vm: &str, fleece: &mut Fleece, sink: &impl PageSink, watch: &CancelWatch, c: &mut Captured) -> Result<(), CaptureError> {
    let resumed_before = q.last_resume();
    fleece.export(q).await?;
    let devices: Vec<&str> = fleece.disks().iter().map(|d| d.device.as_str()).collect();
    tracing::info!(target: "vmcsnap::snapshot", vm, disks = ?devices, "reading the disks as they were in the pause");
    for (k, d) in fleece.disks().iter().enumerate() {
        let nbd_err = |e: super::nbd::NbdError| CaptureError::Io(format!("disk {}: {e}", d.device));
        let mut nbd = super::nbd::NbdClient::connect(&fleece.sock, &d.device).await.map_err(nbd_err)?;
        if nbd.size != d.size {
            return Err(CaptureError::Io(format!("disk {}: the view has {} bytes, the disk {}", d.device, nbd.size, d.size)));
        }
        let pages = d.size.div_ceil(PAGE_SIZE as u64);
        // What to read: the blocks the base snapshot's bitmap marks (whole pages), or all.
        let (mut hashes, ranges) = match fleece.base(k) {
            Some((since, base)) => {
                let ctx = format!("qemu:dirty-bitmap:{}", fleece.bitmap(since));
                let mut status = super::nbd::NbdClient::connect_with(&fleece.sock, &d.device, Some(&ctx)).await.map_err(nbd_err)?;
                let dirty = status.ranges_with_bit0().await.map_err(nbd_err)?;
                status.disconnect().await;
                let page = PAGE_SIZE as u64;
                let ranges: Vec<(u64, u64)> = dirty.iter().map(|&(o, l)| (o / page * page, ((o + l).div_ceil(page) * page).min(d.size) - o / page * page)).collect();
                (base.clone(), ranges)
            }
            None => (vec![ZERO_HASH; pages as usize], vec![(0, d.size)]),
        };
        let mut read = 0u64;
        for (start, len) in ranges {
            let mut off = start;
            while off < start + len {
                watch.check()?;
                let n = (start + len - off).min(super::nbd::READ_BYTES_MAX as u64) as usize;
                // Whole pages: the last one of an odd-sized disk is zero-padded.
                let mut buf = vec![0u8; n.div_ceil(PAGE_SIZE) * PAGE_SIZE];
                nbd.read(off, &mut buf[..n]).await.map_err(nbd_err)?;
                let (data, chunk_hashes) = tokio::task::spawn_blocking(move || {
                    let h: Vec<PageHash> = buf.chunks_exact(PAGE_SIZE).map(hash_page).collect();
                    (Bytes::from(buf), h)
                })
                .await
                .map_err(|e| CaptureError::Io(format!("hashing failed: {e}")))?;
                let batch = chunk_hashes.iter().enumerate().filter(|(_, h)| !h.is_zero()).map(|(i, h)| (*h, data.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE))).collect::<Vec<_>>();
                if !batch.is_empty() {
                    sink.push(batch).await.map_err(CaptureError::Sink)?;
                }
                let first = (off / PAGE_SIZE as u64) as usize;
                hashes[first..first + chunk_hashes.len()].copy_from_slice(&chunk_hashes);
                read += n as u64;
                off += n as u64;
            }
        }
        tracing::info!(target: "vmcsnap::snapshot", vm, snapshot = fleece.snapshot(), device = %d.device, bytes = d.size, read, since = fleece.base(k).map(|b| b.0.as_str()), "disk read");
        nbd.disconnect().await;
        let block = DiskBlock { size: d.size, arg: d.arg, device: d.device.clone() };
        c.blocks.push(Block { name: block.name(), bytes: pages * PAGE_SIZE as u64 });
        let zero = hashes.iter().filter(|h| h.is_zero()).count() as u64;
        c.stats.pages_total += pages;
        c.stats.pages_zero += zero;
        c.stats.pages_nonzero += pages - zero;
        c.hashes.extend(hashes);
    }
    if fleece.is_direct() {
        // Read as they were only if the VM stayed paused throughout.
        let status = q.status().await?;
        // (`postmigrate` is QEMU's paused state after the migration completed.)
        if !matches!(status.as_str(), "paused" | "postmigrate") || q.last_resume() != resumed_before {
            return Err(CaptureError::Refused(format!("the VM was resumed while its disks were read (it is {status}); take the snapshot again")));
        }
    }
    Ok(())
}

/// Step 1: what the VM is and whether it can be captured now.
async fn inspect(q: &mut Qmp, req: &CaptureRequest<'_>) -> Result<QemuFacts, CaptureError> {
    let was_running = match q.status().await?.as_str() {
        "running" => true,
        "paused" => false,
        other => {
            return Err(CaptureError::Refused(format!("VM is {other}; it must be running or paused (after a migration, `cont` it first)")))
        }
    };
    let st = q.migrate_status().await?;
    if super::qmp::migration_active(&st) {
        return Err(CaptureError::Refused(format!("a migration is already {st}")));
    }
    Ok(QemuFacts {
        qmp: req.qmp.display().to_string(),
        qemu_version: q.version().await?,
        accel: q.accel().await?,
        cmdline: q.cmdline()?,
        mode: req.mode,
        was_running,
    })
}

/// Step 2: capabilities that change the stream's format off; bandwidth and downtime set; for
/// live mode, `background-snapshot` on — or, where QEMU or the host refuses it, pre-copy
/// instead (`facts.mode` says which mode is used, and is what the snapshot records).
async fn configure(q: &mut Qmp, req: &CaptureRequest<'_>, facts: &mut QemuFacts, io: &mut CaptureIo, saved: &Touched) -> Result<(), CaptureError> {
    if !saved.caps_on.is_empty() {
        tracing::info!(target: "vmcsnap::snapshot", vm = req.vm, caps = ?saved.caps_on, "turning off migration capabilities vmcsnap cannot capture (until the capture ends)");
        let off: Vec<_> = saved.caps_on.iter().map(|c| json!({ "capability": c, "state": false })).collect();
        q.execute("migrate-set-capabilities", json!({ "capabilities": off })).await?;
    }
    if facts.mode == CaptureMode::Live {
        let mut refused = live_refused(q, facts.was_running).await;
        if refused.is_none() {
            // Before the barrier: starting it costs the paused VM nothing then.
            let at = req.work_dir.join(format!("relay-{}-{}.sock", req.vm, req.tag));
            let held = setup_waits_for_its_stream(&facts.qemu_version);
            match super::relay::Relay::start(&at, &io.sock, held).await {
                Ok(r) => io.relay = Some(r),
                Err(e) => {
                    let _ = q.execute("migrate-set-capabilities", json!({ "capabilities": [{ "capability": "background-snapshot", "state": false }] })).await;
                    refused = Some(e);
                }
            }
        }
        facts.mode = match refused {
            None => CaptureMode::Live,
            Some(why) => {
                let fallback = if facts.was_running { CaptureMode::PreCopy } else { CaptureMode::StopCopy };
                tracing::warn!(target: "vmcsnap::snapshot", vm = req.vm, reason = %why, mode = ?fallback, "no live snapshot of this VM; captured with another mode");
                fallback
            }
        };
    }
    let live_bandwidth = match facts.mode {
        CaptureMode::PreCopy => req.max_bandwidth.unwrap_or(super::CAPTURE_BANDWIDTH),
        CaptureMode::StopCopy | CaptureMode::Live => super::CAPTURE_BANDWIDTH,
    };
    q.execute("migrate-set-parameters", json!({ "max-bandwidth": live_bandwidth, "downtime-limit": super::CAPTURE_DOWNTIME_LIMIT_MS }))
        .await?;
    // Last: from here on a migration runs.
    if let Some(r) = io.relay.as_mut().filter(|r| r.held) {
        match arm(q, req, r).await {
            Ok(filler) => io.armed = Some((filler, q.last_resume())),
            Err(e) => {
                tracing::warn!(target: "vmcsnap::snapshot", vm = req.vm, error = %e, "cannot start the background snapshot ahead of the pause; starting it in the pause");
                // Not the held one's path: that relay removes its socket file when it ends.
                let at = req.work_dir.join(format!("relay-{}-{}-unheld.sock", req.vm, req.tag));
                io.relay = None;
                io.relay = Some(super::relay::Relay::start(&at, &io.sock, false).await.map_err(CaptureError::Io)?);
            }
        }
    }
    Ok(())
}

/// Turns QEMU's `background-snapshot` on, or says why it cannot be used for this VM (a
/// paused VM: QEMU 7.2 would resume it, and stop-copy costs it nothing; a QEMU without the
/// capability; QEMU refusing it, e.g. for shared memory or a kernel without userfaultfd
/// write protection).
async fn live_refused(q: &mut Qmp, was_running: bool) -> Option<String> {
    if !was_running {
        return Some("the VM is paused".into());
    }
    match q.execute("query-migrate-capabilities", json!({})).await {
        Ok(caps) if caps.as_array().into_iter().flatten().any(|c| c["capability"] == "background-snapshot") => {}
        Ok(_) => return Some("this QEMU has no background-snapshot (QEMU 6.0 or later has)".into()),
        Err(e) => return Some(e.to_string()),
    }
    match q.execute("migrate-set-capabilities", json!({ "capabilities": [{ "capability": "background-snapshot", "state": true }] })).await {
        Ok(_) => None,
        Err(e) => Some(format!("QEMU refuses background-snapshot: {e}")),
    }
}

/// Whether QEMU's background snapshot writes its setup to the stream — and so can be held
/// there, the VM running — before it pauses the VM and without QEMU's big lock held: QEMU
/// 7.x (read in 7.2's `bg_migration_thread`; tried on 7.2). Later QEMU holds the big lock
/// through its setup, so a held stream would hold the monitor too.
fn setup_waits_for_its_stream(qemu_version: &str) -> bool {
    qemu_version.split('.').next() == Some("7")
}

/// More filler than any sane send buffer takes (Linux's default for a unix socket, from
/// `net.core.wmem_default`, takes about 200 KiB; the relay skips it inside the pause): the
/// capture starts its background snapshot in the pause instead.
const ARM_FILLER_MAX: u64 = 4 << 20;

/// Gives QEMU its end of a pre-copy or stop-copy stream: the node connects to the capture's
/// own socket (whose listener the parser's side accepts), passes that end to QEMU (`getfd`)
/// and sends `migrate fd:`. Stop-copy's VM is paused already: its end gets
/// [`PAUSED_SEND_BUFFER`] at once. Pre-copy's keeps the default until its pause; the returned
/// handle on it is for that (and must be dropped for the stream to end: see `finish_stream`).
async fn hand_stream(q: &mut Qmp, req: &CaptureRequest<'_>, sock: &Path) -> Result<Option<std::os::unix::net::UnixStream>, CaptureError> {
    let end = std::os::unix::net::UnixStream::connect(sock).map_err(|e| CaptureError::Io(format!("cannot connect to the capture socket: {e}")))?;
    if req.mode == CaptureMode::StopCopy {
        crate::sockbuf::enlarge_send_buffer(std::os::fd::AsFd::as_fd(&end), PAUSED_SEND_BUFFER);
    }
    q.migrate_to_fd(&format!("vmcsnap-capture-{}", req.tag), std::os::fd::AsFd::as_fd(&end)).await?;
    Ok((req.mode == CaptureMode::PreCopy).then_some(end))
}

/// Starts a live capture's background snapshot before the cut's barrier, held: a connection
/// to the held `relay`, its send buffer filled with zeros (its size is left as it is: QEMU
/// streams through it afterwards), goes to QEMU (`getfd`), and
/// `migrate fd:` starts the snapshot on the running VM. QEMU's migration thread touches every
/// page of guest RAM and writes its setup — and waits there, as nothing can be written, with
/// the VM running and the monitor free. At `Release` ([`Relay::release`]) the relay reads the
/// filler, and QEMU goes on to pause the (already paused) VM, save its device state, protect
/// its memory and resume it: a pause that no longer grows with memory size. Returns the
/// filler's length.
///
/// [`Relay::release`]: super::relay::Relay::release
async fn arm(q: &mut Qmp, req: &CaptureRequest<'_>, relay: &super::relay::Relay) -> Result<u64, String> {
    use std::io::Write;
    let conn = std::os::unix::net::UnixStream::connect(&relay.listen).map_err(|e| format!("cannot connect to the stream relay: {e}"))?;
    conn.set_nonblocking(true).map_err(|e| e.to_string())?;
    let zeros = [0u8; 4096];
    let mut filler = 0u64;
    loop {
        match (&conn).write(&zeros) {
            Ok(n) => filler += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("cannot write to the stream relay: {e}")),
        }
        if filler > ARM_FILLER_MAX {
            return Err(format!("the stream relay's connection takes more than {ARM_FILLER_MAX} bytes unread"));
        }
    }
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    let socket = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&conn))).unwrap_or_default();
    q.migrate_to_fd(&format!("vmcsnap-capture-{}", req.tag), std::os::fd::AsFd::as_fd(&conn)).await.map_err(|e| e.to_string())?;
    drop(conn);
    // Reported prepared only once QEMU waits: a page loop still running at `Go` would run
    // inside the pause.
    let t0 = Instant::now();
    let held = match q.pid() {
        Some(pid) => blocked_writing(pid, &socket, ARM_SETTLE_MAX).await,
        None => false,
    };
    let ms = t0.elapsed().as_millis() as u64;
    if held {
        tracing::debug!(target: "vmcsnap::cut", vm = req.vm, filler, ms, "background snapshot started ahead of the pause");
    } else {
        // Going on regardless: what QEMU has not done by `Go` it does in the pause.
        tracing::info!(target: "vmcsnap::snapshot", vm = req.vm, ms, "QEMU was not seen waiting in its background snapshot's setup; its pause may be longer");
    }
    Ok(filler)
}

/// Longest wait for QEMU to reach its held write in [`arm`] (its page loop reads every page of
/// guest RAM: milliseconds per GiB on an idle host).
const ARM_SETTLE_MAX: Duration = Duration::from_secs(5);

/// Waits (up to `limit`) until a thread of process `pid` is blocked writing to `socket` (its
/// `/proc` link, `socket:[INODE]`), as `/proc/PID/task/*/syscall` shows it; false when not
/// seen, or when `/proc` cannot tell (no such descriptor; another user's process).
async fn blocked_writing(pid: u32, socket: &Path, limit: Duration) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten();
    let Some(fd) = fds.filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == socket)).find_map(|e| e.file_name().to_str()?.parse::<u64>().ok()) else {
        return false;
    };
    let writes = [libc::SYS_sendmsg, libc::SYS_sendto, libc::SYS_writev, libc::SYS_write];
    let t0 = Instant::now();
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        for t in tasks {
            let Ok(line) = std::fs::read_to_string(t.path().join("syscall")) else { continue };
            let mut f = line.split_whitespace();
            let nr = f.next().and_then(|n| n.parse::<i64>().ok());
            let arg0 = f.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
            if nr.is_some_and(|n| writes.contains(&n)) && arg0 == Some(fd) {
                return true;
            }
        }
        if t0.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl CaptureIo {
    fn open(req: &CaptureRequest<'_>) -> Result<Self, CaptureError> {
        let sock = req.work_dir.join(format!("capture-{}-{}.sock", req.vm, req.tag));
        let _ = std::fs::remove_file(&sock);
        let listener =
            tokio::net::UnixListener::bind(&sock).map_err(|e| CaptureError::Io(format!("cannot listen on {}: {e}", sock.display())))?;
        let spool_path = req.work_dir.join(format!("spool-{}-{}", req.vm, req.tag));
        let spool = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&spool_path)
            .map_err(|e| CaptureError::Io(format!("cannot create the spool file {}: {e}", spool_path.display())))?;
        // Unlinked at once: it disappears with the last handle, whatever happens.
        let _ = std::fs::remove_file(&spool_path);
        Ok(Self { sock, listener, spool, relay: None, armed: None })
    }
}

/// Step 3 and 4: the migration, from `migrate` (or, for stop-copy, the pause before it) to the
/// VM running again and every page handed to the sink. The disk views of `fleece` start in
/// the pause.
#[allow(clippy::too_many_arguments)]
async fn migrate(
    q: &mut Qmp,
    req: &CaptureRequest<'_>,
    facts: &QemuFacts,
    io: &mut CaptureIo,
    pacer: &mut Pacer,
    sink: &impl PageSink,
    timing: &mut Timing,
    mut fleece: Option<&mut Fleece>,
) -> Result<Streamed, CaptureError> {
    if fleece.as_ref().is_some_and(|f| !f.is_direct()) && req.mode != CaptureMode::Live {
        // QEMU fell back from live mode (see `configure`).
        return Err(CaptureError::Refused(DISKS_LIVE_ONLY.into()));
    }
    if matches!(req.mode, CaptureMode::StopCopy | CaptureMode::Live) {
        pacer.prepared();
        pacer.wait(Step::Pause).await?;
        if facts.was_running {
            let t = (Instant::now(), unix_us());
            q.execute("stop", json!({})).await?;
            tracing::debug!(target: "vmcsnap::cut", vm = req.vm, "stopped");
            timing.paused_at = Some(t);
            if io.armed.is_some_and(|(_, resumed)| q.last_resume() != resumed) {
                // QEMU went past its setup without waiting for the stream: it paused and
                // resumed the VM on its own, and its device state is from then, not the cut.
                return Err(CaptureError::Refused(
                    "QEMU did not hold its background snapshot before pausing the VM (this QEMU version writes nothing in its setup); the capture is abandoned".into(),
                ));
            }
        }
        pacer.paused();
        // Still paused (until `cont`, or QEMU's own resume after the device state, which
        // `migrate` starts): the disk views start in the same pause as the memory's, while
        // the cut waits for the other VMs to pause.
        if let Some(f) = fleece.take() {
            f.freeze(q).await?;
        }
    }
    if req.mode == CaptureMode::Live {
        // One cut: the background snapshot (which saves the device state and lets the VM run
        // on) starts only once every VM of the cut is paused.
        pacer.wait(Step::Resume).await?;
    }
    // A live stream through the relay, which drains it should this node die: a background
    // snapshot must end, or its write protection stays (see `relay`). Otherwise QEMU gets its
    // end of the capture's socket from the node (see `hand_stream`).
    let mut qemu_end = None;
    match (io.armed, io.relay.as_mut()) {
        (Some((filler, _)), Some(relay)) => relay.release(filler).await.map_err(CaptureError::Io)?,
        (_, Some(relay)) => {
            q.execute("migrate", json!({ "uri": format!("unix:{}", relay.listen.display()) })).await?;
        }
        (_, None) => qemu_end = hand_stream(q, req, &io.sock).await?,
    }
    let relayed = io.relay.is_some();
    let connected = async {
        let (conn, _) = io.listener.accept().await.map_err(|e| CaptureError::Io(e.to_string()))?;
        if relayed {
            // The relay's connection brings QEMU's: read directly, copied by no one.
            return super::relay::take_stream(&conn).await.map_err(CaptureError::Io);
        }
        let conn = conn.into_std().map_err(|e| CaptureError::Io(e.to_string()))?;
        conn.set_nonblocking(false).map_err(|e| CaptureError::Io(e.to_string()))?;
        Ok(conn)
    };
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connected)
        .await
        .map_err(|_| CaptureError::Io("QEMU did not connect to the capture socket".into()))??;
    let spool_w = io.spool.try_clone().map_err(|e| CaptureError::Io(format!("spool file: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Batch>();
    let gate = Gate::default();
    let gated = Gated { inner: conn, gate: gate.clone() };
    let counted = gate.clone();
    let read_bytes = if req.mode == CaptureMode::PreCopy { PARSER_READ_BYTES_HELD } else { PARSER_READ_BYTES };
    let batching = Batching { vm: req.vm.to_string(), read_bytes, ..Batching::default() };
    let mut parser = tokio::task::spawn_blocking(move || parse_to_spool(gated, spool_w, tx, counted, batching));
    let watch = pacer.cancel_watch();
    // The VM resumes as soon as QEMU has sent everything and the pacer allows it: the stream is
    // parsed and spooled at stream speed while the sink takes the pages at its own pace. In
    // stop-copy the VM waits for the stream: hashing and handing pages over then would only
    // compete with it for the CPU, so that starts once the VM runs again.
    let (resumed_tx, resumed_rx) = tokio::sync::oneshot::channel::<()>();
    let resume = async {
        let _resumed_tx = resumed_tx; // dropped (and so signalled) whenever this ends
        let r = match req.mode {
            CaptureMode::Live => finish_live(q, &mut parser, watch.clone(), timing, pacer).await,
            mode => finish_stream(q, (mode, &gate, req.max_bandwidth.is_some_and(|b| b != super::CAPTURE_BANDWIDTH), qemu_end.take()), facts.was_running, pacer, &mut parser, watch.clone(), timing, fleece).await,
        };
        if r.is_err() {
            // Stop QEMU sending at once, so that the parser (and the sink) end too.
            timing.stopped_to_cancel |= q.cancel_migration(CANCEL_TIMEOUT).await.unwrap_or(true);
        }
        r
    };
    let drain = async {
        if req.mode == CaptureMode::StopCopy {
            let _ = resumed_rx.await;
        }
        drain(sink, rx, &io.spool, &watch, &gate).await
    };
    let t0 = Instant::now();
    let stage = |stage: &str| tracing::info!(target: "vmcsnap::stage", vm = req.vm, stage, ms = t0.elapsed().as_millis() as u64, "stage");
    let (resumed, drained) = tokio::join!(async { let r = resume.await; stage("streamed"); r }, async { let r = drain.await; stage("handed over"); r });
    let (parsed, downtime) = resumed?;
    let mut maps = drained?;
    // Every block gets a full-length map (pages never sent are zero).
    maps.resize_with(parsed.meta.blocks.len(), Vec::new);
    for (m, b) in maps.iter_mut().zip(&parsed.meta.blocks) {
        m.resize((b.bytes / PAGE_SIZE as u64) as usize, ZERO_HASH);
    }
    Ok((parsed, maps, downtime))
}

/// The pausing side of the migration: pre-copy's live rounds and pause (where `fleece`'s disk
/// views start), then the end of the stream, the resume the pacer allows, and QEMU's
/// `completed`. `capped`: the live rounds ran under the request's bandwidth cap, lifted at the
/// pause. `qemu_end`: pre-copy's handle on QEMU's end of the stream (see [`hand_stream`]),
/// whose send buffer grows at the pause; dropped then, and before any wait for the parser
/// (while it is open the parser sees no end of the stream).
#[allow(clippy::too_many_arguments)]
async fn finish_stream(
    q: &mut Qmp,
    (mode, gate, capped, mut qemu_end): (CaptureMode, &Gate, bool, Option<std::os::unix::net::UnixStream>),
    was_running: bool,
    pacer: &mut Pacer,
    parser: &mut tokio::task::JoinHandle<Result<stream::Parsed, StreamError>>,
    watch: CancelWatch,
    timing: &mut Timing,
    fleece: Option<&mut Fleece>,
) -> Result<(stream::Parsed, Option<u64>), CaptureError> {
    if mode == CaptureMode::PreCopy {
        let rounds = live_rounds(q, pacer, gate).await;
        if let Some(end) = qemu_end.take().filter(|_| rounds.is_ok()) {
            let granted = crate::sockbuf::enlarge_send_buffer(std::os::fd::AsFd::as_fd(&end), PAUSED_SEND_BUFFER);
            tracing::debug!(target: "vmcsnap::cut", kib = granted >> 10, "the final round's send buffer");
        }
        let self_paused = match rounds {
            Ok(p) => p,
            Err(e) => {
                // When QEMU gave up, the stream's own fault says more than its "failed": the
                // parser ends at once (QEMU closed the socket).
                if let Ok(Ok(Err(pe))) = tokio::time::timeout(Duration::from_secs(2), &mut *parser).await {
                    return Err(pe.into());
                }
                return Err(e);
            }
        };
        if was_running {
            timing.paused_at = Some(match self_paused {
                Ok(t) => t,
                Err(ready_at) => {
                    // The final round starts now, on every VM paced together. The pause counts
                    // from the command (QEMU needs a moment to stop the vCPUs).
                    let t = (Instant::now(), unix_us());
                    q.execute("stop", json!({})).await?;
                    // Still throttled, QEMU cannot have finished since: if it has, it paused
                    // the VM on its own while it was ready (from then on, an upper bound).
                    let st = q.migrate_status().await?;
                    tracing::debug!(target: "vmcsnap::cut", migration = %st, ms = t.0.elapsed().as_millis() as u64, "stopped");
                    if matches!(st.as_str(), "device" | "completed" | "pre-switchover") {
                        ready_at
                    } else {
                        t
                    }
                }
            });
        }
        // What is left goes at full speed: the VM waits for it. (Uncapped, the live rounds ran
        // at that speed already: no command more in the pause.)
        if capped {
            let _ = q.execute("migrate-set-parameters", json!({ "max-bandwidth": super::CAPTURE_BANDWIDTH })).await;
        }
        pacer.paused();
        if let Some(f) = fleece {
            f.freeze(q).await?;
        }
    }
    // A cancel ends the wait for the stream too: the VM must not stay paused for it.
    let parsed = tokio::select! {
        r = &mut *parser => r.map_err(|e| CaptureError::Io(format!("stream parser failed: {e}")))??,
        _ = watch.cancelled() => return Err(Cancelled.into()),
    };
    let since = |t: Option<(Instant, u64)>| t.map_or(0, |t| t.0.elapsed().as_millis() as u64);
    tracing::debug!(target: "vmcsnap::cut", ms = since(timing.paused_at), records = parsed.page_records, "paused: the stream ended");
    // The stream holds all of the VM now: it may run again as soon as the cut allows and QEMU
    // takes `cont` (a moment after its last byte), not only once its `completed` is seen.
    pacer.wait(Step::Resume).await?;
    tracing::debug!(target: "vmcsnap::cut", ms = since(timing.paused_at), "paused: released");
    if was_running {
        q.cont_when_finalized(COMPLETE_TIMEOUT).await?;
        timing.resumed_at = Some(Instant::now());
        tracing::debug!(target: "vmcsnap::cut", ms = since(timing.paused_at), "paused: resumed");
    }
    pacer.resumed();
    let downtime = q.wait_migration_completed(COMPLETE_TIMEOUT).await?;
    Ok((parsed, downtime))
}

/// Live mode's end: QEMU saves the paused VM's device state and resumes it by itself (noted
/// when first seen running), then sends every page as it was at the pause; the stream's end
/// and QEMU's `completed` end the capture. The VM runs throughout.
async fn finish_live(
    q: &mut Qmp,
    parser: &mut tokio::task::JoinHandle<Result<stream::Parsed, StreamError>>,
    watch: CancelWatch,
    timing: &mut Timing,
    pacer: &mut Pacer,
) -> Result<(stream::Parsed, Option<u64>), CaptureError> {
    let t0 = Instant::now();
    while timing.resumed_at.is_none() && !parser.is_finished() {
        watch.check()?;
        match q.status().await?.as_str() {
            "running" => {
                timing.resumed_at = Some(Instant::now());
                pacer.resumed();
            }
            _ if t0.elapsed() > COMPLETE_TIMEOUT => return Err(CaptureError::Refused("QEMU did not resume the VM after saving its device state".into())),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    let parsed = tokio::select! {
        r = &mut *parser => r.map_err(|e| CaptureError::Io(format!("stream parser failed: {e}")))??,
        _ = watch.cancelled() => return Err(Cancelled.into()),
    };
    let downtime = q.wait_migration_completed(COMPLETE_TIMEOUT).await?;
    if timing.resumed_at.is_none() {
        // The stream ended before a status answer said so: QEMU resumes the VM at the latest
        // when it completes.
        match q.resume_settled(SETTLE_TIMEOUT).await? {
            Settled::Running | Settled::Resumed(_) => timing.resumed_at = Some(Instant::now()),
            Settled::Other(s) => return Err(CaptureError::Refused(format!("after a live snapshot the VM is {s}"))),
        }
    }
    pacer.resumed();
    Ok((parsed, downtime))
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Pre-copy's live rounds: waits until QEMU has (nearly) made one full pass over the VM's
/// memory, then holds the copy there — by closing `gate`, since QEMU would otherwise pause an
/// idle VM on its own the moment the pass ends, long before the other VMs paced with it are
/// ready — then lets the hashing side catch up with the parser (up to [`SETTLE_MAX`], the
/// VM running: see [`Gate::settled`]) and reports the VM prepared; then waits for
/// [`Step::Pause`] and opens the gate (on every way out). If QEMU still finished on its own
/// (the hold came too late, or what was left of the pass fitted in the socket's buffers),
/// it paused the VM itself: returns when that was first seen (its status, or its `STOP`
/// event while held).
/// `Ok(Ok(t))`: QEMU paused the VM itself at `t`; `Ok(Err(t))`: the VM runs, ready since `t`.
async fn live_rounds(q: &mut Qmp, pacer: &mut Pacer, gate: &Gate) -> Result<Result<(Instant, u64), (Instant, u64)>, CaptureError> {
    // Open again on every way out, errors too (the parser may close it any time from here).
    let _opens = Opens(gate.clone());
    let mut self_paused = None;
    let watch = pacer.cancel_watch();
    loop {
        watch.check()?;
        if gate.is_closed() {
            break; // held by the parser (see below)
        }
        // The parser may close the gate while this query waits: if QEMU has just ended its
        // pass and paused the VM itself, its migration thread then blocks on the gate
        // holding QEMU's big lock, and the answer would not come until the gate opened
        // (seen: a 30 s wait for QMP's timeout, then a failed snapshot). The query is left
        // unanswered then; `Qmp` skips its answer when it comes.
        let info = tokio::select! {
            r = q.migrate_info() => r?,
            _ = gate.closing() => break,
        };
        match info.get("status").and_then(|s| s.as_str()) {
            Some(st @ ("failed" | "cancelled")) => return Err(CaptureError::Refused(format!("QEMU reports the migration {st}"))),
            Some("device") | Some("completed") | Some("pre-switchover") => {
                self_paused = Some((Instant::now(), unix_us()));
                break;
            }
            Some("active") => {
                let ram = &info["ram"];
                // The first pass sends a record for every page: the parser holds the copy
                // itself when HOLD_REMAINING_BYTES of it are left (QEMU can run ahead of it by
                // no more than the socket's buffers).
                if let Some(total) = ram["total"].as_u64().filter(|t| *t > 0) {
                    gate.hold_at((total / PAGE_SIZE as u64).saturating_sub(HOLD_REMAINING_BYTES / PAGE_SIZE as u64));
                }
                let passes_done = ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 2;
                let near_end = ram["remaining"].as_u64().is_some_and(|r| r <= HOLD_REMAINING_BYTES) && ram["transferred"].as_u64().unwrap_or(0) > 0;
                if passes_done || near_end {
                    gate.close();
                    break;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if self_paused.is_none() {
        // Held, the VM running: let the first pass's backlog through hashing before the cut
        // may pause anything (see `Gate::settled`); a cancel ends the wait.
        // A QEMU whose pass ended in buffers (a tail of zero pages is a few bytes a page)
        // pauses the VM on its own despite the hold: then it is ready at once, since the cut
        // waits on it.
        let t = Instant::now();
        let settled = tokio::select! {
            s = gate.settled(SETTLE_MAX) => s,
            r = q.stop_seen() => {
                if r.is_ok() {
                    self_paused = Some((Instant::now(), unix_us()));
                }
                false
            }
            _ = watch.clone().cancelled() => return Err(Cancelled.into()),
        };
        tracing::debug!(target: "vmcsnap::cut", settled, self_paused = self_paused.is_some(), ms = t.elapsed().as_millis() as u64, "held; the backlog handed over");
    }
    let ready_at = (Instant::now(), unix_us());
    pacer.prepared();
    // No QMP round trip while waiting: the pause must be acted on the moment it is allowed (a
    // busy QEMU can take a long while to answer; and one that paused the VM on its own may be
    // blocked on the gate holding its big lock, which only opening the gate releases).
    pacer.wait(Step::Pause).await?;
    Ok(self_paused.ok_or(ready_at))
}

/// One page record: block, page index, and where its bytes are in its batch's [`Pages`]
/// (`None` for a zero page).
type Entry = (u32, u64, Option<u64>);

/// Where a batch's non-zero pages are: in memory, one after another (counted in the node's
/// budget until dropped), or in the spool file (at the entries' offsets).
enum Pages {
    Memory(Vec<u8>, Queued),
    Spooled,
}

/// Page records handed from the parser to the hashing side, with their pages.
type Batch = (Vec<Entry>, Pages);

/// Bytes of pages this node's captures, all together, keep in memory between their parsers
/// and their hashing sides; beyond that, batches go through each capture's spool file (sinks
/// slower than QEMU's streams, or not read yet: a stop-copy pause). Within it, a page costs no
/// write to the spool and no read back.
pub const CAPTURE_MEMORY_BYTES: u64 = 64 << 20;

/// Bytes of a batch's pages counted in a budget, until dropped: by the hashing side as it
/// takes the batch, or with the queue of a capture that ended without taking them.
struct Queued {
    bytes: u64,
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How the parser batches: pages per batch, and bytes of pages it may keep in memory (the
/// node's captures share [`CAPTURE_MEMORY_BYTES`]).
#[derive(Clone)]
struct Batching {
    /// The VM, for the log.
    vm: String,
    pages: usize,
    memory: std::sync::Arc<std::sync::atomic::AtomicU64>,
    memory_max: u64,
    /// Bytes per read from the stream.
    read_bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        static QUEUED: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicU64>> = std::sync::OnceLock::new();
        Self {
            vm: String::new(),
            pages: CAPTURE_BATCH_PAGES,
            memory: QUEUED.get_or_init(Default::default).clone(),
            memory_max: CAPTURE_MEMORY_BYTES,
            read_bytes: PARSER_READ_BYTES,
        }
    }
}

/// Parses the stream; sends the page records in batches, each with its non-zero pages in
/// memory while the batches queued hold less than the budget, else appended to `spool`
/// (flushed before the batch is sent). Hashing happens on the other side, so this thread —
/// the one QEMU waits on — only copies.
fn parse_to_spool(
    conn: impl std::io::Read,
    spool: std::fs::File,
    tx: tokio::sync::mpsc::UnboundedSender<Batch>,
    gate: Gate,
    batching: Batching,
) -> Result<stream::Parsed, StreamError> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let reader = std::io::BufReader::with_capacity(batching.read_bytes, conn);
    let mut w = std::io::BufWriter::with_capacity(batching.pages * PAGE_SIZE, spool);
    let mut off = 0u64;
    let batch_bytes = (batching.pages * PAGE_SIZE) as u64;
    let in_memory = || batching.memory.load(Ordering::SeqCst) + batch_bytes <= batching.memory_max;
    let mut batch: Vec<Entry> = Vec::with_capacity(batching.pages);
    // This batch's pages, if it is kept in memory (decided when it starts; allocated at its
    // first non-zero page).
    let mut mem: Option<Vec<u8>> = in_memory().then(Vec::new);
    let spool_err = |e: std::io::Error| StreamError::Sink(format!("spool file: {e}"));
    let mut records = 0u64;
    let mut in_memory_bytes = 0u64;
    let mut send = |batch: Vec<Entry>, mem: Option<Vec<u8>>, w: &mut std::io::BufWriter<std::fs::File>| -> Result<(), StreamError> {
        let pages = match mem {
            Some(mut m) => {
                m.shrink_to_fit(); // its pages live on in the sink as slices of it
                let bytes = m.len() as u64;
                in_memory_bytes += bytes;
                batching.memory.fetch_add(bytes, Ordering::SeqCst);
                Pages::Memory(m, Queued { bytes, budget: batching.memory.clone() })
            }
            None => {
                w.flush().map_err(spool_err)?;
                Pages::Spooled
            }
        };
        gate.batch_sent();
        tx.send((batch, pages)).map_err(|_| StreamError::Sink("the capture stopped".into()))
    };
    let parsed = stream::parse(reader, |b, i, d| {
        records += 1;
        if gate.records(records) {
            tracing::debug!(target: "vmcsnap::cut", vm = batching.vm, records, "the parser holds the stream");
        }
        let entry = match d {
            Some(d) if !is_zero_page(d) => match mem.as_mut() {
                Some(m) => {
                    if m.capacity() == 0 {
                        m.reserve_exact(batching.pages * PAGE_SIZE);
                    }
                    m.extend_from_slice(d);
                    (b as u32, i, Some((m.len() - PAGE_SIZE) as u64))
                }
                None => {
                    w.write_all(d).map_err(spool_err)?;
                    off += PAGE_SIZE as u64;
                    (b as u32, i, Some(off - PAGE_SIZE as u64))
                }
            },
            _ => (b as u32, i, None),
        };
        batch.push(entry);
        if batch.len() >= batching.pages {
            send(std::mem::replace(&mut batch, Vec::with_capacity(batching.pages)), mem.take(), &mut w)?;
            mem = in_memory().then(Vec::new);
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        let _ = send(batch, mem, &mut w);
    }
    tracing::debug!(target: "vmcsnap::snapshot", vm = batching.vm, in_memory_bytes, spooled_bytes = off, records, "stream parsed");
    Ok(parsed)
}

/// Keeps each block's page map (last copy wins) and hands non-zero pages, hashed, to the
/// sink: a batch's pages from memory, or read back from the spool.
async fn drain(
    sink: &impl PageSink,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Batch>,
    spool: &std::fs::File,
    watch: &CancelWatch,
    gate: &Gate,
) -> Result<Vec<Vec<PageHash>>, CaptureError> {
    use std::os::unix::fs::FileExt;
    /// A batch's pages: in memory, or this many bytes of the spool (from its first offset).
    enum Held {
        Memory(Vec<u8>),
        Spool(std::fs::File, usize),
    }
    let mut maps: Vec<Vec<PageHash>> = Vec::new();
    while let Some((batch, pages)) = rx.recv().await {
        watch.check()?;
        // The batch's non-zero pages sit one after another (in memory, or in the spool: one
        // read); hashed on the blocking pool.
        let offs: Vec<u64> = batch.iter().filter_map(|e| e.2).collect();
        let located = match (pages, offs.first(), offs.last()) {
            (_, None, _) | (_, _, None) => None, // only zero pages
            (Pages::Memory(m, queued), _, _) => {
                drop(queued); // taken: the budget is the queue's
                Some((0, Held::Memory(m)))
            }
            (Pages::Spooled, Some(&first), Some(&last)) => {
                let spool = spool.try_clone().map_err(|e| CaptureError::Io(format!("spool file: {e}")))?;
                Some((first, Held::Spool(spool, (last - first) as usize + PAGE_SIZE)))
            }
        };
        let (first, data, hashes) = match located {
            Some((first, pages)) => {
                let (data, hashes) = tokio::task::spawn_blocking(move || -> std::io::Result<(Bytes, Vec<PageHash>)> {
                    let buf = match pages {
                        Held::Memory(m) => m,
                        Held::Spool(spool, len) => {
                            let mut buf = vec![0u8; len];
                            spool.read_exact_at(&mut buf, first)?;
                            buf
                        }
                    };
                    let hashes = buf.chunks_exact(PAGE_SIZE).map(hash_page).collect();
                    Ok((Bytes::from(buf), hashes))
                })
                .await
                .map_err(|e| CaptureError::Io(format!("hashing failed: {e}")))?
                .map_err(|e| CaptureError::Io(format!("spool file: {e}")))?;
                (first, data, hashes)
            }
            None => (0, Bytes::new(), Vec::new()),
        };
        let mut pages = Vec::with_capacity(offs.len());
        for (b, i, off) in batch {
            let b = b as usize;
            if maps.len() <= b {
                maps.resize_with(b + 1, Vec::new);
            }
            let m = &mut maps[b];
            if m.len() <= i as usize {
                m.resize(i as usize + 1, ZERO_HASH);
            }
            match off {
                Some(off) => {
                    let at = (off - first) as usize;
                    let h = hashes[at / PAGE_SIZE];
                    m[i as usize] = h;
                    pages.push((h, data.slice(at..at + PAGE_SIZE)));
                }
                None => m[i as usize] = ZERO_HASH,
            }
        }
        sink.push(pages).await.map_err(CaptureError::Sink)?;
        gate.batch_drained();
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `arm` waits for, seen in this process: a thread blocked writing to a socket whose
    /// send buffer is full is found by the socket's `/proc` link; a socket nobody writes to
    /// is not (within the limit).
    #[tokio::test]
    async fn a_thread_blocked_writing_to_a_full_socket_is_seen_in_proc() {
        use std::io::Write;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (idle, _idle_peer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let link = |s: &std::os::unix::net::UnixStream| std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(s))).expect("link");
        let (full, quiet) = (link(&a), link(&idle));
        a.set_nonblocking(true).expect("nonblocking");
        while (&a).write(&[0u8; 4096]).is_ok() {}
        a.set_nonblocking(false).expect("blocking");
        let writer = std::thread::spawn(move || {
            let _ = (&a).write_all(&[1u8; 4096]);
            a
        });
        assert!(blocked_writing(std::process::id(), &full, Duration::from_secs(5)).await);
        assert!(!blocked_writing(std::process::id(), &quiet, Duration::from_millis(50)).await);
        assert!(!blocked_writing(std::process::id(), Path::new("socket:[0]"), Duration::from_secs(5)).await, "no such descriptor: at once");
        // Let the writer finish.
        let mut sink = vec![0u8; 1 << 20];
        b.set_nonblocking(true).expect("nonblocking");
        while std::io::Read::read(&mut &b, &mut sink).is_ok() {}
        drop(writer.join().expect("writer"));
    }
    use std::io::Read;

    /// A query QEMU cannot answer while the parser holds the stream (its migration thread,
    /// having paused the VM on its own, blocks on the gate with QEMU's big lock held) does
    /// not hold up pre-copy's live rounds: they end as held, and the pause goes on.
    #[tokio::test]
    async fn a_hold_ends_the_live_rounds_while_a_query_waits() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let gate = Gate::default();
        let held = gate.clone();
        let qemu = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, mut wr) = s.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            wr.write_all(b"{\"QMP\":{\"version\":{},\"capabilities\":[]}}\n").await.expect("write");
            let mut line = String::new();
            rd.read_line(&mut line).await.expect("read");
            wr.write_all(b"{\"return\":{}}\n").await.expect("write");
            let active = b"{\"return\":{\"status\":\"active\",\"ram\":{\"total\":268435456,\"remaining\":134217728,\"transferred\":1,\"dirty-sync-count\":1}}}\n";
            for i in 0.. {
                line.clear();
                if rd.read_line(&mut line).await.expect("read") == 0 {
                    return i;
                }
                assert!(line.contains("query-migrate"), "{line}");
                if i == 2 {
                    // The parser holds the stream now; QEMU answers only once it is let go
                    // (by then the client may have hung up).
                    held.close();
                    // The parser waits at the gate, every batch it sent handed over.
                    let parked = held.clone();
                    std::thread::spawn(move || parked.wait_open());
                    while held.is_closed() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let _ = wr.write_all(active).await;
                    return i + 1;
                }
                wr.write_all(active).await.expect("write");
            }
            unreachable!()
        });
        let mut q = Qmp::connect(&path).await.expect("connect");
        let (step_tx, step_rx) = tokio::sync::watch::channel(Step::Prepare);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut pacer = Pacer::new(step_rx, tx, 0);
        let pace = tokio::spawn(async move {
            assert_eq!(rx.recv().await, Some((0, crate::source::Reached::Prepared)));
            step_tx.send_replace(Step::Pause);
            step_tx
        });
        let r = tokio::time::timeout(Duration::from_secs(10), live_rounds(&mut q, &mut pacer, &gate)).await;
        let r = r.expect("the live rounds ended while the query waited").expect("rounds");
        assert!(r.is_err(), "held while the VM runs, not paused by QEMU");
        assert!(!gate.is_closed(), "opened again at the end");
        drop(pace.await.expect("pacer"));
        drop(q);
        assert_eq!(qemu.await.expect("qemu"), 3, "the third query was held until the gate opened");
    }

    /// A held capture reports itself prepared only once its parser waits at the gate and
    /// every batch it sent was handed over (or the wait's bound passed).
    #[tokio::test]
    async fn a_held_capture_settles_once_its_backlog_is_handed_over() {
        let gate = Gate::default();
        gate.batch_sent();
        gate.batch_sent();
        gate.close();
        assert!(!gate.settled(Duration::from_millis(20)).await, "the parser is still reading");
        let parked = gate.clone();
        let parser = std::thread::spawn(move || parked.wait_open());
        assert!(!gate.settled(Duration::from_millis(20)).await, "two batches not handed over");
        gate.batch_drained();
        assert!(!gate.settled(Duration::from_millis(20)).await, "one batch not handed over");
        gate.batch_drained();
        assert!(gate.settled(Duration::from_secs(5)).await, "parked, all handed over");
        gate.open();
        parser.join().expect("parser");
        assert!(!gate.settled(Duration::from_secs(5)).await, "an open gate: nothing to wait for");
    }

    /// Pages collected by the test's sink.
    #[derive(Default)]
    struct Collect(std::sync::Mutex<Vec<(PageHash, Bytes)>>);

    impl PageSink for Collect {
        async fn push(&self, pages: Vec<(PageHash, Bytes)>) -> Result<(), crate::source::SinkError> {
            self.0.lock().expect("lock").extend(pages);
            Ok(())
        }
    }

    /// Batches of one page, memory for two of them, nothing drained until the stream is
    /// parsed: the first pages pass in memory, the rest through the spool, and the hashing side
    /// sees every page in order either way (last copy wins) and gives the memory back.
    #[tokio::test]
    async fn pages_pass_in_memory_within_the_budget_and_through_the_spool_beyond_it() {
        let (stream, want) = stream::tests::sample();
        let spool = tempfile::tempfile().expect("spool");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Batch>();
        let batching = Batching { vm: "t".into(), pages: 1, memory: Default::default(), memory_max: 2 * PAGE_SIZE as u64, read_bytes: PARSER_READ_BYTES };
        let memory = batching.memory.clone();
        let w = spool.try_clone().expect("clone");
        parse_to_spool(&stream[..], w, tx, Gate::default(), batching).expect("parsed");
        assert_eq!(memory.load(std::sync::atomic::Ordering::SeqCst), 2 * PAGE_SIZE as u64, "two batches' pages held in memory");
        assert_eq!(spool.metadata().expect("len").len(), 2 * PAGE_SIZE as u64, "the other two non-zero pages spooled");
        let (_step, steps) = tokio::sync::watch::channel(Step::Prepare);
        let (reached, _reached) = tokio::sync::mpsc::unbounded_channel();
        let watch = Pacer::new(steps, reached, 0).cancel_watch();
        let sink = Collect::default();
        let maps = drain(&sink, rx, &spool, &watch, &Gate::default()).await.expect("drained");
        assert_eq!(memory.load(std::sync::atomic::Ordering::SeqCst), 0, "given back");
        let pushed = sink.0.into_inner().expect("lock");
        assert_eq!(pushed.len(), 4, "every non-zero page sent, a re-sent one too");
        assert!(pushed.iter().all(|(h, p)| *h == hash_page(p)));
        let got: std::collections::BTreeMap<(usize, u64), PageHash> = maps
            .iter()
            .enumerate()
            .flat_map(|(b, m)| m.iter().enumerate().filter(|(_, h)| !h.is_zero()).map(move |(i, h)| ((b, i as u64), *h)))
            .collect();
        let want: std::collections::BTreeMap<(usize, u64), PageHash> = want.iter().map(|(k, p)| (*k, hash_page(p))).collect();
        assert_eq!(got, want);
    }

    /// A capture that ends with batches still queued (the hashing side failed, or the capture
    /// was dropped) gives their memory back to the node's budget.
    #[test]
    fn batches_left_in_the_queue_give_their_memory_back() {
        let (stream, _) = stream::tests::sample();
        let spool = tempfile::tempfile().expect("spool");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Batch>();
        let batching = Batching { vm: "t".into(), pages: 1, memory: Default::default(), memory_max: 1 << 20, read_bytes: PARSER_READ_BYTES };
        let memory = batching.memory.clone();
        parse_to_spool(&stream[..], spool, tx, Gate::default(), batching).expect("parsed");
        assert_eq!(memory.load(std::sync::atomic::Ordering::SeqCst), 4 * PAGE_SIZE as u64, "every non-zero page in memory");
        drop(rx);
        assert_eq!(memory.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// The parser closes the gate once, at the record asked for; reads wait while it is
    /// closed; once opened it stays open, however many records follow.
    #[test]
    fn the_parser_holds_the_stream_once_and_an_opened_gate_stays_open() {
        let gate = Gate::default();
        gate.records(1_000_000);
        assert!(!gate.is_closed(), "no hold asked for: never closed");
        gate.hold_at(10);
        gate.records(9);
        assert!(!gate.is_closed());
        gate.records(10);
        assert!(gate.is_closed());
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        std::io::Write::write_all(&mut a, b"x").expect("write");
        let mut gated = Gated { inner: b.try_clone().expect("clone"), gate: gate.clone() };
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            let t = Instant::now();
            gated.read_exact(&mut buf).expect("read");
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        gate.open();
        assert!(reader.join().expect("reader") >= Duration::from_millis(90), "the read waited for the gate");
        gate.records(11);
        gate.records(2_000_000);
        assert!(!gate.is_closed(), "opened: the parser does not close it again");
        drop(b);
    }
}

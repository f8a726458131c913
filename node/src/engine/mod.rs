//! The snapshot and restore engines.
//!
//! - [`error`]: one error type per operation, each with the kind the CLI gets;
//! - [`upload`]: pages to their owners ([`upload::Uploader`]), and image files through it;
//! - [`cut`]: a cluster snapshot as one cut (coordinator and participant state machines);
//! - [`snapshot`]: `snapshot create` — check, cut, commit;
//! - [`fetch`]: reading a snapshot back (pages from wherever they are, manifests, blobs);
//! - [`restore`]: restoring VMs, on this host or others;
//! - [`lazy`]: a launched VM runs at once and its memory follows (QEMU postcopy).
//!
//! Both are pipelines with a named bound at every stage, so a node's memory use depends on
//! these constants and not on the size of a VM:
//! - snapshot: read + hash windows of [`WINDOW_PAGES`] on the blocking pool
//!   ([`HASH_WINDOWS_IN_FLIGHT`] at once) → group new hashes by owner → per owner, `Have`
//!   batches of [`OWNER_BATCH_PAGES`] with [`OWNER_BATCHES_IN_FLIGHT`] in flight → `Put` only
//!   the missing pages;
//! - restore: windows of [`RESTORE_WINDOW_PAGES`] → fetch each distinct page once, from its first
//!   reachable owner, in `Get` batches with [`FETCHES_IN_FLIGHT`] in flight → write in place.

pub mod cut;
pub mod error;
pub mod fetch;
pub mod gc;
pub mod lazy;
pub mod repair;
pub mod restore;
pub mod scrub;
pub mod snapshot;
pub mod upload;
pub mod verify;

use vmcsnap_protocol::control::ControlEvent;

/// Logs that `snapshot` (or a VM's capture) reached `stage`, `t0` after it began: the
/// `vmcsnap::stage` lines the cluster benchmark prints as each node's stage breakdown.
pub fn stage(snapshot: &str, t0: std::time::Instant, stage: &str) {
    tracing::info!(target: "vmcsnap::stage", snapshot, stage, ms = t0.elapsed().as_millis() as u64, "stage");
}

/// Pages read and hashed as one unit (4 MiB).
pub const WINDOW_PAGES: usize = 1024;
/// Windows being read and hashed at once (spreads hashing over the cores).
pub const HASH_WINDOWS_IN_FLIGHT: usize = 3;
/// Pages per `Have` question to one owner.
pub const OWNER_BATCH_PAGES: usize = 1024;
/// Batches queued for one owner before the reader waits.
pub const OWNER_QUEUE_BATCHES: usize = 2;
/// Batches being asked/sent to one owner at once.
pub const OWNER_BATCHES_IN_FLIGHT: usize = 3;
/// `Get` requests in flight per restore window.
pub const FETCHES_IN_FLIGHT: usize = 8;
/// Pages per restore window (16 MiB of guest memory; only its non-zero pages are held).
pub const RESTORE_WINDOW_PAGES: usize = 4 * WINDOW_PAGES;
/// Restore windows being fetched while earlier ones are written.
pub const RESTORE_WINDOWS_IN_FLIGHT: usize = 3;
/// Pages looked up in this node's own store per blocking task (lookups run in parallel).
pub const LOCAL_LOOKUP_PAGES: usize = 512;

const _: () = assert!(OWNER_BATCH_PAGES <= vmcsnap_protocol::wire::HAVE_HASHES_MAX);

/// Where an engine reports progress: the control connection of the CLI that asked.
#[derive(Clone)]
pub struct Progress {
    tx: Option<tokio::sync::mpsc::Sender<ControlEvent>>,
    phase: &'static str,
    total: u64,
}

impl Progress {
    /// A reporter sending to `tx` (dropping updates when the CLI reads slowly).
    pub fn new(tx: Option<tokio::sync::mpsc::Sender<ControlEvent>>) -> Self {
        Self { tx, phase: "", total: 0 }
    }

    /// Starts a phase of `total` units.
    pub fn phase(&mut self, phase: &'static str, total: u64) {
        self.phase = phase;
        self.total = total;
        self.set(0);
    }

    /// Reports `done` units of the current phase.
    pub fn set(&self, done: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(ControlEvent::Progress { phase: self.phase.to_string(), done, total: self.total });
        }
    }
}

//! The data plane: messages exchanged between nodes over QUIC.
//!
//! Every exchange is one request and one response on a fresh bidirectional QUIC stream of a
//! long-lived, identity-authenticated connection. Many streams run at once on a connection,
//! so a snapshot keeps many batches in flight per owner.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as snapshotting node
//!     participant O as owner
//!     S->>O: Have { hashes (<= HAVE_HASHES_MAX) }
//!     O-->>S: Have { missing indexes, incarnation }
//!     S->>O: Put { pages (<= PUT_PAGES_MAX) }
//!     Note over O: re-hash every page, reject a mismatch, write to RocksDB
//!     O-->>S: Put { stored, already, incarnation }
//!     S->>O: Sync { incarnation }
//!     Note over O: refuse if restarted since; flush pages to fsynced files
//!     O-->>S: Synced
//!     S->>O: Commit { record, relay } (arbiters and R owners; the rest down a broadcast tree)
//!     O-->>S: Committed
//! ```
//!
//! The incarnation is a random number a node draws at each start. Pages an owner acknowledged
//! are in memory until `Sync`; an owner that restarted in between lost them, so `Sync` carries
//! the incarnation the owner's answers showed and a restarted owner refuses it
//! ([`RemoteErrorKind::Restarted`]): the snapshot fails instead of committing pages that are
//! gone.
//!
//! Restore is `Get { hashes (<= GET_PAGES_MAX) }` → `Pages`, with the restorer verifying every
//! page against the hash it asked for.

use crate::control::{RestoreSummary, VmInfo};
use crate::manifest::{CaptureMode, SignedRecord, SignedTombstone, VmEntry};
use crate::{NodeId, PageHash};
use serde::{Deserialize, Serialize};

/// ALPN of the data plane; the version changes with any incompatible message change, so that
/// nodes of different versions fail the TLS handshake ("no application protocol") instead of
/// misdecoding each other's messages.
///
/// - `vmcsnap/data/1`: the first data plane (commit records v1).
/// - `vmcsnap/data/2`: commit records v2 (per-VM host name and pause time, the cut's skew),
///   the cut conversation (`Cut`), VM registry and remote restore requests.
/// - `vmcsnap/data/3`: admission (`Revoke`, `Revocations`), signed commit records
///   (`Commit` and `Records` carry [`SignedRecord`]s; a name may hold conflicting records).
/// - `vmcsnap/data/4`: incarnations (`Have`, `Put`, `Sync`), deletion (`Delete`,
///   `Tombstones`), garbage-collection, scrub and repair figures in `Stats`.
/// - `vmcsnap/data/5`: name claims (`ClaimName`): of two concurrent creates of one name,
///   exactly one commits.
/// - `vmcsnap/data/6`: lazy restores (`RestoreVm` says whether eager; `Restored` says how the
///   guest came up).
/// - `vmcsnap/data/7`: disks in the cut (`CutBegin` says which disks to capture; `RestoreVm`
///   whether to write them in place; `Restored` lists the images).
/// - `vmcsnap/data/8`: catalog digests (`CatalogDigest`): a sync pulls lists only from a peer
///   whose digest differs.
/// - `vmcsnap/data/9`: garbage-collection and repair figures in `Stats` say when each member
///   learned of a change and when its last whole cycle began (`--wait`).
/// - `vmcsnap/data/10`: `Commit` names the members to hand the record on to (`relay`).
/// - `vmcsnap/data/11`: a `Get`'s answer and a `Put` carry their pages in one buffer
///   ([`PageSet`], [`PagePuts`]).
pub const DATA_ALPN: &[u8] = b"vmcsnap/data/11";

/// Most members one `Commit` asks to relay the record to.
pub const RELAY_MAX: usize = 16_384;

/// Most hashes in one `Have` request (512 KiB of hashes).
pub const HAVE_HASHES_MAX: usize = 16_384;
/// Most pages in one `Put` request (1 MiB of page data).
pub const PUT_PAGES_MAX: usize = 256;
/// Most pages asked for in one `Get` request (1 MiB of page data in the answer).
pub const GET_PAGES_MAX: usize = 256;
/// Most catalog entries in one `CatalogList` answer.
pub const CATALOG_ENTRIES_MAX: usize = 16_384;
/// Most revocations in one `Revocations` answer.
pub const REVOCATIONS_MAX: usize = 4096;
/// Most tombstones in one `Tombstones` answer (the newest).
pub const TOMBSTONES_MAX: usize = 4096;

const _: () = assert!(PUT_PAGES_MAX * crate::PAGE_SIZE < crate::codec::MESSAGE_BYTES_MAX / 2);
const _: () = assert!(GET_PAGES_MAX * crate::PAGE_SIZE < crate::codec::MESSAGE_BYTES_MAX / 2);
const _: () = assert!(HAVE_HASHES_MAX * 33 < crate::codec::MESSAGE_BYTES_MAX);

/// What a node's garbage collector found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcStats {
    /// What it does now (`idle`, `marking`, `waiting out the grace period`, `sweeping`,
    /// or the last error).
    pub state: String,
    /// Bytes of pages no live snapshot referenced at the last mark (freed at the sweep,
    /// unless a snapshot uses them meanwhile).
    pub reclaimable_bytes: u64,
    /// Bytes of pages freed since the store was created.
    pub reclaimed_bytes: u64,
    /// Bytes of the store's files on disk (page blobs, tables, log).
    pub disk_bytes: u64,
    /// When this node last learned of a deletion, ms since the epoch on its clock (0: none).
    pub changed_unix_ms: u64,
    /// When the last cycle that ran to its end began, on the same clock (0: none yet). At or
    /// after `changed_unix_ms`: what the deletions freed here is freed.
    pub done_began_unix_ms: u64,
}

/// What a node's scrubber (which reads back and checks every stored page) found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStats {
    /// `idle`, `scrubbing`, or the last error.
    pub state: String,
    /// Pages read and checked since the node started.
    pub pages_checked: u64,
    /// Damaged copies found since the node started.
    pub corrupt_found: u64,
    /// Of those, repaired from a replica.
    pub repaired: u64,
    /// When the last full pass ended (ms since the epoch; 0: none yet).
    pub last_pass_unix_ms: u64,
}

/// What a node's repair (copies of pages lost with a removed or long-gone member) did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairStats {
    /// `idle`, what it repairs now, or the last error.
    pub state: String,
    /// Copies made on new owners since the node started.
    pub copies_made: u64,
    /// Bytes sent doing it.
    pub bytes_sent: u64,
    /// When this node last learned of a change repair acts on (a member removed, snapshots
    /// learned late), ms since the epoch on its clock (0: none).
    pub changed_unix_ms: u64,
    /// When the last cycle that left nothing for the next one began, on the same clock (0:
    /// none yet). At or after `changed_unix_ms`: the copies owed here are made.
    pub done_began_unix_ms: u64,
}

/// Pages sent to an owner: the hash the sender claims for each (the owner checks it), and
/// their bytes back to back in the same order, in one buffer (as [`PageSet`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagePuts {
    hashes: Vec<PageHash>,
    data: serde_bytes::ByteBuf,
}

impl PagePuts {
    /// An empty set with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        Self { hashes: Vec::with_capacity(pages), data: serde_bytes::ByteBuf::with_capacity(pages * crate::PAGE_SIZE) }
    }

    /// Hashes and bytes as they are, checked only by [`PagePuts::pages`] (what a peer sent;
    /// tests build malformed ones with it).
    pub fn from_parts(hashes: Vec<PageHash>, data: Vec<u8>) -> Self {
        Self { hashes, data: data.into() }
    }

    /// Appends a page (exactly [`crate::PAGE_SIZE`] bytes) and its hash.
    pub fn push(&mut self, hash: PageHash, page: &[u8]) {
        debug_assert_eq!(page.len(), crate::PAGE_SIZE);
        self.hashes.push(hash);
        self.data.extend_from_slice(page);
    }

    /// How many pages (hashes) there are.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Each page with its claimed hash, or `None` if the bytes are not exactly one page per
    /// hash (a malformed request).
    pub fn pages(&self) -> Option<Vec<(PageHash, &[u8])>> {
        (self.data.len() == self.hashes.len() * crate::PAGE_SIZE).then(|| self.hashes.iter().copied().zip(self.data.chunks_exact(crate::PAGE_SIZE)).collect())
    }
}

/// A request on the data plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataRequest {
    /// Which of these pages do you lack?
    Have {
        /// Up to [`HAVE_HASHES_MAX`] page hashes.
        hashes: Vec<PageHash>,
    },
    /// Store these pages.
    Put {
        /// Up to [`PUT_PAGES_MAX`] pages.
        pages: PagePuts,
    },
    /// Send me these pages.
    Get {
        /// Up to [`GET_PAGES_MAX`] page hashes.
        hashes: Vec<PageHash>,
    },
    /// Make everything acknowledged so far durable, if this node has not restarted since the
    /// answers that acknowledged it.
    Sync {
        /// The incarnation those answers carried.
        incarnation: u64,
    },
    /// Record this committed snapshot in your catalog (checked: signed by its initiator, an
    /// admitted member), then hand it on to the members in `relay`: a broadcast tree, each
    /// member handing it to a few, each of those with its share of the rest.
    Commit {
        /// The signed commit record.
        record: SignedRecord,
        /// Members to hand it on to (none: keep it only). At most [`RELAY_MAX`].
        relay: Vec<NodeId>,
    },
    /// Delete this snapshot record: drop it from your catalog and keep the tombstone, so it
    /// never comes back (checked: signed by an admitted member).
    Delete {
        /// The signed tombstone.
        tombstone: SignedTombstone,
    },
    /// Send your tombstones (the newest [`TOMBSTONES_MAX`]).
    Tombstones,
    /// List the snapshots in your catalog.
    CatalogList,
    /// Send the digest of what you would answer to `CatalogList`, `Tombstones` and
    /// `Revocations` (see [`DataResponse::CatalogDigest`]).
    CatalogDigest,
    /// Send the signed commit records of this snapshot (one, or several in conflict).
    CatalogGet {
        /// Snapshot name.
        name: String,
    },
    /// How many pages and bytes do you store?
    Stats,
    /// Take part in a cluster snapshot: capture these VMs of your host as one cut with the
    /// other participants. The stream stays open for the cut's conversation: the asker sends
    /// [`CutCommand`] frames and the participant [`CutReport`] frames (see [`CutBegin`]).
    Cut(CutBegin),
    /// Which VMs run on your host?
    VmList,
    /// This VM now runs elsewhere: forget it.
    VmForget {
        /// VM id.
        id: String,
    },
    /// A member was removed from the cluster: here is the cluster key's revocation (a token,
    /// see `vmcsnap_dht::admission`). Checked, kept and applied by the receiver.
    Revoke {
        /// The revocation token.
        token: String,
    },
    /// Which revocations do you know?
    Revocations,
    /// Restore this VM of a snapshot on your host: start its recorded QEMU command line and
    /// load the snapshot into it.
    RestoreVm {
        /// Snapshot name, or `NAME@ID` to pick one of conflicting records.
        name: String,
        /// VM id.
        vm: String,
        /// Load all memory before the guest runs (no postcopy).
        eager: bool,
        /// Write the VM's disks over the images its recorded command line names.
        in_place: bool,
    },
    /// Grant snapshot name `name` to commit record `record` (you are one of the name's
    /// arbiters: its first [`NAME_ARBITERS`] owners). Granted unless you keep a record under
    /// that name with another id, or another record's claim on it is younger than
    /// [`NAME_CLAIM_TTL_MS`]; the grant is kept durably. With `release`, drop `record`'s claim.
    ClaimName {
        /// Snapshot name.
        name: String,
        /// The claiming commit record's id.
        record: PageHash,
        /// Drop the claim instead (its create failed).
        release: bool,
    },
}

/// Members that decide which record gets a snapshot name: the name's first owners (rendezvous
/// over the owner view, on the BLAKE3 hash of the name). A create commits only with grants
/// from a majority of them.
pub const NAME_ARBITERS: usize = 3;
/// How long a granted name claim holds off other records (the claimer commits within it, or
/// its claim lapses).
pub const NAME_CLAIM_TTL_MS: u64 = 5 * 60 * 1000;

/// Opens a participant's part of a cluster snapshot.
///
/// ```mermaid
/// sequenceDiagram
///     participant C as initiating node
///     participant P as participant (each host with VMs)
///     C->>P: Cut(CutBegin)
///     Note over P: prepare each VM (pre-copy: live rounds until one full pass)
///     P-->>C: Ready
///     C->>P: Go (to every participant at once)
///     Note over P: pause each VM (stop-copy: then copy it)
///     P-->>C: Paused
///     C->>P: Release (every VM of the cut is paused)
///     Note over P: resume each VM once QEMU sent it all; upload pages, sync owners
///     P-->>C: Done { VM entries }
///     Note over C: commit record, as for a local snapshot
/// ```
///
/// Either side sends `Heartbeat` every second; a participant aborts (resuming its VMs) when
/// the asker is silent for [`CUT_SILENCE_MAX_MS`] or sends `Abort`; the asker aborts the whole
/// cut when any participant fails or goes silent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutBegin {
    /// Snapshot name.
    pub name: String,
    /// The participant's VMs: id and, for a VM not registered there, its source.
    pub vms: Vec<(String, Option<String>)>,
    /// Capture mode.
    pub mode: CaptureMode,
    /// Copies of every page.
    pub replicas: u8,
    /// The placement view every participant places pages over.
    pub placement: Vec<NodeId>,
    /// Live-copy bandwidth cap (bytes/s), if any.
    pub max_bandwidth: Option<u64>,
    /// Which disks of each VM to capture with its memory.
    pub disks: DiskChoice,
}

/// Which disks of a QEMU VM a snapshot captures with its memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskChoice {
    /// Every writable disk (read-only ones stay references: their paths, as recorded).
    #[default]
    All,
    /// None: memory only (a restore then uses the recorded disk paths as they are).
    None,
    /// Only the writable disks with these device names (`virtio0`, or a drive's `id`).
    Only(Vec<String>),
}

impl DiskChoice {
    /// Whether the disk with QEMU device name `device` is captured.
    pub fn wants(&self, device: &str) -> bool {
        match self {
            DiskChoice::All => true,
            DiskChoice::None => false,
            DiskChoice::Only(ids) => ids.iter().any(|d| d == device),
        }
    }
}

/// Silence after which a cut's peer counts as gone.
pub const CUT_SILENCE_MAX_MS: u64 = 6_000;
/// How often each side of a cut says it is alive.
pub const CUT_HEARTBEAT_MS: u64 = 1_000;

/// From the initiating node to a participant, after [`CutBegin`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CutCommand {
    /// Pause your VMs now.
    Go,
    /// Every VM of the cut is paused: resume yours once captured.
    Release,
    /// Give up: resume your VMs, commit nothing.
    Abort {
        /// Why.
        reason: String,
    },
    /// Still here.
    Heartbeat,
}

/// From a participant to the initiating node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CutReport {
    /// Every VM is prepared (pre-copy: has done its live rounds).
    Ready,
    /// Every VM is paused.
    Paused,
    /// Every page is durable on its owners; here are the VM entries for the record.
    Done {
        /// One per VM, in the order asked.
        vms: Vec<VmEntry>,
    },
    /// This participant failed; its VMs are resumed.
    Failed {
        /// The VM concerned, if one.
        vm: Option<String>,
        /// What kind of failure (the operator sees it with the message).
        kind: crate::control::ErrorKind,
        /// Why.
        reason: String,
    },
    /// Still here.
    Heartbeat,
}

/// One catalog entry: enough to notice a missing or conflicting record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Snapshot name.
    pub name: String,
    /// The record's id: BLAKE3 of the encoded commit record.
    pub record_hash: PageHash,
}

/// What went wrong on the far side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// A page did not hash to the hash it was sent with.
    HashMismatch,
    /// The request broke a protocol limit or rule.
    BadRequest,
    /// A snapshot of that name exists with different content.
    NameConflict,
    /// The node's store failed (disk full, IO error).
    Storage,
    /// The asked work failed (a restore, an unknown VM).
    Failed,
    /// The node restarted since the answers a `Sync` names: what it acknowledged may be lost.
    Restarted,
}

/// The pages of a `Get` answer: whether each requested page is there, and the bytes of those
/// that are, back to back in request order. One buffer for all of them, not one per page: the
/// owner reads into it and the asker slices it (a 4 KiB allocation per page on both sides was
/// a tenth of a restoring node's CPU).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSet {
    /// One entry per requested hash: whether `data` holds its page.
    found: Vec<bool>,
    /// The found pages, [`crate::PAGE_SIZE`] bytes each.
    data: serde_bytes::ByteBuf,
}

impl PageSet {
    /// An empty set with room for `pages` found pages.
    pub fn with_capacity(pages: usize) -> Self {
        Self { found: Vec::with_capacity(pages), data: serde_bytes::ByteBuf::with_capacity(pages * crate::PAGE_SIZE) }
    }

    /// The pages of `pages`, in order (`None`: not held). A page that is not
    /// [`crate::PAGE_SIZE`] bytes counts as not held.
    pub fn of<P: AsRef<[u8]>>(pages: impl IntoIterator<Item = Option<P>>) -> Self {
        let mut s = Self::default();
        for p in pages {
            s.push(p.as_ref().map(|p| p.as_ref()));
        }
        s
    }

    /// Appends the next requested page (`None`, or a page that is not [`crate::PAGE_SIZE`]
    /// bytes: not held).
    pub fn push(&mut self, page: Option<&[u8]>) {
        match page {
            Some(p) if p.len() == crate::PAGE_SIZE => {
                self.found.push(true);
                self.data.extend_from_slice(p);
            }
            _ => self.found.push(false),
        }
    }

    /// How many pages were requested.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    /// Whether no page was requested.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Where each requested page lies in [`PageSet::into_data`] (`None`: not held), or `None`
    /// if the data does not hold exactly the found pages (a malformed answer).
    pub fn ranges(&self) -> Option<Vec<Option<std::ops::Range<usize>>>> {
        let mut at = 0;
        let ranges = self
            .found
            .iter()
            .map(|&f| {
                f.then(|| {
                    at += crate::PAGE_SIZE;
                    at - crate::PAGE_SIZE..at
                })
            })
            .collect();
        (at == self.data.len()).then_some(ranges)
    }

    /// Each requested page (`None`: not held), or `None` if the answer is malformed.
    pub fn pages(&self) -> Option<Vec<Option<&[u8]>>> {
        Some(self.ranges()?.into_iter().map(|r| r.map(|r| &self.data[r])).collect())
    }

    /// The found pages' bytes, back to back (see [`PageSet::ranges`]).
    pub fn into_data(self) -> Vec<u8> {
        self.data.into_vec()
    }
}

/// An answer on the data plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataResponse {
    /// Indexes (into the request) of the pages this owner lacks.
    Have {
        /// Missing indexes, ascending.
        missing: Vec<u32>,
        /// The answering node's incarnation.
        incarnation: u64,
    },
    /// The pages are stored, in memory until the next `Sync`.
    Put {
        /// Pages newly written.
        stored: u32,
        /// Pages the owner already had.
        already: u32,
        /// The answering node's incarnation.
        incarnation: u64,
    },
    /// The pages asked for, in order, and which of them this node does not hold.
    Pages {
        /// One entry per requested hash.
        pages: PageSet,
    },
    /// Everything acknowledged before is on disk.
    Synced,
    /// The commit record is stored (and synced).
    Committed,
    /// The catalog.
    Catalog {
        /// Up to [`CATALOG_ENTRIES_MAX`] entries.
        entries: Vec<CatalogEntry>,
    },
    /// The signed commit records of a name this node has (empty if none; several when
    /// members committed different records under one name).
    Records {
        /// At most [`crate::manifest::NAME_VERSIONS_MAX`].
        records: Vec<SignedRecord>,
    },
    /// Store statistics.
    Stats {
        /// The node's identity.
        node: NodeId,
        /// Distinct pages stored.
        pages: u64,
        /// Bytes of page data stored.
        bytes: u64,
        /// Bytes free on the store's file system.
        free_bytes: u64,
        /// Whether the node refuses new pages now (less free than its `--min-free`).
        full: bool,
        /// Garbage collection on that node.
        gc: GcStats,
        /// The scrubber on that node.
        scrub: ScrubStats,
        /// Repair on that node.
        repair: RepairStats,
    },
    /// The tombstones a node keeps (newest first).
    Tombstones {
        /// At most [`TOMBSTONES_MAX`].
        tombstones: Vec<SignedTombstone>,
    },
    /// The VMs on the answering node's host.
    Vms {
        /// The node's name.
        host: String,
        /// Its VMs.
        vms: Vec<VmInfo>,
    },
    /// A VM restored on the answering node's host.
    Restored(RestoreSummary),
    /// One hash of the answering node's catalog: its signed commit records (name and record
    /// id), its tombstones and its revocations, each set in a fixed order. Two nodes with the
    /// same digest hold the same catalog; a sync pulls the lists only from a peer whose digest
    /// differs from its own.
    CatalogDigest {
        /// BLAKE3 of the three sets.
        digest: [u8; 32],
    },
    /// The revocations the answering node knows, as tokens.
    Revocations {
        /// Up to [`REVOCATIONS_MAX`] tokens.
        tokens: Vec<String>,
    },
    /// The answer to `ClaimName`: `None` if granted (or released), else the record that holds
    /// the name here.
    NameClaim {
        /// The holder, if not the asker.
        holder: Option<PageHash>,
    },
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// Which kind of failure.
        kind: RemoteErrorKind,
        /// A short human message.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn a_page_set_keeps_order_and_gaps_and_refuses_a_short_buffer() {
        let (a, b) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE]);
        let set = PageSet::of([Some(&a[..]), None, Some(&b[..]), Some(&[9u8; 10][..])]);
        assert_eq!(set.len(), 4);
        assert_eq!(set.pages().expect("well formed"), vec![Some(&a[..]), None, Some(&b[..]), None]);
        assert_eq!(set.ranges().expect("well formed"), vec![Some(0..PAGE_SIZE), None, Some(PAGE_SIZE..2 * PAGE_SIZE), None]);
        // Through the codec, as a `Get` answer.
        let msg = DataResponse::Pages { pages: set.clone() };
        let back: DataResponse = crate::codec::decode_body(&crate::codec::encode_body(&msg).expect("encode")).expect("decode");
        assert_eq!(back, msg);
        // An answer whose bytes do not match its found pages is malformed, never misread.
        let mut short = set.clone();
        short.data.truncate(PAGE_SIZE + 1);
        assert_eq!((short.pages(), short.ranges()), (None, None));
        let mut long = set;
        long.data.extend_from_slice(&[0u8; PAGE_SIZE]);
        assert!(long.pages().is_none());
        assert_eq!(PageSet::default().pages().expect("empty"), Vec::<Option<&[u8]>>::new());
    }

    #[test]
    fn pages_put_pair_each_hash_with_its_page_and_a_short_buffer_is_refused() {
        let (a, b) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE]);
        let (ha, hb) = (PageHash([1; 32]), PageHash([2; 32]));
        let mut puts = PagePuts::with_capacity(2);
        puts.push(ha, &a);
        puts.push(hb, &b);
        assert_eq!(puts.len(), 2);
        assert_eq!(puts.pages().expect("well formed"), vec![(ha, &a[..]), (hb, &b[..])]);
        let msg = DataRequest::Put { pages: puts };
        let back: DataRequest = crate::codec::decode_body(&crate::codec::encode_body(&msg).expect("encode")).expect("decode");
        assert_eq!(back, msg);
        assert!(PagePuts::from_parts(vec![ha], vec![7u8; 100]).pages().is_none());
        assert!(PagePuts::from_parts(vec![ha], [a.clone(), b].concat()).pages().is_none());
        assert!(PagePuts::from_parts(vec![ha, hb], a).pages().is_none());
        assert_eq!(PagePuts::default().pages().expect("empty"), vec![]);
    }
}

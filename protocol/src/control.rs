//! The control API: what the `vmcsnap` CLI asks its local node over `DIR/control.sock`.
//!
//! One request per connection; the node answers with any number of [`ControlEvent::Progress`]
//! frames and then exactly one `Done` or `Failed`.
//!
//! Every frame body, both ways, is a versioned record ([`CONTROL_MAGIC`], [`CONTROL_VERSION`],
//! then the bincode body: [`encode_control`], [`decode_control`]), so that a CLI and a node of
//! different versions get a clear "version mismatch" instead of misdecoding each other.

use crate::codec::{self, CodecError, FRAME_HEADER_BYTES};
use crate::manifest::{CaptureMode, CommitRecord, VmStats};
use crate::NodeId;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Magic at the start of every control frame body.
pub const CONTROL_MAGIC: [u8; 4] = *b"VMCC";
/// Version of the control protocol. Version 1 was unversioned (bare bincode frames); 2 added
/// this header and [`ErrorKind`]; 3 record ids and conflicts; 4 deletion, verify, GC and
/// scrub figures; 5 `snapshot list --unique`; 6 the gossiped member states in
/// [`MemberEntry`].
pub const CONTROL_VERSION: u16 = 6;

/// Encodes one control message as a frame (length, magic, version, body).
pub fn encode_control<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let record = codec::encode_record(CONTROL_MAGIC, CONTROL_VERSION, msg)?;
    if record.len() > codec::MESSAGE_BYTES_MAX {
        return Err(CodecError::TooLarge { len: record.len(), max: codec::MESSAGE_BYTES_MAX });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + record.len());
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(&record);
    Ok(out)
}

/// Decodes a control frame body; a body of another version or without the magic is
/// [`CodecError::BadVersion`] or [`CodecError::BadMagic`] (see [`is_version_mismatch`]).
pub fn decode_control<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    codec::decode_record(CONTROL_MAGIC, "control", CONTROL_VERSION, body)
}

/// Whether a decode failure means the other side speaks another control protocol version.
pub fn is_version_mismatch(e: &CodecError) -> bool {
    matches!(e, CodecError::BadVersion { .. } | CodecError::BadMagic { .. })
}

/// What kind of failure a control request met: for scripts (`--json`) and exit handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or asks for something impossible (a bad name, a bad option).
    Invalid,
    /// A snapshot, VM or host that does not exist.
    NotFound,
    /// A name already taken, or a VM registered elsewhere.
    Conflict,
    /// Too few members, an owner or host down, a page no owner can serve.
    Unavailable,
    /// A peer failed or refused mid-operation.
    Peer,
    /// Driving QEMU failed (the VM is left running if it was).
    Qemu,
    /// A local disk or store failure.
    Storage,
    /// The cluster snapshot was aborted (another VM or host failed).
    Aborted,
    /// The other side speaks another protocol version.
    VersionMismatch,
    /// A bug or an unexpected local failure.
    Internal,
}

impl ErrorKind {
    /// The kind's name as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Peer => "peer",
            ErrorKind::Qemu => "qemu",
            ErrorKind::Storage => "storage",
            ErrorKind::Aborted => "aborted",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::Internal => "internal",
        }
    }
}

/// One VM to snapshot: the operator's id and, for a VM not registered with any node, where
/// its memory is on the asked node's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// VM id.
    pub id: String,
    /// `file:/abs/path.img` or `qemu:/abs/qmp.sock` on the asked node's host; `None` for a VM
    /// registered with some node (`vmcsnap vm add`, `--vm-dir`), wherever it runs.
    pub source: Option<String>,
}

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Take a snapshot of VMs on any hosts, as one cut.
    SnapshotCreate {
        /// Snapshot name.
        name: String,
        /// VMs to capture.
        vms: Vec<VmSpec>,
        /// Also every VM registered anywhere in the cluster.
        all: bool,
        /// How to capture running QEMU VMs.
        mode: CaptureMode,
        /// Copies of every page; `None` for the node's `--replicas`.
        replicas: Option<u8>,
        /// Cap on each VM's live-copy bandwidth in bytes/s (pre-copy); `None` for no cap.
        max_bandwidth: Option<u64>,
        /// Which disks to capture with each VM's memory.
        disks: crate::wire::DiskChoice,
    },
    /// Restore VMs of a snapshot.
    SnapshotRestore {
        /// Snapshot name.
        name: String,
        /// VM ids; empty for every VM of the snapshot (with `launch` only).
        vms: Vec<String>,
        /// Where each VM is launched: `HOST` for all of them, or `VM=HOST`; a VM not named
        /// goes back to the host that captured it if it is up, else to this node's host.
        on: Vec<String>,
        /// Target: `file:/abs/path.img`, `qemu:unix:/path` (a QEMU waiting with
        /// `-incoming unix:/path`), or `None` with `launch`.
        target: Option<String>,
        /// Replace a file target if it exists.
        force: bool,
        /// Start the recorded QEMU command line on this host with `-incoming`, and restore
        /// into it.
        launch: bool,
        /// QMP socket of the target QEMU (for `qemu:` targets): used to check the
        /// accelerator and resume the guest.
        qmp: Option<String>,
        /// With `launch`: load all memory before the guest runs, instead of running it at
        /// once with its memory following (postcopy).
        eager: bool,
        /// With a `file:` target: write this disk of the VM (its device name) instead of its
        /// memory.
        disk: Option<String>,
        /// With `launch`: write the VMs' disks over the images their recorded command lines
        /// name (the operator confirmed), instead of into new images.
        in_place: bool,
    },
    /// List snapshots.
    SnapshotList {
        /// Also work out what each holds uniquely (reads every manifest).
        unique: bool,
    },
    /// Show one snapshot.
    SnapshotShow {
        /// Snapshot name.
        name: String,
    },
    /// Check that every page of a snapshot is on each of its owners (deep: read back and
    /// hashed there).
    SnapshotVerify {
        /// Snapshot name (or `NAME@ID`).
        name: String,
        /// Read and hash every copy.
        deep: bool,
    },
    /// Delete snapshots, everywhere (`NAME` or `NAME@ID` each): a signed tombstone per record,
    /// kept here and given to every live member. Their pages are freed by garbage collection.
    SnapshotDelete {
        /// The snapshots.
        names: Vec<String>,
    },
    /// Members and what they store.
    ClusterStatus,
    /// Register a QEMU VM running on this host.
    VmAdd {
        /// VM id, unique in the cluster.
        id: String,
        /// Its QMP socket (absolute path).
        qmp: String,
    },
    /// Forget a VM registered on this host.
    VmRemove {
        /// VM id.
        id: String,
    },
    /// Every VM registered on any live member.
    VmList,
    /// Remove a member from the cluster: a revocation token signed by the cluster key
    /// (`vmcsnap cluster remove` makes it with the operator's key file).
    ClusterRemove {
        /// The revocation token.
        token: String,
    },
    /// This node's member list, as its membership knows it (asks no peer: cheap at any
    /// cluster size, unlike `ClusterStatus`).
    ClusterMembers,
}

/// A VM a node knows of on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM id.
    pub id: String,
    /// Its QMP socket.
    pub qmp: String,
    /// `added` (`vmcsnap vm add`, or launched by a restore) or `dir` (found in `--vm-dir`).
    pub origin: String,
    /// QEMU's run state (`running`, `paused`, ...), `busy` when its monitor is in use, or
    /// `unreachable`.
    pub status: String,
    /// Name of the host's node.
    pub host: String,
    /// The host's node id.
    pub node: NodeId,
}

/// A snapshot as `snapshot list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Name.
    pub name: String,
    /// Commit time, ms since the epoch.
    pub created_unix_ms: u64,
    /// VM ids.
    pub vms: Vec<String>,
    /// Raw memory bytes over all VMs.
    pub raw_bytes: u64,
    /// Page bytes that were new to the cluster (one copy).
    pub new_bytes: u64,
    /// With `unique`: bytes (one copy) of the pages no other snapshot references, which
    /// deleting this one would free.
    pub unique_bytes: Option<u64>,
    /// Replicas.
    pub replicas: u8,
    /// The record's id (first 12 hex characters): `NAME@ID` picks this record.
    pub record: String,
    /// Other records exist under this name (committed by different members): restore
    /// refuses the bare name until the operator picks one with `NAME@ID`.
    pub conflict: bool,
    /// Signed by its initiator; false only for a record kept from before admission, which
    /// only this node trusts.
    pub signed: bool,
    /// Name of the member that committed it (its node id if it is not a member now).
    pub initiator: String,
}

/// The outcome of `snapshot create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSummary {
    /// Name.
    pub name: String,
    /// Raw memory bytes over all VMs.
    pub raw_bytes: u64,
    /// Page bytes sent to other owners, over all replicas.
    pub bytes_sent: u64,
    /// Page bytes new to the cluster (one copy).
    pub new_bytes: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
    /// Per-VM counters.
    pub vms: Vec<(String, VmStats)>,
    /// Host name of each VM, in the order of `vms`.
    pub hosts: Vec<String>,
    /// Time between the first and the last pause of the cut, µs.
    pub pause_skew_us: Option<u64>,
}

/// The outcome of restoring one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSummary {
    /// Snapshot.
    pub name: String,
    /// VM id.
    pub vm: String,
    /// Name of the host it was restored on.
    pub host: String,
    /// Target written.
    pub target: String,
    /// Bytes of guest memory written.
    pub raw_bytes: u64,
    /// Distinct non-zero pages needed.
    pub pages_needed: u64,
    /// Of those, pages this node already held.
    pub pages_local: u64,
    /// Of those, pages another restore on this node fetched at the same time (clones, VMs of
    /// one image): taken from it, not fetched again.
    pub pages_shared: u64,
    /// Page bytes fetched from peers.
    pub bytes_fetched: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
    /// Process id of the QEMU started with `--launch`.
    pub launched_pid: Option<u32>,
    /// Run state of the target QEMU after the restore, when known.
    pub vm_status: Option<String>,
    /// Whether the guest ran before its memory had arrived (postcopy).
    pub lazy: bool,
    /// From the restore's start until the guest ran, ms (`elapsed_ms` is until all memory
    /// was there).
    pub running_ms: Option<u64>,
    /// Lazy restore: pages the guest asked for before they had been pushed.
    pub pages_requested: Option<u64>,
    /// Why the restore was not lazy, where it could have been.
    pub note: Option<String>,
    /// The VM's disks as restored (`--launch`): `DEVICE=PATH` of each new image.
    pub disks: Vec<String>,
}

/// One member as `cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id (hex in JSON).
    pub id: NodeId,
    /// Data-plane address.
    pub address: String,
    /// Its name (`--name`).
    pub name: String,
    /// Fraction of the hash space this member is primary owner of.
    pub share: f64,
    /// Distinct pages stored; `None` when the member did not answer.
    pub pages: Option<u64>,
    /// Page bytes stored; `None` when the member did not answer.
    pub bytes: Option<u64>,
    /// Reachable now.
    pub alive: bool,
    /// This is the node that answered the request.
    pub local: bool,
    /// Bytes free on its store's file system; `None` when the member did not answer.
    pub free_bytes: Option<u64>,
    /// It refuses new pages (less free than its `--min-free`); `None` when it did not answer.
    pub full: Option<bool>,
    /// Its garbage collector; `None` when the member did not answer.
    pub gc: Option<crate::wire::GcStats>,
    /// Its scrubber; `None` when the member did not answer.
    pub scrub: Option<crate::wire::ScrubStats>,
    /// Its repair; `None` when the member did not answer.
    pub repair: Option<crate::wire::RepairStats>,
}

/// What `snapshot verify` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The snapshot.
    pub name: String,
    /// Its record id (first 12 hex characters).
    pub record: String,
    /// Whether every copy was read and hashed (not just asked for).
    pub deep: bool,
    /// One entry per VM.
    pub vms: Vec<VmVerify>,
    /// Every copy of every page is where it should be (and, deep, correct).
    pub ok: bool,
}

/// One VM's pages, per owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmVerify {
    /// The VM.
    pub vm: String,
    /// Distinct non-zero pages the VM's snapshot needs (memory, manifest, device state).
    pub pages: u64,
    /// Each owner of some of them.
    pub owners: Vec<OwnerVerify>,
}

/// What one owner holds of one VM's pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerVerify {
    /// The owner's name (its node id if it is not a member now).
    pub owner: String,
    /// Pages it should hold.
    pub pages: u64,
    /// Of those, pages it does not hold.
    pub missing: u64,
    /// Of those, pages whose copy is damaged (deep only).
    pub corrupt: u64,
    /// Why it could not be asked (down, unreachable); its pages are then not counted.
    pub unreachable: Option<String>,
}

/// One deleted snapshot record (`snapshot delete`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Its name.
    pub name: String,
    /// Its record id (first 12 hex characters).
    pub record: String,
    /// Live peers that took the tombstone (the others learn it at their next catalog sync).
    pub told: usize,
}

/// The answer to `cluster status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The answering node.
    pub node: NodeId,
    /// Replicas new snapshots use.
    pub replicas: u8,
    /// Every known member.
    pub members: Vec<MemberStatus>,
}

/// A result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlResult {
    /// From `SnapshotCreate`.
    Created(CreateSummary),
    /// From `SnapshotRestore`: one summary per VM.
    Restored(Vec<RestoreSummary>),
    /// From `SnapshotList`.
    List(Vec<SnapshotInfo>),
    /// From `SnapshotShow`.
    Show(Box<CommitRecord>),
    /// From `SnapshotDelete`.
    Deleted(Vec<Deleted>),
    /// From `SnapshotVerify`.
    Verified(VerifyReport),
    /// From `ClusterStatus`.
    Cluster(ClusterStatus),
    /// From `VmAdd` and `VmRemove`.
    VmChanged,
    /// From `VmList`.
    Vms(Vec<VmInfo>),
    /// From `ClusterRemove`.
    Removed {
        /// The removed node.
        node: NodeId,
        /// Whether this node knew of the removal already.
        already: bool,
        /// Live members told now (the others learn it when they next sync).
        told: usize,
    },
    /// From `ClusterMembers`.
    Members(MemberList),
}

/// A node's view of the membership (`vmcsnap cluster members`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    /// The answering node.
    pub node: NodeId,
    /// Every known member, sorted by id.
    pub members: Vec<MemberEntry>,
}

/// One member in a [`MemberList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Node id (hex in JSON).
    pub id: NodeId,
    /// Its name.
    pub name: String,
    /// Data-plane (and membership) address.
    pub address: String,
    /// Up: alive or suspected, as SWIM counts it.
    pub alive: bool,
    /// This is the node that answered.
    pub local: bool,
    /// The run of its process this node knows (0 if none yet).
    pub incarnation: u32,
    /// What the member last said about itself by gossip, if this node has heard it yet.
    pub said: Option<SaidState>,
}

/// What a member says about itself by gossip (`dht::state::MemberState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaidState {
    /// Its disk has less free space than its `--min-free` (snapshots place around it).
    pub full: bool,
    /// The ids of the VMs registered with it; `None` if the list was too long to gossip.
    pub vms: Option<Vec<String>>,
}

/// One frame from node to CLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlEvent {
    /// Work done so far.
    Progress {
        /// What is being done ("capture", "fetch", ...).
        phase: String,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// Finished.
    Done(ControlResult),
    /// Failed; nothing was committed.
    Failed {
        /// What kind of failure.
        kind: ErrorKind,
        /// The error, with its causes.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_carry_their_version() {
        let frame = encode_control(&ControlRequest::ClusterStatus).expect("encode");
        let body = &frame[FRAME_HEADER_BYTES..];
        assert_eq!(codec::frame_len(frame[..4].try_into().expect("4")).expect("len"), body.len());
        assert_eq!(decode_control::<ControlRequest>(body).expect("decode"), ControlRequest::ClusterStatus);
        // Another version: refused as a mismatch, not misdecoded.
        let mut other = body.to_vec();
        other[5] ^= 1;
        let e = decode_control::<ControlRequest>(&other).expect_err("other version");
        assert!(is_version_mismatch(&e), "{e}");
        // A version-1 CLI sent a bare bincode request.
        let bare = codec::encode_body(&ControlRequest::ClusterStatus).expect("encode");
        assert!(is_version_mismatch(&decode_control::<ControlRequest>(&bare).expect_err("bare")));
    }
}

//! The control API: what the `vmcsnap` CLI asks its local node over `DIR/control.sock`.
//!
//! One request per connection; the node answers with any number of [`ControlEvent::Progress`]
//! frames and then exactly one `Done` or `Failed`. Frames use [`crate::codec`].

use crate::manifest::{CaptureMode, CommitRecord, VmStats};
use crate::NodeId;
use serde::{Deserialize, Serialize};

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
    },
    /// List snapshots.
    SnapshotList,
    /// Show one snapshot.
    SnapshotShow {
        /// Snapshot name.
        name: String,
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
    /// Replicas.
    pub replicas: u8,
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
    /// Page bytes fetched from peers.
    pub bytes_fetched: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
    /// Process id of the QEMU started with `--launch`.
    pub launched_pid: Option<u32>,
    /// Run state of the target QEMU after the restore, when known.
    pub vm_status: Option<String>,
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
    /// From `ClusterStatus`.
    Cluster(ClusterStatus),
    /// From `VmAdd` and `VmRemove`.
    VmChanged,
    /// From `VmList`.
    Vms(Vec<VmInfo>),
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
        /// The error, with its causes.
        message: String,
    },
}

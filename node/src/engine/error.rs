//! The engines' errors: one enum per operation, with the context an operator needs (the VM,
//! the host, the owner, the page), and the [`ErrorKind`] the CLI gets with the message.

use crate::net::NetError;
use crate::qemu::capture::CaptureError;
use crate::store::StoreError;
use std::path::PathBuf;
use vmcsnap_protocol::control::ErrorKind;
use vmcsnap_protocol::PageHash;

/// Why a snapshot failed. Whatever the variant, nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Bad request from the operator (or a peer).
    #[error("{0}")]
    Invalid(String),
    /// The name is taken.
    #[error("a snapshot named {0:?} already exists")]
    NameTaken(String),
    /// Another snapshot of the same name, created at the same time elsewhere, got the name.
    #[error("another snapshot named {name:?} (record {holder}) was created at the same time and got the name; nothing is committed; pick another name")]
    NameClaimed {
        /// The name.
        name: String,
        /// The record that holds it (short id).
        holder: String,
    },
    /// Too few of the name's arbiters granted it (down, or split between two creates).
    #[error("the name got {granted} of the {needed} grants it needs from its arbiters, members that decide who gets it ({reasons}); nothing is committed; retry when they are back")]
    NameUndecided {
        /// Grants got.
        granted: usize,
        /// Grants needed (a majority of the name's arbiters).
        needed: usize,
        /// Why the others did not.
        reasons: String,
    },
    /// Too few members are up to place `replicas` copies.
    #[error("only {alive} member(s) reachable; replicas = {replicas} needs at least {replicas}")]
    TooFewMembers {
        /// Reachable members, this node included.
        alive: usize,
        /// Replicas asked for.
        replicas: u8,
    },
    /// Reading a VM's memory image failed.
    #[error("reading VM {vm}: {reason}")]
    Read {
        /// VM id.
        vm: String,
        /// Why.
        reason: String,
    },
    /// An owner failed during capture, seal or commit.
    #[error("owner {owner} ({addr}): {source}")]
    Owner {
        /// Owner id (short).
        owner: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The failure (boxed: it is the largest variant's part, and every `Result` of this
        /// error would carry its size).
        source: Box<NetError>,
    },
    /// An owner answered with a message that does not fit the request.
    #[error("owner {0} answered a request with the wrong message")]
    Protocol(String),
    /// Driving or reading a QEMU VM failed (the VM is left running if it was).
    #[error("VM {vm}: {source}")]
    Capture {
        /// VM id.
        vm: String,
        /// The failure.
        source: CaptureError,
    },
    /// This node's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local failure that should not happen (a task that panicked, a broken invariant).
    #[error("{0}")]
    Internal(String),
    /// The cut was aborted (another VM or host failed).
    #[error("the snapshot was aborted")]
    Aborted,
    /// A host of the cut is shutting down (its VMs were resumed).
    #[error("host {0} is shutting down; the snapshot was aborted, its VMs resumed, nothing committed")]
    Stopping(String),
    /// An owner said it holds a page it then did not serve: nothing is committed on its word.
    #[error("owner {owner} said it holds page {page} but does not serve it; nothing was committed (check that node's store, or remove it with `vmcsnap cluster remove`)")]
    FalseClaim {
        /// The owner's name.
        owner: String,
        /// The page.
        page: String,
    },
    /// The snapshot ran longer than the snapshot deadline (garbage collection may have freed
    /// pages it relied on); nothing is committed.
    #[error("the snapshot took longer than the snapshot deadline ({secs} s, --snapshot-deadline); nothing was committed")]
    DeadlinePassed {
        /// The deadline.
        secs: u64,
    },
    /// The commit record reached fewer members than the snapshot has replicas; it was deleted
    /// again.
    #[error("the commit record reached only {held} of the {needed} members it must be on ({reasons}); the snapshot was withdrawn, nothing is committed; retry")]
    CommitNotDurable {
        /// Members that took it (this one included).
        held: usize,
        /// Members it must be on.
        needed: usize,
        /// Why the others did not.
        reasons: String,
    },
    /// Too few members have room for the pages.
    #[error("only {room} members have room for pages, {replicas} needed: disks nearly full on {full} (delete snapshots, or lower --min-free there)")]
    NoRoom {
        /// Members with room.
        room: usize,
        /// Replicas asked.
        replicas: u8,
        /// The full members' names.
        full: String,
    },
    /// A host taking part failed.
    #[error("host {host}: {reason}")]
    Participant {
        /// Its name.
        host: String,
        /// What kind of failure it reported.
        kind: ErrorKind,
        /// What went wrong, naming the VM.
        reason: String,
    },
}

impl SnapshotError {
    /// A participant's failure, naming its host and the VM (or every VM it had).
    pub fn participant(host: &str, vm: Option<&str>, vms: &[String], kind: ErrorKind, reason: &str) -> Self {
        let reason = match vm {
            Some(vm) if reason.contains(&format!("VM {vm}")) => reason.to_string(),
            Some(vm) => format!("VM {vm}: {reason}"),
            None => format!("{reason} (its VMs: {})", vms.join(", ")),
        };
        SnapshotError::Participant { host: host.to_string(), kind, reason }
    }

    /// What kind of failure this is, for the CLI.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::Invalid(_) | SnapshotError::Read { .. } => ErrorKind::Invalid,
            SnapshotError::NameTaken(_) | SnapshotError::NameClaimed { .. } => ErrorKind::Conflict,
            SnapshotError::NameUndecided { .. } => ErrorKind::Unavailable,
            SnapshotError::TooFewMembers { .. } | SnapshotError::NoRoom { .. } => ErrorKind::Unavailable,
            SnapshotError::Owner { source, .. } => net_kind(source),
            SnapshotError::Protocol(_) | SnapshotError::FalseClaim { .. } => ErrorKind::Peer,
            SnapshotError::Participant { kind, .. } => *kind,
            SnapshotError::Capture { .. } => ErrorKind::Qemu,
            SnapshotError::Store(_) => ErrorKind::Storage,
            SnapshotError::Internal(_) => ErrorKind::Internal,
            SnapshotError::Aborted | SnapshotError::Stopping(_) | SnapshotError::DeadlinePassed { .. } => ErrorKind::Aborted,
            SnapshotError::CommitNotDurable { .. } => ErrorKind::Unavailable,
        }
    }
}

/// The kind of a data-plane failure.
pub fn net_kind(e: &NetError) -> ErrorKind {
    match e {
        NetError::Unreachable { .. } => ErrorKind::Unavailable,
        NetError::VersionMismatch { .. } => ErrorKind::VersionMismatch,
        NetError::Store(_) => ErrorKind::Storage,
        _ => ErrorKind::Peer,
    }
}

/// Why a restore failed. The target path is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// No such snapshot.
    #[error("no snapshot named {0:?} (see `vmcsnap snapshot list`)")]
    UnknownSnapshot(String),
    /// Several members committed different records under the name.
    #[error("{0}")]
    Conflict(String),
    /// No such VM in the snapshot.
    #[error("snapshot {name:?} has no VM {vm:?} (it has: {have})")]
    UnknownVm {
        /// Snapshot.
        name: String,
        /// VM asked for.
        vm: String,
        /// VMs it has.
        have: String,
    },
    /// Bad target or options.
    #[error("{0}")]
    Target(String),
    /// Starting or driving the target QEMU failed.
    #[error("{0}")]
    Qemu(String),
    /// A page could be had from none of its owners.
    #[error("page {hash} is unavailable: {reasons}")]
    Unavailable {
        /// The page.
        hash: PageHash,
        /// What each owner said.
        reasons: String,
    },
    /// Writing the target failed.
    #[error("writing {path}: {reason}")]
    Write {
        /// Target.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// This node's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local failure that should not happen (a task that panicked, a broken invariant).
    #[error("{0}")]
    Internal(String),
    /// Some VMs of a cluster restore failed.
    #[error("{failed}{}", if .restored.is_empty() { String::new() } else { format!(" (restored: {})", .restored) })]
    Hosts {
        /// `host H: VM v: reason`, per failure.
        failed: String,
        /// The VMs that were restored and run.
        restored: String,
    },
}

impl From<crate::node::FindError> for RestoreError {
    fn from(e: crate::node::FindError) -> Self {
        use crate::node::FindError;
        match e {
            FindError::Invalid(m) => RestoreError::Target(m),
            FindError::NotFound(n) => RestoreError::UnknownSnapshot(n),
            e @ FindError::Conflict { .. } => RestoreError::Conflict(e.to_string()),
            FindError::Store(s) => RestoreError::Store(s),
        }
    }
}

impl RestoreError {
    /// What kind of failure this is, for the CLI.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RestoreError::UnknownSnapshot(_) | RestoreError::UnknownVm { .. } => ErrorKind::NotFound,
            RestoreError::Target(_) => ErrorKind::Invalid,
            RestoreError::Conflict(_) => ErrorKind::Conflict,
            RestoreError::Qemu(_) => ErrorKind::Qemu,
            RestoreError::Unavailable { .. } => ErrorKind::Unavailable,
            RestoreError::Write { .. } | RestoreError::Store(_) => ErrorKind::Storage,
            RestoreError::Internal(_) => ErrorKind::Internal,
            RestoreError::Hosts { .. } => ErrorKind::Peer,
        }
    }
}

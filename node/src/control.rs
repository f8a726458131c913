//! The control socket (`DIR/control.sock`): how the `vmcsnap` CLI on this host talks to its
//! node. Only the node's own user (and root) may use it: the socket is owner-only (mode
//! 0600, in an owner-only data directory), and the node checks each client's user id
//! (`SO_PEERCRED`) against the socket's owner.
//!
//! One request per connection; the node streams [`ControlEvent::Progress`] frames while it
//! works and ends with one `Done` or `Failed` frame (with an [`ErrorKind`]). Every frame is a
//! versioned control record ([`vmcsnap_protocol::control::encode_control`]): a CLI of another
//! version gets a clear "version mismatch", both ways. If the CLI goes away mid-way the work
//! still finishes (a snapshot is never left half-committed because a terminal closed).

use crate::engine::error::{RestoreError, SnapshotError};
use crate::engine::{restore, snapshot, Progress};
use crate::node::{fan_out, Node, PEER_ANSWER_TIMEOUT};
use crate::store::StoreError;
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vmcsnap_dht::placement::{primary_shares, View};
use vmcsnap_protocol::codec::{self, CodecError, FRAME_HEADER_BYTES};
use vmcsnap_protocol::manifest::short_record_id;
use vmcsnap_protocol::control::{
    decode_control, encode_control, is_version_mismatch, ClusterStatus, ControlEvent, ControlRequest, ControlResult, ErrorKind, MemberEntry, MemberList, MemberStatus, SaidState,
    SnapshotInfo, CONTROL_VERSION,
};
use vmcsnap_protocol::wire::{DataRequest, DataResponse, GcStats, RepairStats, ScrubStats};
use vmcsnap_protocol::PAGE_SIZE;

/// Progress frames buffered for a slow CLI before updates are dropped.
pub const PROGRESS_QUEUE: usize = 64;
/// Samples used to estimate each member's share of the hash space.
pub const SHARE_SAMPLES: u64 = 1 << 16;

/// Binds the control socket, replacing a stale one left by a node that died.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("a node is already running with control socket {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("cannot bind control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(|| format!("cannot make {} owner-only", path.display()))?;
    Ok(l)
}

/// Whether the client on `stream` may use the control socket at `path`: root, or the user
/// that owns the socket (the node's own).
fn client_allowed(stream: &UnixStream, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let uid = stream.peer_cred().map_err(|e| format!("cannot tell who connected: {e}"))?.uid();
    let owner = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?.uid();
    if uid == 0 || uid == owner {
        Ok(())
    } else {
        Err(format!("user {uid} may not use this node (only its owner, user {owner}, and root)"))
    }
}

/// Accepts CLI connections forever.
pub async fn accept_loop(node: Arc<Node>, listener: UnixListener) {
    let path = node.config.control_socket();
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                if let Err(why) = client_allowed(&stream, &path) {
                    tracing::warn!(target: "vmcsnap::control", reason = %why, "refusing a control client");
                    let _ = write_frame(&mut stream, &ControlEvent::Failed { kind: ErrorKind::Invalid, message: why }).await;
                    continue;
                }
                tokio::spawn(handle(node.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(target: "vmcsnap::control", error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a control frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The other side speaks another control protocol version.
    #[error("version mismatch: the other side speaks another control protocol ({0}; this side speaks version {CONTROL_VERSION}); use the vmcsnap binary that matches the node")]
    Version(CodecError),
    /// The frame broke a limit or did not decode.
    #[error("bad control frame: {0}")]
    Codec(CodecError),
}

impl From<CodecError> for FrameReadError {
    fn from(e: CodecError) -> Self {
        if is_version_mismatch(&e) {
            FrameReadError::Version(e)
        } else {
            FrameReadError::Codec(e)
        }
    }
}

/// Reads one control frame (length-checked before the body is read) and decodes it.
pub async fn read_frame<T: serde::de::DeserializeOwned, R: AsyncReadExt + Unpin>(r: &mut R) -> Result<T, FrameReadError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    r.read_exact(&mut header).await?;
    let len = codec::frame_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(decode_control(&body)?)
}

/// Writes one control frame.
pub async fn write_frame<T: serde::Serialize, W: AsyncWriteExt + Unpin>(w: &mut W, msg: &T) -> anyhow::Result<()> {
    let frame = encode_control(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// A control request's failure, as the CLI gets it.
#[derive(Debug)]
pub struct ControlError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The message.
    pub message: String,
}

impl ControlError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl From<SnapshotError> for ControlError {
    fn from(e: SnapshotError) -> Self {
        Self::new(e.kind(), e.to_string())
    }
}

impl From<RestoreError> for ControlError {
    fn from(e: RestoreError) -> Self {
        Self::new(e.kind(), e.to_string())
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        Self::new(ErrorKind::Storage, e.to_string())
    }
}

async fn handle(node: Arc<Node>, mut stream: UnixStream) {
    let req: ControlRequest = match read_frame(&mut stream).await {
        Ok(r) => r,
        Err(e) => {
            let kind = if matches!(e, FrameReadError::Version(_)) { ErrorKind::VersionMismatch } else { ErrorKind::Invalid };
            tracing::warn!(target: "vmcsnap::control", error = %e, "bad control request");
            let _ = write_frame(&mut stream, &ControlEvent::Failed { kind, message: format!("bad control request: {e}") }).await;
            return;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(PROGRESS_QUEUE);
    let work = tokio::spawn(execute(node, req, Progress::new(Some(tx))));
    // Forward progress until the work ends (the channel closes with it).
    let mut cli_gone = false;
    while let Some(ev) = rx.recv().await {
        if !cli_gone && write_frame(&mut stream, &ev).await.is_err() {
            cli_gone = true;
        }
    }
    let last = match work.await {
        Ok(Ok(r)) => ControlEvent::Done(r),
        Ok(Err(e)) => ControlEvent::Failed { kind: e.kind, message: e.message },
        Err(e) => ControlEvent::Failed { kind: ErrorKind::Internal, message: format!("internal error: {e}") },
    };
    if !cli_gone {
        let _ = write_frame(&mut stream, &last).await;
    }
}

async fn execute(node: Arc<Node>, req: ControlRequest, progress: Progress) -> Result<ControlResult, ControlError> {
    match req {
        ControlRequest::SnapshotCreate { name, vms, all, mode, replicas, max_bandwidth, disks } => {
            let req = snapshot::CreateRequest { name, vms, all, mode, replicas, max_bandwidth, disks };
            let t0 = std::time::Instant::now();
            let r = snapshot::create(node.clone(), req, progress).await;
            match &r {
                Ok(s) => {
                    let pauses: Vec<Option<u64>> = s.vms.iter().map(|(_, v)| v.pause_ms).collect();
                    node.metrics.snapshot(t0.elapsed(), Some((&pauses, s.raw_bytes, s.new_bytes)));
                }
                Err(_) => node.metrics.snapshot(t0.elapsed(), None),
            }
            Ok(ControlResult::Created(r?))
        }
        ControlRequest::SnapshotRestore { name, vms, on, target, force, launch, qmp, eager, disk, in_place } => {
            let opts = restore::RestoreOptions { target, force, launch, qmp, eager, disk, in_place };
            let t0 = std::time::Instant::now();
            let r = restore::restore_many(node.clone(), name, vms, on, opts, progress).await;
            match &r {
                Ok(done) => done.iter().for_each(|v| node.metrics.restore(std::time::Duration::from_millis(v.elapsed_ms), true)),
                Err(_) => node.metrics.restore(t0.elapsed(), false),
            }
            Ok(ControlResult::Restored(r?))
        }
        ControlRequest::VmAdd { id, qmp } => {
            let path = std::path::PathBuf::from(&qmp);
            // A typo should fail now, not at the next snapshot.
            let status = crate::vms::status(&path).await;
            if status == "unreachable" {
                return Err(ControlError::new(
                    ErrorKind::Invalid,
                    format!("no QEMU answers on QMP socket {qmp} (is the VM running, with -qmp unix:{qmp},server=on,wait=off?)"),
                ));
            }
            let (known, _) = node.cluster_vms().await;
            if let Some(other) = known.iter().find(|v| v.id == id && v.node != node.id) {
                return Err(ControlError::new(
                    ErrorKind::Conflict,
                    format!("VM {id} is already registered on host {}; `vmcsnap vm remove {id}` there first", other.host),
                ));
            }
            node.vms.add(&id, &path).map_err(|e| match e {
                crate::vms::VmError::Invalid(m) => ControlError::new(ErrorKind::Invalid, m),
                crate::vms::VmError::Store(e) => e.into(),
            })?;
            tracing::info!(target: "vmcsnap::vms", vm = %id, qmp = %qmp, status = %status, "VM registered");
            node.publish_state();
            Ok(ControlResult::VmChanged)
        }
        ControlRequest::VmRemove { id } => {
            if !node.vms.remove(&id)? {
                return Err(ControlError::new(
                    ErrorKind::NotFound,
                    format!("VM {id} is not registered on this host (a socket in --vm-dir is listed for as long as it exists)"),
                ));
            }
            node.publish_state();
            Ok(ControlResult::VmChanged)
        }
        ControlRequest::VmList => {
            let (vms, silent) = node.cluster_vms().await;
            if !silent.is_empty() {
                tracing::warn!(target: "vmcsnap::vms", hosts = %silent.join(", "), "some members did not list their VMs");
            }
            Ok(ControlResult::Vms(vms))
        }
        ControlRequest::SnapshotList { unique } => snapshot_list(&node, unique, progress).await,
        ControlRequest::SnapshotShow { name } => Ok(ControlResult::Show(Box::new(node.find_record(&name).await.map_err(RestoreError::from)?))),
        ControlRequest::SnapshotDelete { names } => {
            // Resolve every name first: a typo in the third deletes nothing.
            for n in &names {
                node.find_record(n).await.map_err(RestoreError::from)?;
            }
            let mut out = Vec::new();
            for n in &names {
                let d = node.delete(n).await.map_err(|e| match e {
                    crate::node::DeleteError::Find(f) => ControlError::from(RestoreError::from(f)),
                    e => ControlError::new(ErrorKind::Internal, e.to_string()),
                })?;
                out.push(d);
            }
            Ok(ControlResult::Deleted(out))
        }
        ControlRequest::SnapshotVerify { name, deep } => {
            let record = node.find_record(&name).await.map_err(RestoreError::from)?;
            Ok(ControlResult::Verified(crate::engine::verify::verify(&node, &record, deep, progress).await.map_err(|e| ControlError::new(e.kind(), e.to_string()))?))
        }
        ControlRequest::ClusterStatus => Ok(ControlResult::Cluster(cluster_status(&node).await)),
        ControlRequest::ClusterMembers => {
            let mut states = node.member_states();
            Ok(ControlResult::Members(MemberList {
                node: node.id,
                members: node
                    .members()
                    .into_iter()
                    .map(|m| {
                        let said = states.remove(&m.id).map(|s| SaidState { full: s.full, vms: s.vms });
                        MemberEntry { id: m.id, name: m.name, address: m.data_addr.to_string(), alive: m.alive, local: m.id == node.id, incarnation: m.incarnation, said }
                    })
                    .collect(),
            }))
        }
        ControlRequest::ClusterRemove { token } => {
            let r = vmcsnap_dht::admission::Revocation::from_token(&token).map_err(|e| ControlError::new(ErrorKind::Invalid, e.to_string()))?;
            let (new, told) = node.revoke(&r).await.map_err(|e| ControlError::new(ErrorKind::Invalid, e.to_string()))?;
            tracing::info!(target: "vmcsnap::admission", node = %r.node.short(), told, "removal applied");
            Ok(ControlResult::Removed { node: r.node, already: !new, told })
        }
    }
}

/// What a member's `Stats` answer says: pages, bytes, garbage collection, scrub, and (free
/// bytes, full, repair).
type MemberFigures = (u64, u64, GcStats, ScrubStats, (u64, bool, RepairStats));

async fn cluster_status(node: &Arc<Node>) -> ClusterStatus {
    let members = node.members();
    let view = View::new(members.iter().filter(|m| m.alive).map(|m| m.id).collect());
    let shares = primary_shares(&view, SHARE_SAMPLES);
    let alive: Vec<_> = members.iter().filter(|m| m.alive).cloned().collect();
    let answers = fan_out(&alive, PEER_ANSWER_TIMEOUT, |m| async move { node.call(&m, DataRequest::Stats).await }).await;
    let figures: std::collections::HashMap<_, _> = alive
        .iter()
        .zip(answers)
        .filter_map(|(m, a)| match a {
            Ok(DataResponse::Stats { pages, bytes, gc, scrub, free_bytes, full, repair, .. }) => Some((m.id, (pages, bytes, gc, scrub, (free_bytes, full, repair)))),
            _ => None,
        })
        .collect();
    let stats: Vec<Option<MemberFigures>> = members.iter().map(|m| figures.get(&m.id).cloned()).collect();
    let members = members
        .iter()
        .zip(stats)
        .map(|(m, s)| MemberStatus {
            id: m.id,
            name: m.name.clone(),
            address: m.data_addr.to_string(),
            share: view.index_of(&m.id).map(|i| shares[i]).unwrap_or(0.0),
            pages: s.as_ref().map(|s| s.0),
            bytes: s.as_ref().map(|s| s.1),
            free_bytes: s.as_ref().map(|s| s.4 .0),
            repair: s.as_ref().map(|s| s.4 .2.clone()),
            full: s.as_ref().map(|s| s.4 .1),
            gc: s.as_ref().map(|s| s.2.clone()),
            scrub: s.map(|s| s.3),
            alive: m.alive,
            local: m.id == node.id,
        })
        .collect();
    ClusterStatus { node: node.id, replicas: node.config.replicas, members }
}

/// `snapshot list`: every record in the catalog (synced first), oldest first; with `unique`,
/// what deleting each alone would free.
async fn snapshot_list(node: &Arc<Node>, unique: bool, progress: Progress) -> Result<ControlResult, ControlError> {
    node.sync_catalog().await;
    let all = node.store.catalog_all()?;
    let mut per_name: std::collections::HashMap<&str, usize> = Default::default();
    for r in &all {
        *per_name.entry(r.record.name.as_str()).or_default() += 1;
    }
    let unique = match unique {
        true => Some(crate::engine::gc::unique_bytes(node, &all.iter().map(|s| &s.record).collect::<Vec<_>>(), progress).await?),
        false => None,
    };
    let mut out: Vec<SnapshotInfo> = all
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let r = &s.record;
            SnapshotInfo {
                vms: r.vms.iter().map(|v| v.id.clone()).collect(),
                raw_bytes: r.vms.iter().map(|v| v.manifest.pages * PAGE_SIZE as u64).sum(),
                new_bytes: r.vms.iter().map(|v| v.stats.pages_new * PAGE_SIZE as u64).sum(),
                unique_bytes: unique.as_ref().map(|u| u[i]),
                replicas: r.replicas,
                created_unix_ms: r.created_unix_ms,
                name: r.name.clone(),
                record: s.id().map(|i| short_record_id(&i)).unwrap_or_default(),
                conflict: per_name.get(r.name.as_str()).copied().unwrap_or(0) > 1,
                signed: s.is_signed(),
                initiator: node.host_name(&r.initiator),
            }
        })
        .collect();
    out.sort_by(|a, b| (a.created_unix_ms, &a.name).cmp(&(b.created_unix_ms, &b.name)));
    Ok(ControlResult::List(out))
}

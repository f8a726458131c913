//! Taking a snapshot.
//!
//! States, each with its own failure, in order:
//! 1. **Check**: name free (here and on every live member), enough live members for
//!    `replicas`, every VM found (registered on exactly one live member, or given with its
//!    source on this host). Fails with nothing written.
//! 2. **Capture** (on each VM's host, as one cut: [`super::cut`]): read, hash, group by owner,
//!    `Have`, `Put` the missing pages. Pages written here are invisible (no record names them)
//!    until step 4.
//! 3. **Seal** (on each host): build each VM's manifest tree and store its chunks like pages;
//!    `Sync` every owner so that every page is durable on `replicas` owners.
//! 4. **Commit**: store the commit record here (the commit point: every page it names is
//!    already durable on its owners), then send it to every live member; members that miss
//!    it pull it later through the catalog sync.
//!
//! A failure in 1–3 leaves no record anywhere, so `snapshot list` never shows it. Pages a
//! failed snapshot wrote stay in the store unreferenced (a later snapshot reuses them).

use crate::engine::cut;
use crate::engine::{Progress, HASH_WINDOWS_IN_FLIGHT, OWNER_BATCHES_IN_FLIGHT, OWNER_BATCH_PAGES, OWNER_QUEUE_BATCHES, WINDOW_PAGES};
use crate::net::NetError;
use crate::node::Node;
use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use vmcsnap_dht::placement::{owners_into, View};
use vmcsnap_dht::Member;
use vmcsnap_protocol::control::{CreateSummary, VmInfo, VmSpec};
use vmcsnap_protocol::manifest::{validate_name, CaptureMode, CommitRecord, VmEntry, VmStats};
use vmcsnap_protocol::wire::{CutBegin, CutCommand, CutReport, DataRequest, DataResponse, PagePut, PUT_PAGES_MAX};
use vmcsnap_protocol::{hash_page, NodeId, PageHash, PAGE_SIZE};

/// Why a snapshot failed. Whatever the variant, nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Bad request from the operator.
    #[error("{0}")]
    Invalid(String),
    /// The name is taken.
    #[error("a snapshot named {0:?} already exists")]
    NameTaken(String),
    /// Too few members are up to place `replicas` copies.
    #[error("only {alive} member(s) reachable; replicas = {replicas} needs at least {replicas}")]
    TooFewMembers {
        /// Reachable members, this node included.
        alive: usize,
        /// Replicas asked for.
        replicas: u8,
    },
    /// Reading a VM's memory failed.
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
        /// The failure.
        source: NetError,
    },
    /// An owner answered nonsense.
    #[error("owner {0} answered a request with the wrong message")]
    Protocol(String),
    /// Driving or reading a QEMU VM failed (the VM is left running if it was).
    #[error("VM {vm}: {reason}")]
    Qemu {
        /// VM id.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A local failure.
    #[error("{0}")]
    Internal(String),
    /// The cut was aborted (another VM or host failed).
    #[error("the snapshot was aborted")]
    Aborted,
    /// A host taking part failed.
    #[error("host {host}: {reason}")]
    Participant {
        /// Its name.
        host: String,
        /// What went wrong, naming the VM.
        reason: String,
    },
}

impl SnapshotError {
    /// A participant's failure, naming its host and the VM (or every VM it had).
    pub fn participant(host: &str, vm: Option<&str>, vms: &[String], reason: &str) -> Self {
        let reason = match vm {
            Some(vm) if reason.contains(&format!("VM {vm}")) => reason.to_string(),
            Some(vm) => format!("VM {vm}: {reason}"),
            None => format!("{reason} (its VMs: {})", vms.join(", ")),
        };
        SnapshotError::Participant { host: host.to_string(), reason }
    }
}

/// One page on its way to one owner.
struct Item {
    hash: PageHash,
    data: Bytes,
    /// Index of the VM the page was first seen in; `None` for manifest chunks.
    vm: Option<usize>,
    /// Whether this owner is the page's primary (its answer decides "new to the cluster").
    primary: bool,
}

/// Per-VM counters the owner workers keep.
#[derive(Default)]
pub struct VmCounters {
    /// Pages the VM's primary owners did not have.
    pub new: AtomicU64,
    /// Page bytes sent to other nodes.
    pub bytes_sent: AtomicU64,
}

/// Groups pages by owner and feeds one worker per owner.
pub struct Uploader {
    view: View,
    members: Vec<Member>,
    replicas: usize,
    seen: HashSet<PageHash>,
    pending: Vec<Vec<Item>>,
    senders: Vec<mpsc::Sender<Vec<Item>>>,
    workers: tokio::task::JoinSet<Result<(), SnapshotError>>,
    owners_buf: Vec<usize>,
}

impl Uploader {
    /// An uploader placing over `members` (sorted by id), one worker per member.
    pub fn new(node: &Arc<Node>, members: Vec<Member>, replicas: usize, counters: Arc<Vec<VmCounters>>) -> Self {
        let view = View::new(members.iter().map(|m| m.id).collect());
        // View sorts by id; the member list is sorted by id too, so indexes agree.
        debug_assert!(members.iter().map(|m| m.id).eq(view.members().iter().copied()));
        let mut senders = Vec::new();
        let mut workers = tokio::task::JoinSet::new();
        for m in &members {
            let (tx, rx) = mpsc::channel::<Vec<Item>>(OWNER_QUEUE_BATCHES);
            senders.push(tx);
            workers.spawn(owner_worker(node.clone(), m.clone(), rx, counters.clone()));
        }
        let n = members.len();
        Self { view, members, replicas, seen: HashSet::new(), pending: (0..n).map(|_| Vec::new()).collect(), senders, workers, owners_buf: Vec::new() }
    }

    /// Queues a non-zero page; returns false if it was already queued in this snapshot.
    pub async fn push(&mut self, hash: PageHash, data: Bytes, vm: Option<usize>) -> Result<bool, SnapshotError> {
        if !self.seen.insert(hash) {
            return Ok(false);
        }
        owners_into(&self.view, hash.prefix_u64(), self.replicas, &mut self.owners_buf);
        for k in 0..self.owners_buf.len() {
            let o = self.owners_buf[k];
            self.pending[o].push(Item { hash, data: data.clone(), vm, primary: k == 0 });
            if self.pending[o].len() >= OWNER_BATCH_PAGES {
                self.flush(o).await?;
            }
        }
        Ok(true)
    }

    async fn flush(&mut self, o: usize) -> Result<(), SnapshotError> {
        let batch = std::mem::take(&mut self.pending[o]);
        if batch.is_empty() {
            return Ok(());
        }
        if self.senders[o].send(batch).await.is_err() {
            // The worker stopped: it failed. Surface its error.
            return Err(self.first_error().await);
        }
        Ok(())
    }

    async fn first_error(&mut self) -> SnapshotError {
        while let Some(r) = self.workers.join_next().await {
            match r {
                Ok(Err(e)) => return e,
                Err(e) => return SnapshotError::Internal(format!("owner worker failed: {e}")),
                Ok(Ok(())) => {}
            }
        }
        SnapshotError::Internal("owner worker stopped".into())
    }

    /// Sends what is pending and waits for every owner to acknowledge everything.
    pub async fn finish(mut self) -> Result<Vec<Member>, SnapshotError> {
        for o in 0..self.members.len() {
            self.flush(o).await?;
        }
        self.senders.clear(); // workers see the end of their queues
        while let Some(r) = self.workers.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(SnapshotError::Internal(format!("owner worker failed: {e}"))),
            }
        }
        Ok(self.members)
    }
}

/// An owner's failure as a snapshot error.
pub fn owner_error(m: &Member, source: NetError) -> SnapshotError {
    SnapshotError::Owner { owner: m.id.short(), addr: m.data_addr, source }
}

async fn owner_worker(
    node: Arc<Node>,
    member: Member,
    rx: mpsc::Receiver<Vec<Item>>,
    counters: Arc<Vec<VmCounters>>,
) -> Result<(), SnapshotError> {
    let remote = member.id != node.id;
    let batches = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    batches
        .map(|batch| {
            let (node, member, counters) = (node.clone(), member.clone(), counters.clone());
            async move {
                let hashes = batch.iter().map(|i| i.hash).collect();
                let missing = match node.call(&member, DataRequest::Have { hashes }).await.map_err(|e| owner_error(&member, e))? {
                    DataResponse::Have { missing } => missing,
                    _ => return Err(SnapshotError::Protocol(member.id.short())),
                };
                for chunk in missing.chunks(PUT_PAGES_MAX) {
                    let mut pages = Vec::with_capacity(chunk.len());
                    for &i in chunk {
                        let item = batch.get(i as usize).ok_or_else(|| SnapshotError::Protocol(member.id.short()))?;
                        pages.push(PagePut { hash: item.hash, data: serde_bytes::ByteBuf::from(item.data.to_vec()) });
                    }
                    match node.call(&member, DataRequest::Put { pages }).await.map_err(|e| owner_error(&member, e))? {
                        DataResponse::Put { .. } => {}
                        _ => return Err(SnapshotError::Protocol(member.id.short())),
                    }
                    for &i in chunk {
                        let item = &batch[i as usize];
                        if let Some(vm) = item.vm {
                            if item.primary {
                                counters[vm].new.fetch_add(1, Ordering::Relaxed);
                            }
                            if remote {
                                counters[vm].bytes_sent.fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(OWNER_BATCHES_IN_FLIGHT)
        .try_collect::<()>()
        .await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What `snapshot create` asks for.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// Snapshot name.
    pub name: String,
    /// VMs named by the operator.
    pub vms: Vec<VmSpec>,
    /// Also every VM registered in the cluster.
    pub all: bool,
    /// Capture mode for running VMs.
    pub mode: CaptureMode,
    /// Replicas; `None` for the node's default.
    pub replicas: Option<u8>,
    /// Live-copy bandwidth cap, bytes/s.
    pub max_bandwidth: Option<u64>,
}

/// Takes snapshot `req.name` of VMs wherever they run, as one cut driven from this node.
pub async fn create(node: Arc<Node>, req: CreateRequest, progress: Progress) -> Result<CreateSummary, SnapshotError> {
    validate_name("snapshot name", &req.name).map_err(SnapshotError::Invalid)?;
    let name = req.name.clone();
    if !node.reserve_name(&name) {
        return Err(SnapshotError::NameTaken(name));
    }
    let r = create_reserved(&node, req, progress).await;
    node.release_name(&name);
    match &r {
        Ok(s) => tracing::info!(target: "vmcsnap::snapshot", snapshot = %name, raw = s.raw_bytes, new = s.new_bytes, ms = s.elapsed_ms, "snapshot committed"),
        Err(e) => tracing::warn!(target: "vmcsnap::snapshot", snapshot = %name, error = %e, "snapshot failed; nothing committed"),
    }
    r
}

/// Every VM registered on a live member (this node included), with its status.
pub async fn cluster_vms(node: &Arc<Node>) -> (Vec<VmInfo>, Vec<String>) {
    let mut out = local_vms(node).await;
    let peers: Vec<Member> = node.alive_members().into_iter().filter(|m| m.id != node.id).collect();
    let answers = futures::future::join_all(
        peers.iter().map(|p| tokio::time::timeout(crate::node::CATALOG_PEER_TIMEOUT, node.call(p, DataRequest::VmList))),
    )
    .await;
    let mut silent = Vec::new();
    for (p, a) in peers.iter().zip(answers) {
        match a {
            Ok(Ok(DataResponse::Vms { vms, .. })) => out.extend(vms),
            _ => silent.push(node.host_name(&p.id)),
        }
    }
    out.sort_by(|a, b| (&a.id, &a.host).cmp(&(&b.id, &b.host)));
    (out, silent)
}

/// This host's VMs, with their status.
pub async fn local_vms(node: &Arc<Node>) -> Vec<VmInfo> {
    let list = node.vms.list().unwrap_or_default();
    let statuses = futures::future::join_all(list.iter().map(|(_, qmp, _)| crate::vms::status(qmp))).await;
    list.into_iter()
        .zip(statuses)
        .map(|((id, qmp, origin), status)| VmInfo {
            id,
            qmp: qmp.display().to_string(),
            origin: origin.as_str().into(),
            status,
            host: node.config.name.clone(),
            node: node.id,
        })
        .collect()
}

async fn create_reserved(node: &Arc<Node>, req: CreateRequest, mut progress: Progress) -> Result<CreateSummary, SnapshotError> {
    let t0 = Instant::now();
    let name = req.name.as_str();
    // 1. Check.
    if req.vms.is_empty() && !req.all {
        return Err(SnapshotError::Invalid(
            "name the VMs: --vm ID (registered with a node: see `vmcsnap vm list`), --vm ID=qemu:QMP_SOCKET or ID=file:PATH (on this host), or --all".into(),
        ));
    }
    let mut ids = HashSet::new();
    for spec in &req.vms {
        validate_name("VM id", &spec.id).map_err(SnapshotError::Invalid)?;
        if !ids.insert(spec.id.clone()) {
            return Err(SnapshotError::Invalid(format!("VM id {} is given twice", spec.id)));
        }
        if let Some(source) = &spec.source {
            crate::source::Source::parse(source).map_err(SnapshotError::Invalid)?;
        }
    }
    let replicas = req.replicas.unwrap_or(node.config.replicas);
    if replicas == 0 || replicas > crate::node::REPLICAS_MAX {
        return Err(SnapshotError::Invalid(format!("--replicas must be 1 to {}, not {replicas}", crate::node::REPLICAS_MAX)));
    }
    // Here, then one targeted question per live peer (not a pull of their whole catalogs).
    let here = node.store.catalog_get(name).map_err(|e| SnapshotError::Internal(e.to_string()))?;
    if here.is_some() || name_on_peers(node, name).await {
        return Err(SnapshotError::NameTaken(name.to_string()));
    }
    let members = node.alive_members();
    if members.len() < replicas as usize {
        return Err(SnapshotError::TooFewMembers { alive: members.len(), replicas });
    }

    // Where each VM runs.
    let known = if req.all || req.vms.iter().any(|v| v.source.is_none()) {
        let (known, silent) = cluster_vms(node).await;
        if !silent.is_empty() {
            // Their VMs could be the ones asked for (or, with --all, left out unseen).
            return Err(SnapshotError::Invalid(format!("host(s) {} did not list their VMs; try again", silent.join(", "))));
        }
        known
    } else {
        vec![]
    };
    let host_of = |id: &str| -> Result<NodeId, SnapshotError> {
        let hosts: Vec<&VmInfo> = known.iter().filter(|v| v.id == id).collect();
        match hosts.as_slice() {
            [v] => Ok(v.node),
            [] => Err(SnapshotError::Invalid(format!("VM {id} is not registered on any live member (see `vmcsnap vm list`; register it with `vmcsnap vm add`)"))),
            many => Err(SnapshotError::Invalid(format!(
                "VM {id} is registered on several hosts ({}); remove the stale registration with `vmcsnap vm remove {id}` there",
                many.iter().map(|v| v.host.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    };
    let mut placed: Vec<(String, Option<String>, NodeId)> = Vec::new();
    for spec in &req.vms {
        let host = match &spec.source {
            Some(_) => node.id,
            None => host_of(&spec.id)?,
        };
        placed.push((spec.id.clone(), spec.source.clone(), host));
    }
    if req.all {
        for v in &known {
            if !placed.iter().any(|(id, _, _)| *id == v.id) {
                placed.push((v.id.clone(), None, host_of(&v.id)?));
            }
        }
    }
    if placed.is_empty() {
        return Err(SnapshotError::Invalid("--all: no VM is registered on any live member (see `vmcsnap vm add`)".into()));
    }
    if placed.len() > vmcsnap_protocol::manifest::SNAPSHOT_VMS_MAX {
        return Err(SnapshotError::Invalid(format!("{} VMs; one snapshot takes at most {}", placed.len(), vmcsnap_protocol::manifest::SNAPSHOT_VMS_MAX)));
    }

    // 2. The cut: one participant per host.
    let mut hosts: Vec<(NodeId, Vec<(String, Option<String>)>)> = Vec::new();
    for (id, source, host) in &placed {
        match hosts.iter_mut().find(|(h, _)| h == host) {
            Some((_, v)) => v.push((id.clone(), source.clone())),
            None => hosts.push((*host, vec![(id.clone(), source.clone())])),
        }
    }
    let placement: Vec<NodeId> = members.iter().map(|m| m.id).collect();
    let (rep_tx, mut rep_rx) = mpsc::channel(64);
    let mut sessions = Vec::new();
    for (i, (host, vms)) in hosts.into_iter().enumerate() {
        let member = node.member(&host).ok_or_else(|| SnapshotError::Internal(format!("host {} vanished", host.short())))?;
        let begin = CutBegin { name: name.to_string(), vms, mode: req.mode, replicas, placement: placement.clone(), max_bandwidth: req.max_bandwidth };
        sessions.push(cut::start_session(node, member, begin, i, rep_tx.clone()).await);
    }
    drop(rep_tx);
    let n = sessions.len();
    let total_vms = placed.len() as u64;
    progress.phase("prepare", n as u64);
    let (mut ready, mut paused, mut done) = (vec![false; n], vec![false; n], 0usize);
    let mut released = false;
    let mut results: Vec<Option<Vec<VmEntry>>> = (0..n).map(|_| None).collect();
    let mut ended = vec![false; n];
    let failure = loop {
        let Some((i, r)) = rep_rx.recv().await else {
            break Some(SnapshotError::Internal("every participant ended without finishing".into()));
        };
        let s = &sessions[i];
        match r {
            None => {
                ended[i] = true;
                if results[i].is_none() {
                    break Some(SnapshotError::participant(&s.host_name, None, &s.vms, "ended without reporting"));
                }
            }
            Some(CutReport::Ready) => {
                if std::mem::replace(&mut ready[i], true) {
                    break Some(SnapshotError::participant(&s.host_name, None, &s.vms, "said Ready twice"));
                }
                let k = ready.iter().filter(|r| **r).count();
                progress.set(k as u64);
                if k == n {
                    // Every participant at once: the pauses start together.
                    futures::future::join_all(sessions.iter().map(|s| s.send(CutCommand::Go))).await;
                    progress.phase("pause", n as u64);
                }
            }
            Some(CutReport::Paused) => {
                if !ready.iter().all(|r| *r) || std::mem::replace(&mut paused[i], true) {
                    break Some(SnapshotError::participant(&s.host_name, None, &s.vms, "said Paused out of turn"));
                }
                let k = paused.iter().filter(|p| **p).count();
                progress.set(k as u64);
                if k == n {
                    released = true;
                    futures::future::join_all(sessions.iter().map(|s| s.send(CutCommand::Release))).await;
                    progress.phase("upload", total_vms);
                }
            }
            Some(CutReport::Done { vms }) => {
                // Only after the cut, and only the VMs this host was asked for, as its own.
                let ids: Vec<&str> = vms.iter().map(|v| v.id.as_str()).collect();
                if !released || results[i].is_some() || ids != s.vms.iter().map(|v| v.as_str()).collect::<Vec<_>>() || vms.iter().any(|v| v.host != s.host.id) {
                    break Some(SnapshotError::participant(&s.host_name, None, &s.vms, "reported VMs it was not asked for, or out of turn"));
                }
                done += vms.len();
                progress.set(done as u64);
                results[i] = Some(vms);
                if results.iter().all(|r| r.is_some()) {
                    break None;
                }
            }
            Some(CutReport::Failed { vm, reason }) => break Some(SnapshotError::participant(&s.host_name, vm.as_deref(), &s.vms, &reason)),
            Some(CutReport::Heartbeat) => {}
        }
    };
    if let Some(err) = failure {
        let reason = err.to_string();
        futures::future::join_all(sessions.iter().map(|s| s.send(CutCommand::Abort { reason: reason.clone() }))).await;
        // Wait for every participant to end, so that the error comes back only once every VM
        // that can run again does.
        let deadline = Instant::now() + ABORT_WAIT;
        while ended.iter().any(|e| !e) {
            match tokio::time::timeout_at(deadline.into(), rep_rx.recv()).await {
                Ok(Some((i, None))) => ended[i] = true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        return Err(err);
    }

    // 3. Commit: VMs in the order asked.
    let mut by_id: std::collections::HashMap<String, VmEntry> =
        results.into_iter().flatten().flatten().map(|v| (v.id.clone(), v)).collect();
    let mut vms_out = Vec::new();
    for (id, _, _) in &placed {
        vms_out.push(by_id.remove(id).ok_or_else(|| SnapshotError::Internal(format!("no entry came back for VM {id}")))?);
    }
    let starts: Vec<u64> = vms_out.iter().filter_map(|v| v.stats.paused_unix_us).collect();
    let pause_skew_us = match (starts.iter().min(), starts.iter().max()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let record = CommitRecord {
        name: name.to_string(),
        created_unix_ms: now_ms(),
        replicas,
        placement,
        initiator: node.id,
        vms: vms_out,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        pause_skew_us,
    };
    record.validate().map_err(|e| SnapshotError::Internal(e.to_string()))?;
    commit(node, &record).await?;
    drop(sessions);

    let raw_bytes = record.vms.iter().map(|v| v.manifest.pages * PAGE_SIZE as u64).sum();
    let vms: Vec<(String, VmStats)> = record.vms.iter().map(|v| (v.id.clone(), v.stats.clone())).collect();
    Ok(CreateSummary {
        name: name.to_string(),
        raw_bytes,
        bytes_sent: vms.iter().map(|(_, s)| s.bytes_sent).sum(),
        new_bytes: vms.iter().map(|(_, s)| s.pages_new).sum::<u64>() * PAGE_SIZE as u64,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        hosts: record.vms.iter().map(|v| v.host_name.clone()).collect(),
        pause_skew_us,
        vms,
    })
}

/// How long an aborted cut waits for its participants to resume their VMs and end.
pub const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

async fn name_on_peers(node: &Arc<Node>, name: &str) -> bool {
    let peers: Vec<Member> = node.alive_members().into_iter().filter(|m| m.id != node.id).collect();
    let answers = futures::future::join_all(peers.iter().map(|p| {
        tokio::time::timeout(crate::node::CATALOG_PEER_TIMEOUT, node.call(p, DataRequest::CatalogGet { name: name.to_string() }))
    }))
    .await;
    answers.into_iter().any(|a| matches!(a, Ok(Ok(DataResponse::Record { record: Some(_) }))))
}

/// Writes the record here first (the commit point), then on every other live member.
async fn commit(node: &Arc<Node>, record: &CommitRecord) -> Result<(), SnapshotError> {
    node.store.catalog_put(record).map_err(|e| match e {
        crate::store::StoreError::NameConflict(n) => SnapshotError::NameTaken(n),
        e => SnapshotError::Internal(e.to_string()),
    })?;
    let peers: Vec<Member> = node.alive_members().into_iter().filter(|m| m.id != node.id).collect();
    let needed = (record.replicas as usize).min(peers.len() + 1);
    let answers = futures::future::join_all(peers.iter().map(|p| node.call(p, DataRequest::Commit { record: record.clone() }))).await;
    let mut stored = 1;
    let mut reasons = Vec::new();
    for (p, a) in peers.iter().zip(answers) {
        match a {
            Ok(DataResponse::Committed) => stored += 1,
            Ok(_) => reasons.push(format!("{}: wrong answer", p.id.short())),
            Err(e) => reasons.push(format!("{}: {e}", p.id.short())),
        }
    }
    if stored < needed {
        // The record is on this node and the pages behind it are durable on their owners, so
        // the snapshot is whole; the catalog sync spreads the record once peers answer again.
        tracing::warn!(target: "vmcsnap::snapshot", snapshot = %record.name, stored, needed,
            reasons = %reasons.join("; "), "commit record reached fewer members than asked; catalog sync will spread it");
    }
    Ok(())
}

/// Reads one image file through the pipeline. Returns its page hashes in order.
pub async fn capture_file(
    up: &tokio::sync::Mutex<Uploader>,
    vi: usize,
    vm: &str,
    bytes: u64,
    path: &std::path::Path,
    progress: &Progress,
    done_pages: &mut u64,
) -> Result<(Vec<PageHash>, VmStats), SnapshotError> {
    let file = Arc::new(std::fs::File::open(path).map_err(|e| SnapshotError::Read { vm: vm.to_string(), reason: e.to_string() })?);
    let pages = bytes / PAGE_SIZE as u64;
    let windows = pages.div_ceil(WINDOW_PAGES as u64);
    let mut stats = VmStats { pages_total: pages, ..Default::default() };
    let mut hashes = Vec::with_capacity(pages as usize);
    let mut reads = stream::iter(0..windows)
        .map(|w| {
            let file = file.clone();
            let vm = vm.to_string();
            async move {
                let first = w * WINDOW_PAGES as u64;
                let n = (pages - first).min(WINDOW_PAGES as u64) as usize;
                tokio::task::spawn_blocking(move || -> Result<(Bytes, Vec<PageHash>), SnapshotError> {
                    let mut buf = vec![0u8; n * PAGE_SIZE];
                    file.read_exact_at(&mut buf, first * PAGE_SIZE as u64)
                        .map_err(|e| SnapshotError::Read { vm: vm.clone(), reason: format!("at page {first}: {e}") })?;
                    let hashes = buf.chunks_exact(PAGE_SIZE).map(hash_page).collect();
                    Ok((Bytes::from(buf), hashes))
                })
                .await
                .map_err(|e| SnapshotError::Internal(e.to_string()))?
            }
        })
        .buffered(HASH_WINDOWS_IN_FLIGHT);
    while let Some(r) = reads.next().await {
        let (buf, window_hashes) = r?;
        let mut up = up.lock().await;
        for (i, h) in window_hashes.iter().enumerate() {
            if h.is_zero() {
                stats.pages_zero += 1;
                continue;
            }
            stats.pages_nonzero += 1;
            up.push(*h, buf.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE), Some(vi)).await?;
        }
        drop(up);
        *done_pages += window_hashes.len() as u64;
        progress.set(*done_pages);
        hashes.extend(window_hashes);
    }
    Ok((hashes, stats))
}

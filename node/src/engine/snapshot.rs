//! Taking a snapshot.
//!
//! States, each with its own failure, in order:
//! 1. **Check**: name free (here and on every live member), sources readable, enough live
//!    members for `replicas`. Fails with nothing written.
//! 2. **Capture**: read, hash, group by owner, `Have`, `Put` the missing pages. Pages written
//!    here are invisible (no record names them) until step 4.
//! 3. **Seal**: build each VM's manifest tree and store its chunks like pages; `Sync` every
//!    owner so that every page is durable on `replicas` owners.
//! 4. **Commit**: store the commit record here (the commit point: every page it names is
//!    already durable on its owners), then send it to every live member; members that miss
//!    it pull it later through the catalog sync.
//!
//! A failure in 1–3 leaves no record anywhere, so `snapshot list` never shows it. Pages a
//! failed snapshot wrote stay in the store unreferenced (a later snapshot reuses them).

use crate::engine::{Progress, HASH_WINDOWS_IN_FLIGHT, OWNER_BATCHES_IN_FLIGHT, OWNER_BATCH_PAGES, OWNER_QUEUE_BATCHES, WINDOW_PAGES};
use crate::net::NetError;
use crate::node::Node;
use crate::source::Source;
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
use vmcsnap_protocol::control::{CreateSummary, VmSpec};
use vmcsnap_protocol::manifest::{build_manifest, validate_name, Block, CaptureMode, CommitRecord, VmEntry, VmStats};
use vmcsnap_protocol::wire::{DataRequest, DataResponse, PagePut, PUT_PAGES_MAX};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

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

#[derive(Default)]
struct VmCounters {
    new: AtomicU64,
    bytes_sent: AtomicU64,
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
    fn new(node: &Arc<Node>, members: Vec<Member>, replicas: usize, counters: Arc<Vec<VmCounters>>) -> Self {
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
    async fn finish(mut self) -> Result<Vec<Member>, SnapshotError> {
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

fn owner_error(m: &Member, source: NetError) -> SnapshotError {
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

struct Prepared {
    spec: VmSpec,
    source: Source,
    /// Memory size for files; 0 for QEMU VMs (known once the stream arrives).
    bytes: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Takes snapshot `name` of `vms` (all on this host).
pub async fn create(node: Arc<Node>, name: String, vms: Vec<VmSpec>, mode: CaptureMode, progress: Progress) -> Result<CreateSummary, SnapshotError> {
    validate_name("snapshot name", &name).map_err(SnapshotError::Invalid)?;
    if !node.reserve_name(&name) {
        return Err(SnapshotError::NameTaken(name));
    }
    let r = create_reserved(&node, &name, vms, mode, progress).await;
    node.release_name(&name);
    match &r {
        Ok(s) => tracing::info!(target: "vmcsnap::snapshot", snapshot = %name, raw = s.raw_bytes, new = s.new_bytes, ms = s.elapsed_ms, "snapshot committed"),
        Err(e) => tracing::warn!(target: "vmcsnap::snapshot", snapshot = %name, error = %e, "snapshot failed; nothing committed"),
    }
    r
}

async fn create_reserved(node: &Arc<Node>, name: &str, vms: Vec<VmSpec>, mode: CaptureMode, mut progress: Progress) -> Result<CreateSummary, SnapshotError> {
    let t0 = Instant::now();
    // 1. Check.
    if vms.is_empty() {
        return Err(SnapshotError::Invalid("name at least one VM (--vm ID=file:PATH)".into()));
    }
    let mut ids = HashSet::new();
    let mut prepared = Vec::new();
    for spec in vms {
        validate_name("VM id", &spec.id).map_err(SnapshotError::Invalid)?;
        if !ids.insert(spec.id.clone()) {
            return Err(SnapshotError::Invalid(format!("VM id {} is given twice", spec.id)));
        }
        let source = Source::parse(&spec.source).map_err(SnapshotError::Invalid)?;
        let bytes = source.probe().map_err(|reason| SnapshotError::Read { vm: spec.id.clone(), reason })?;
        prepared.push(Prepared { spec, source, bytes });
    }
    // Here, then one targeted question per live peer (not a pull of their whole catalogs).
    let here = node.store.catalog_get(name).map_err(|e| SnapshotError::Internal(e.to_string()))?;
    if here.is_some() || name_on_peers(node, name).await {
        return Err(SnapshotError::NameTaken(name.to_string()));
    }
    let members = node.alive_members();
    let replicas = node.config.replicas;
    if members.len() < replicas as usize {
        return Err(SnapshotError::TooFewMembers { alive: members.len(), replicas });
    }

    // 2. Capture.
    let counters: Arc<Vec<VmCounters>> = Arc::new(prepared.iter().map(|_| VmCounters::default()).collect());
    let mut up = Uploader::new(node, members, replicas as usize, counters.clone());
    let total_pages: u64 = prepared.iter().map(|p| p.bytes / PAGE_SIZE as u64).sum();
    progress.phase("capture", total_pages);
    let mut done_pages = 0u64;
    let mut entries = Vec::new();
    let mut all_hashes = Vec::new();
    let mut layouts = Vec::new();
    let mut qemu_states = Vec::new();
    for (vi, p) in prepared.iter().enumerate() {
        let tv = Instant::now();
        let (hashes, mut stats, blocks, qemu) = match &p.source {
            Source::File(path) => {
                let (h, s) = capture_file(&mut up, vi, p, path, &progress, &mut done_pages).await?;
                (h, s, vec![Block { name: "ram".into(), bytes: p.bytes }], None)
            }
            Source::Qemu(qmp) => {
                progress.phase("capture", 0);
                let c = crate::qemu::capture::capture(node, &mut up, vi, &p.spec.id, qmp, mode, &progress).await?;
                (c.hashes, c.stats, c.blocks, Some(c.state))
            }
        };
        stats.capture_ms = tv.elapsed().as_millis() as u64;
        entries.push(stats);
        all_hashes.push(hashes);
        layouts.push(blocks);
        qemu_states.push(qemu);
    }

    // 3. Seal: manifest chunks go through the same pipeline, then every owner syncs.
    progress.phase("seal", prepared.len() as u64);
    let mut roots = Vec::new();
    for hashes in &all_hashes {
        let built = build_manifest(hashes);
        for (h, page) in built.chunks {
            up.push(h, Bytes::from(page), None).await?;
        }
        roots.push(built.root);
    }
    drop(all_hashes);
    let members = up.finish().await?;
    futures::future::try_join_all(members.iter().map(|m| async move {
        match node.call(m, DataRequest::Sync).await.map_err(|e| owner_error(m, e))? {
            DataResponse::Synced => Ok(()),
            _ => Err(SnapshotError::Protocol(m.id.short())),
        }
    }))
    .await?;

    // 4. Commit.
    let mut vms_out = Vec::new();
    for ((((p, mut stats), root), blocks), qemu) in prepared.iter().zip(entries).zip(roots).zip(layouts).zip(qemu_states) {
        let c = &counters[vms_out.len()];
        // In live pre-copy a page re-sent with new content is stored too; "new" counts every
        // page stored, so it can exceed the pages the final memory holds.
        stats.pages_new = c.new.load(Ordering::Relaxed);
        stats.pages_dedup = stats.pages_nonzero.saturating_sub(stats.pages_new);
        stats.bytes_sent = c.bytes_sent.load(Ordering::Relaxed);
        vms_out.push(VmEntry {
            id: p.spec.id.clone(),
            source: p.spec.source.clone(),
            host: node.id,
            blocks,
            manifest: root,
            stats,
            qemu,
        });
    }
    let record = CommitRecord {
        name: name.to_string(),
        created_unix_ms: now_ms(),
        replicas,
        placement: members.iter().map(|m| m.id).collect(),
        initiator: node.id,
        vms: vms_out,
        elapsed_ms: t0.elapsed().as_millis() as u64,
    };
    record.validate().map_err(|e| SnapshotError::Internal(e.to_string()))?;
    commit(node, &record).await?;

    let raw_bytes = record.vms.iter().map(|v| v.manifest.pages * PAGE_SIZE as u64).sum();
    let vms: Vec<(String, VmStats)> = record.vms.iter().map(|v| (v.id.clone(), v.stats.clone())).collect();
    Ok(CreateSummary {
        name: name.to_string(),
        raw_bytes,
        bytes_sent: vms.iter().map(|(_, s)| s.bytes_sent).sum(),
        new_bytes: vms.iter().map(|(_, s)| s.pages_new).sum::<u64>() * PAGE_SIZE as u64,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        vms,
    })
}

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
async fn capture_file(
    up: &mut Uploader,
    vi: usize,
    p: &Prepared,
    path: &std::path::Path,
    progress: &Progress,
    done_pages: &mut u64,
) -> Result<(Vec<PageHash>, VmStats), SnapshotError> {
    let file = Arc::new(std::fs::File::open(path).map_err(|e| SnapshotError::Read { vm: p.spec.id.clone(), reason: e.to_string() })?);
    let pages = p.bytes / PAGE_SIZE as u64;
    let windows = pages.div_ceil(WINDOW_PAGES as u64);
    let vm = p.spec.id.clone();
    let mut stats = VmStats { pages_total: pages, ..Default::default() };
    let mut hashes = Vec::with_capacity(pages as usize);
    let mut reads = stream::iter(0..windows)
        .map(|w| {
            let file = file.clone();
            let vm = vm.clone();
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
        for (i, h) in window_hashes.iter().enumerate() {
            if h.is_zero() {
                stats.pages_zero += 1;
                continue;
            }
            stats.pages_nonzero += 1;
            up.push(*h, buf.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE), Some(vi)).await?;
        }
        *done_pages += window_hashes.len() as u64;
        progress.set(*done_pages);
        hashes.extend(window_hashes);
    }
    Ok((hashes, stats))
}

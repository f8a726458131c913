//! Putting pages on their owners: the [`Uploader`] groups pages by owner and feeds one worker
//! per owner (`Have`, then `Put` of the missing pages, [`OWNER_BATCHES_IN_FLIGHT`] batches at
//! once); [`capture_file`] reads a memory image through it; [`VmPages`] is the page sink a
//! QEMU capture writes into.

use super::error::SnapshotError;
use super::{HASH_WINDOWS_IN_FLIGHT, OWNER_BATCHES_IN_FLIGHT, OWNER_BATCH_PAGES, OWNER_QUEUE_BATCHES, WINDOW_PAGES};
use crate::net::NetError;
use crate::node::Node;
use crate::source::{PageSink, SinkError};
use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Mutex};
use vmcsnap_dht::placement::{owners_into, View};
use vmcsnap_dht::Member;
use vmcsnap_protocol::manifest::VmStats;
use vmcsnap_protocol::wire::{DataRequest, DataResponse, PagePuts, PUT_PAGES_MAX};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

/// One page on its way to one owner.
struct Item {
    hash: PageHash,
    data: Bytes,
    /// Index of the VM the page was first seen in; `None` for manifest chunks and device state.
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
    workers: tokio::task::JoinSet<Result<Option<(Member, u64)>, SnapshotError>>,
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
                Ok(Ok(_)) => {}
            }
        }
        SnapshotError::Internal("owner worker stopped".into())
    }

    /// Sends what is pending and waits for every owner to acknowledge everything. Returns
    /// the owners that were sent anything, each with the incarnation all its answers carried
    /// (what its `Sync` must name).
    pub async fn finish(mut self) -> Result<Vec<(Member, u64)>, SnapshotError> {
        for o in 0..self.members.len() {
            self.flush(o).await?;
        }
        self.senders.clear(); // workers see the end of their queues
        let mut owners = Vec::new();
        while let Some(r) = self.workers.join_next().await {
            match r {
                Ok(Ok(Some(o))) => owners.push(o),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(SnapshotError::Internal(format!("owner worker failed: {e}"))),
            }
        }
        Ok(owners)
    }
}

/// Makes every page `owners` acknowledged durable: a `Sync` to each, naming the incarnation
/// its answers carried. An owner that restarted since refuses, and the snapshot fails.
pub async fn sync_owners(node: &Arc<Node>, owners: &[(Member, u64)]) -> Result<(), SnapshotError> {
    futures::future::try_join_all(owners.iter().map(|(m, incarnation)| async move {
        match node.call(m, DataRequest::Sync { incarnation: *incarnation }).await.map_err(|e| owner_error(m, e))? {
            DataResponse::Synced => Ok(()),
            _ => Err(SnapshotError::Protocol(m.id.short())),
        }
    }))
    .await?;
    Ok(())
}

/// The incarnation every answer of one owner must carry: the first one's.
struct Incarnation(std::sync::OnceLock<u64>);

impl Incarnation {
    fn check(&self, member: &Member, seen: u64) -> Result<(), SnapshotError> {
        if *self.0.get_or_init(|| seen) == seen {
            Ok(())
        } else {
            Err(restarted(member))
        }
    }
}

fn restarted(m: &Member) -> SnapshotError {
    owner_error(m, NetError::Remote { peer: m.id.short(), kind: vmcsnap_protocol::wire::RemoteErrorKind::Restarted, message: "the owner restarted during the snapshot; pages it acknowledged may be lost".into() })
}

/// An owner's failure as a snapshot error.
pub fn owner_error(m: &Member, source: NetError) -> SnapshotError {
    SnapshotError::Owner { owner: m.id.short(), addr: m.data_addr, source: Box::new(source) }
}

async fn owner_worker(node: Arc<Node>, member: Member, rx: mpsc::Receiver<Vec<Item>>, counters: Arc<Vec<VmCounters>>) -> Result<Option<(Member, u64)>, SnapshotError> {
    let remote = member.id != node.id;
    let incarnation = Arc::new(Incarnation(std::sync::OnceLock::new()));
    let batches = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let claims = batches
        .map(|batch| {
            let (node, member, counters, inc) = (node.clone(), member.clone(), counters.clone(), incarnation.clone());
            async move {
                // A VM of this node paused for a cut gets the CPU first (see `Quiet`).
                node.quiet.wait().await;
                let hashes = batch.iter().map(|i| i.hash).collect();
                let missing = match node.call(&member, DataRequest::Have { hashes }).await.map_err(|e| owner_error(&member, e))? {
                    DataResponse::Have { missing, incarnation } => {
                        inc.check(&member, incarnation)?;
                        missing
                    }
                    _ => return Err(SnapshotError::Protocol(member.id.short())),
                };
                let mut claimed: Vec<PageHash> = Vec::with_capacity(batch.len() - missing.len().min(batch.len()));
                let mut next_missing = missing.iter().peekable();
                for (i, item) in batch.iter().enumerate() {
                    if next_missing.next_if(|&&m| m as usize == i).is_none() {
                        claimed.push(item.hash);
                    }
                }
                for chunk in missing.chunks(PUT_PAGES_MAX) {
                    node.quiet.wait().await;
                    let mut pages = PagePuts::with_capacity(chunk.len());
                    for &i in chunk {
                        let item = batch.get(i as usize).ok_or_else(|| SnapshotError::Protocol(member.id.short()))?;
                        pages.push(item.hash, &item.data);
                    }
                    match node.call(&member, DataRequest::Put { pages }).await.map_err(|e| owner_error(&member, e))? {
                        DataResponse::Put { incarnation, .. } => inc.check(&member, incarnation)?,
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
                Ok(claimed)
            }
        })
        .buffer_unordered(OWNER_BATCHES_IN_FLIGHT)
        .try_fold(ClaimSample::new(), |mut sample, claimed| async move {
            sample.extend(claimed);
            Ok(sample)
        })
        .await?;
    if remote {
        claims.check(&node, &member).await?;
    }
    Ok(incarnation.0.get().map(|&i| (member, i)))
}

/// Pages an owner said it holds (its `Have` answer) that are fetched back from it before the
/// snapshot may commit: a uniform sample, chosen with a key the owner does not know, so an
/// owner that claims pages it does not store is caught with high probability (one that
/// withholds a fraction f of its claims passes with probability (1 - f)^[`CLAIM_SAMPLES`]).
pub const CLAIM_SAMPLES: usize = 16;

/// A keyed bottom-k sample of claimed page hashes.
struct ClaimSample {
    key: std::collections::hash_map::RandomState,
    /// (score, hash), the largest score on top.
    kept: std::collections::BinaryHeap<(u64, PageHash)>,
}

impl ClaimSample {
    fn new() -> Self {
        Self { key: Default::default(), kept: Default::default() }
    }

    fn extend(&mut self, claimed: Vec<PageHash>) {
        use std::hash::BuildHasher;
        for h in claimed {
            self.kept.push((self.key.hash_one(h), h));
            if self.kept.len() > CLAIM_SAMPLES {
                self.kept.pop();
            }
        }
    }

    /// Fetches the sample from `member`; every page must come back under its hash.
    async fn check(self, node: &Node, member: &Member) -> Result<(), SnapshotError> {
        let hashes: Vec<PageHash> = self.kept.into_iter().map(|(_, h)| h).collect();
        if hashes.is_empty() {
            return Ok(());
        }
        let pages = match node.call(member, DataRequest::Get { hashes: hashes.clone() }).await.map_err(|e| owner_error(member, e))? {
            DataResponse::Pages { pages } if pages.len() == hashes.len() => pages,
            _ => return Err(SnapshotError::Protocol(member.id.short())),
        };
        let pages = pages.pages().ok_or_else(|| SnapshotError::Protocol(member.id.short()))?;
        for (h, p) in hashes.iter().zip(pages) {
            if p.is_none_or(|p| hash_page(p) != *h) {
                return Err(SnapshotError::FalseClaim { owner: node.host_name(&member.id), page: h.short() });
            }
        }
        Ok(())
    }
}

/// The page sink of VM `vm` (its index in the snapshot): pages go to the shared uploader.
pub struct VmPages<'a> {
    /// The snapshot's uploader.
    pub up: &'a Mutex<Uploader>,
    /// The VM's index.
    pub vm: usize,
    /// The node's quiet: pages wait while VMs are paused for a cut.
    pub quiet: &'a crate::source::Quiet,
}

impl PageSink for VmPages<'_> {
    async fn push(&self, pages: Vec<(PageHash, Bytes)>) -> Result<(), SinkError> {
        self.quiet.wait().await;
        let mut up = self.up.lock().await;
        for (h, data) in pages {
            up.push(h, data, Some(self.vm)).await.map_err(|e| Box::new(e) as SinkError)?;
        }
        Ok(())
    }
}

/// A sink error back as the snapshot error it was.
pub fn from_sink(e: SinkError) -> SnapshotError {
    match e.downcast::<SnapshotError>() {
        Ok(e) => *e,
        Err(e) => SnapshotError::Internal(e.to_string()),
    }
}

/// Reads one image file through the pipeline. Returns its page hashes in order.
pub async fn capture_file(up: &Mutex<Uploader>, vi: usize, vm: &str, bytes: u64, path: &std::path::Path) -> Result<(Vec<PageHash>, VmStats), SnapshotError> {
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
        hashes.extend(window_hashes);
    }
    Ok((hashes, stats))
}

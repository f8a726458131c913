//! What the eager and the lazy restore share, and what garbage collection, verification and
//! repair read a snapshot with: pages fetched by hash from this node's store or the owners
//! (each verified), manifest trees expanded, blobs read back; a target QEMU checked; a VM's
//! registration moved to the host it now runs on.

use super::error::RestoreError;
use super::FETCHES_IN_FLIGHT;
use super::LOCAL_LOOKUP_PAGES;
use crate::net::NetError;
use crate::node::{fan_out, Node, PEER_ANSWER_TIMEOUT};
use crate::qemu::qmp::Qmp;
use bytes::Bytes;
use futures::{stream, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vmcsnap_dht::placement::{owners, View};
use vmcsnap_dht::Member;
use vmcsnap_protocol::manifest::{expand_level, level_sizes, CommitRecord, QemuState, VmEntry};
use vmcsnap_protocol::wire::{DataRequest, DataResponse, GET_PAGES_MAX};
use vmcsnap_protocol::{hash_page, NodeId, PageHash, PAGE_SIZE};

/// The VM runs on `host` now: every other live member forgets it.
pub(super) async fn forget_elsewhere(node: &Arc<Node>, vm: &str, host: &Member) {
    // Only the members that may hold it (by their gossiped states).
    let others: Vec<Member> = node.alive_members().into_iter().filter(|m| m.id != host.id).collect();
    let others = node.may_hold(others, &[vm.to_string()]);
    fan_out(&others, PEER_ANSWER_TIMEOUT, |m| async move {
        if m.id == node.id {
            let r = node.vms.remove(vm).map(|_| ()).map_err(NetError::Store);
            node.publish_state();
            r
        } else {
            node.call(&m, DataRequest::VmForget { id: vm.to_string() }).await.map(|_| ())
        }
    })
    .await;
}

/// Fetches pages by hash from a snapshot's owners, verifying each.
pub(super) struct Fetcher<'a> {
    node: &'a Arc<Node>,
    view: View,
    /// Current address and liveness of each placement member (`None`: not known any more).
    /// A member that fails a fetch is marked down for the rest of this restore.
    members: std::sync::Mutex<Vec<Option<Member>>>,
    replicas: usize,
    pub(super) bytes_fetched: AtomicU64,
    pub(super) pages_local: AtomicU64,
    /// Pages another fetch on this node fetched for this one too ([`crate::share`]).
    pub(super) pages_shared: AtomicU64,
    /// A lazy restore's push: its `Get`s (not those for pages a guest asked for) wait for
    /// [`Node::lazy_push_gets`].
    push: bool,
    _sharing: crate::share::Entered<'a>,
}

impl<'a> Fetcher<'a> {
    /// A fetcher for `record`'s pages. Pages are looked for in the rendezvous ranking over the
    /// record's placement and today's members together: the first `replicas` of it that are
    /// not gone are the page's owners now (where repair and rebalance put it), the placement
    /// members where the snapshot put it.
    pub(super) fn new(node: &'a Arc<Node>, record: &CommitRecord) -> Self {
        let known: HashMap<NodeId, Member> = node.members().into_iter().map(|m| (m.id, m)).collect();
        let view = View::new(record.placement.iter().chain(known.keys()).copied().collect());
        let members = view.members().iter().map(|id| known.get(id).cloned()).collect();
        Self {
            node,
            view,
            members: std::sync::Mutex::new(members),
            replicas: record.replicas as usize,
            bytes_fetched: AtomicU64::new(0),
            pages_local: AtomicU64::new(0),
            pages_shared: AtomicU64::new(0),
            push: false,
            _sharing: node.fetch_share.enter(),
        }
    }

    /// The same, for a lazy restore: the fetches of its background push share this node's
    /// [`crate::node::LAZY_PUSH_GETS_IN_FLIGHT`] with those of the other lazy restores.
    pub(super) fn for_push(mut self) -> Self {
        self.push = true;
        self
    }

    /// What this fetcher found here, took from another fetch, and fetched.
    pub(super) fn stats(&self) -> FetchStats {
        FetchStats {
            pages_local: self.pages_local.load(Ordering::Relaxed),
            pages_shared: self.pages_shared.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
        }
    }

    /// Fetches distinct non-zero pages. Returns them keyed by hash. Pages this node lacks
    /// are shared with the other fetches running here ([`crate::share`]): one that another
    /// fetches or fetched lately is taken from it, not from the owners again.
    pub(super) async fn fetch(&self, hashes: Vec<PageHash>) -> Result<HashMap<PageHash, Bytes>, RestoreError> {
        self.fetch_as(hashes, false).await
    }

    /// [`Fetcher::fetch`] for pages a guest waits on: a page another fetch is fetching is
    /// fetched again, not waited for (that fetch may be a window of thousands of pages; a
    /// lazily restored guest's vCPU, and under TCG QEMU's whole main loop, would wait on it).
    pub(super) async fn fetch_urgent(&self, hashes: Vec<PageHash>) -> Result<HashMap<PageHash, Bytes>, RestoreError> {
        self.fetch_as(hashes, true).await
    }

    async fn fetch_as(&self, hashes: Vec<PageHash>, urgent: bool) -> Result<HashMap<PageHash, Bytes>, RestoreError> {
        let mut out = HashMap::with_capacity(hashes.len());
        let local = self.lookup_local(&hashes).await?;
        let mut remote = Vec::new();
        for (h, l) in hashes.into_iter().zip(local) {
            match l {
                Some(p) => {
                    self.pages_local.fetch_add(1, Ordering::Relaxed);
                    out.insert(h, p);
                }
                None => remote.push(h),
            }
        }
        if remote.is_empty() {
            return Ok(out);
        }
        let share = &self.node.fetch_share;
        let claim = share.claim(&remote);
        for (h, p) in claim.have {
            self.pages_shared.fetch_add(1, Ordering::Relaxed);
            out.insert(h, p);
        }
        // Led pages first (nothing here waits on another fetch), then the followed ones; when
        // urgent, those too, at once.
        let (lead, senders): (Vec<PageHash>, Vec<_>) = claim.lead.into_iter().unzip();
        let mut ask = lead.clone();
        let mut follow = claim.follow;
        if urgent {
            ask.extend(follow.drain(..).map(|(h, _)| h));
        }
        let paced = self.push && !urgent;
        let fetched = self.ask_owners(ask, &mut out, paced).await;
        for (h, tx) in lead.iter().zip(senders) {
            share.led(*h, tx, out.get(h));
        }
        fetched?;
        let followed = futures::future::join_all(follow.into_iter().map(|(h, cell)| async move { (h, crate::share::follow(cell).await) })).await;
        let mut own = Vec::new();
        for (h, p) in followed {
            match p {
                Some(p) => {
                    self.pages_shared.fetch_add(1, Ordering::Relaxed);
                    out.insert(h, p);
                }
                None => own.push(h),
            }
        }
        self.ask_owners(own, &mut out, paced).await?;
        Ok(out)
    }

    /// Fetches `hashes` from their owners into `out`: each page's owners in placement order,
    /// tried one after another.
    async fn ask_owners(&self, hashes: Vec<PageHash>, out: &mut HashMap<PageHash, Bytes>, paced: bool) -> Result<(), RestoreError> {
        let mut todo: Vec<Wanted> =
            hashes.into_iter().map(|h| Wanted { hash: h, owners: owners(&self.view, &h, self.replicas), extended: false, reasons: vec!["not on this host".into()] }).collect();
        while !todo.is_empty() {
            let members = self.members.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let requests = self.route(std::mem::take(&mut todo), &members)?;
            let dead = self.fetch_round(requests, &members, out, &mut todo, paced).await;
            let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
            for o in dead {
                if let Some(Some(m)) = members.get_mut(o) {
                    m.alive = false;
                }
            }
        }
        Ok(())
    }

    /// This node's copies of `hashes` (pages it holds are not fetched again), looked up in
    /// parallel slices. A read of a page this node lacks costs no more than an existence check.
    async fn lookup_local(&self, hashes: &[PageHash]) -> Result<Vec<Option<Bytes>>, RestoreError> {
        let t0 = Instant::now();
        let lookups = hashes.chunks(LOCAL_LOOKUP_PAGES).map(|chunk| {
            let store = self.node.store.clone();
            let hs = chunk.to_vec();
            tokio::task::spawn_blocking(move || store.get_shared(&hs))
        });
        let mut local = Vec::with_capacity(hashes.len());
        for r in futures::future::join_all(lookups).await {
            local.extend(r.map_err(|e| RestoreError::Internal(format!("local lookup failed: {e}")))??);
        }
        tracing::trace!(target: "vmcsnap::restore", pages = local.len(), ms = t0.elapsed().as_secs_f64() * 1e3, "local lookup");
        Ok(local)
    }

    /// Groups wanted pages by the next owner to try (skipping owners that are down), in
    /// `Get` requests of at most [`GET_PAGES_MAX`]; a page with no owner left is unavailable.
    fn route(&self, todo: Vec<Wanted>, members: &[Option<Member>]) -> Result<Vec<(usize, Vec<Wanted>)>, RestoreError> {
        let mut by_owner: HashMap<usize, Vec<Wanted>> = HashMap::new();
        for mut w in todo {
            loop {
                if w.owners.is_empty() && !w.extended {
                    // Past its first owners, in the same ranking: where repair puts the copies
                    // of owners that were removed or long gone.
                    w.owners = owners(&self.view, &w.hash, self.view.members().len()).split_off(self.replicas.min(self.view.members().len()));
                    w.extended = true;
                }
                let Some(&o) = w.owners.first() else {
                    return Err(RestoreError::Unavailable { hash: w.hash, reasons: w.reasons.join("; ") });
                };
                if self.view.members()[o] == self.node.id {
                    // Looked up locally already.
                    w.owners.remove(0);
                    continue;
                }
                match &members[o] {
                    Some(m) if m.alive => break,
                    Some(m) => w.reasons.push(format!("{} is down", m.id.short())),
                    None => w.reasons.push(format!("{} is no longer a member", self.view.members()[o].short())),
                }
                w.owners.remove(0);
            }
            by_owner.entry(w.owners[0]).or_default().push(w);
        }
        let mut requests = Vec::new();
        for (o, mut items) in by_owner {
            while !items.is_empty() {
                let rest = items.split_off(items.len().min(GET_PAGES_MAX));
                requests.push((o, std::mem::replace(&mut items, rest)));
            }
        }
        Ok(requests)
    }

    /// Sends one round of `Get`s, [`FETCHES_IN_FLIGHT`] at once (`paced`: each also waits for
    /// one of [`Node::lazy_push_gets`]). Verified pages go to `out`;
    /// pages an owner lacked or sent wrong go back to `retry` with their next owner. Returns
    /// the owners that failed (not asked again in this restore).
    async fn fetch_round(
        &self,
        requests: Vec<(usize, Vec<Wanted>)>,
        members: &[Option<Member>],
        out: &mut HashMap<PageHash, Bytes>,
        retry: &mut Vec<Wanted>,
        paced: bool,
    ) -> Vec<usize> {
        let node = self.node;
        let mut results = stream::iter(requests)
            .map(|(o, items)| async move {
                let Some(m) = members[o].clone() else {
                    return (o, items, Err("not a member".to_string()));
                };
                let hashes = items.iter().map(|i| i.hash).collect();
                // Closed only with the node, which ends this restore too.
                let _permit = if paced { node.lazy_push_gets.acquire().await.ok() } else { None };
                let r = match node.call(&m, DataRequest::Get { hashes }).await {
                    Ok(DataResponse::Pages { pages }) if pages.len() == items.len() => match pages.ranges() {
                        // Each page a slice of the answer's one buffer.
                        Some(ranges) => {
                            let data = Bytes::from(pages.into_data());
                            Ok(ranges.into_iter().map(|r| r.map(|r| data.slice(r))).collect::<Vec<_>>())
                        }
                        None => Err("answered with a malformed page set".to_string()),
                    },
                    Ok(_) => Err("answered with the wrong message".to_string()),
                    Err(NetError::Unreachable { .. }) => Err("unreachable".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (o, items, r)
            })
            .buffer_unordered(FETCHES_IN_FLIGHT);
        let mut dead = Vec::new();
        while let Some((o, items, r)) = results.next().await {
            let who = self.view.members()[o].short();
            match r {
                Ok(pages) => {
                    for (mut w, p) in items.into_iter().zip(pages) {
                        match p {
                            Some(p) if hash_page(&p) == w.hash => {
                                self.bytes_fetched.fetch_add(p.len() as u64, Ordering::Relaxed);
                                out.insert(w.hash, p);
                            }
                            Some(p) => {
                                let got = hash_page(&p);
                                tracing::warn!(target: "vmcsnap::restore", peer = %who, page = %w.hash.short(), got = %got.short(), "peer sent a page that does not match its hash");
                                w.next_owner(format!("{who} sent a page with hash {}", got.short()));
                                retry.push(w);
                            }
                            None => {
                                w.next_owner(format!("{who} does not have it"));
                                retry.push(w);
                            }
                        }
                    }
                }
                Err(reason) => {
                    tracing::warn!(target: "vmcsnap::restore", peer = %who, %reason, "fetch failed; trying other replicas");
                    dead.push(o); // do not ask it again in this restore
                    for mut w in items {
                        w.next_owner(format!("{who}: {reason}"));
                        retry.push(w);
                    }
                }
            }
        }
        dead
    }
}

/// Where a restore's pages came from.
#[derive(Clone, Copy, Debug, Default)]
pub struct FetchStats {
    /// Distinct pages found in this node's store.
    pub pages_local: u64,
    /// Distinct pages another fetch on this node fetched for this one too.
    pub pages_shared: u64,
    /// Page bytes fetched from peers.
    pub bytes_fetched: u64,
}

impl FetchStats {
    /// Both counts together (two fetchers of one restore).
    pub fn plus(self, o: Self) -> Self {
        Self { pages_local: self.pages_local + o.pages_local, pages_shared: self.pages_shared + o.pages_shared, bytes_fetched: self.bytes_fetched + o.bytes_fetched }
    }
}

/// A page still to fetch: its remaining owners (placement indexes, next first) and what the
/// owners tried so far said.
struct Wanted {
    hash: PageHash,
    owners: Vec<usize>,
    /// Whether `owners` holds the members past the first `replicas` already.
    extended: bool,
    reasons: Vec<String>,
}

impl Wanted {
    /// The current owner failed for `reason`: on to the next.
    fn next_owner(&mut self, reason: String) {
        self.reasons.push(reason);
        self.owners.remove(0);
    }
}


/// A VM's page hashes, in memory order: its manifest tree expanded level by level, the chunks
/// fetched (verified) from the record's owners. `on_chunks(levels_done, chunk_hashes)` sees
/// the distinct non-zero chunk hashes of each level as they are fetched.
pub(super) async fn expand_manifest(fetcher: &Fetcher<'_>, entry: &VmEntry, mut on_chunks: impl FnMut(usize, &[PageHash])) -> Result<Vec<PageHash>, RestoreError> {
    let sizes = level_sizes(entry.manifest.pages);
    let mut level = entry.manifest.top.clone();
    for d in (0..entry.manifest.depth as usize).rev() {
        let mut need: Vec<PageHash> = level.iter().filter(|h| !h.is_zero()).copied().collect();
        need.sort();
        need.dedup();
        let chunks = fetcher.fetch(need.clone()).await?;
        level = expand_level(&level, sizes[d], |h| {
            chunks.get(h).map(|c| c.to_vec()).ok_or_else(|| RestoreError::Internal(format!("manifest chunk {h} missing after fetch")))
        })?;
        on_chunks(entry.manifest.depth as usize - d, &need);
    }
    if level.len() as u64 != entry.manifest.pages {
        return Err(RestoreError::Internal("manifest size does not match the record".into()));
    }
    Ok(level)
}

/// Calls `keep` with every non-zero page hash `record` references: each VM's manifest chunks
/// (every level), its memory pages and its device-state chunks. The manifest chunks are read
/// as a restore reads them (this node first, then the owners), so a record whose chunks no
/// owner serves is an error, never a partial answer.
pub async fn referenced_pages(node: &Arc<Node>, record: &CommitRecord, mut keep: impl FnMut(PageHash)) -> Result<(), RestoreError> {
    let fetcher = Fetcher::new(node, record);
    for entry in &record.vms {
        vm_pages(&fetcher, entry, &mut keep).await?;
    }
    Ok(())
}

/// Fetches `hashes` (distinct, non-zero) of `record` from wherever they are: this node first,
/// then the owners in ranking order, each page verified against its hash.
pub async fn fetch_pages(node: &Arc<Node>, record: &CommitRecord, hashes: Vec<PageHash>) -> Result<HashMap<PageHash, Bytes>, RestoreError> {
    Fetcher::new(node, record).fetch(hashes).await
}

/// Each VM's distinct non-zero pages (memory, manifest chunks, device state), sorted.
pub async fn pages_by_vm(node: &Arc<Node>, record: &CommitRecord) -> Result<Vec<Vec<PageHash>>, RestoreError> {
    let fetcher = Fetcher::new(node, record);
    let mut out = Vec::new();
    for entry in &record.vms {
        let mut pages = Vec::new();
        vm_pages(&fetcher, entry, |h| pages.push(h)).await?;
        pages.sort();
        pages.dedup();
        out.push(pages);
    }
    Ok(out)
}

async fn vm_pages(fetcher: &Fetcher<'_>, entry: &VmEntry, mut keep: impl FnMut(PageHash)) -> Result<(), RestoreError> {
    let leaves = expand_manifest(fetcher, entry, |_, chunks| chunks.iter().for_each(|h| keep(*h))).await?;
    leaves.into_iter().filter(|h| !h.is_zero()).for_each(&mut keep);
    if let Some(q) = &entry.qemu {
        q.device_state.chunks.iter().filter(|h| !h.is_zero()).for_each(|h| keep(*h));
    }
    Ok(())
}

/// Fetches the bytes of a blob stored as pages.
pub(super) async fn fetch_blob(fetcher: &Fetcher<'_>, blob: &vmcsnap_protocol::manifest::BlobRef) -> Result<Vec<u8>, RestoreError> {
    let mut need: Vec<PageHash> = blob.chunks.iter().filter(|h| !h.is_zero()).copied().collect();
    need.sort();
    need.dedup();
    let got = fetcher.fetch(need).await?;
    let mut out = Vec::with_capacity(blob.chunks.len() * PAGE_SIZE);
    for h in &blob.chunks {
        match got.get(h) {
            Some(p) => out.extend_from_slice(p),
            None if h.is_zero() => out.extend_from_slice(&[0u8; PAGE_SIZE]),
            None => return Err(RestoreError::Internal(format!("device state chunk {h} missing after fetch"))),
        }
    }
    out.truncate(blob.len as usize);
    Ok(out)
}

/// Checks that the QEMU behind `q` can take the snapshot of `vm`: same accelerator, waiting
/// for an incoming migration.
pub(super) async fn check_target(q: &mut Qmp, vm: &str, state: &QemuState) -> Result<(), RestoreError> {
    let target_err = |m: String| RestoreError::Target(m);
    let accel = q.accel().await.map_err(|e| target_err(e.to_string()))?;
    if accel != state.accel {
        return Err(target_err(accel_mismatch(vm, &state.accel, &accel)));
    }
    let status = q.status().await.map_err(|e| target_err(e.to_string()))?;
    if status != "inmigrate" {
        return Err(target_err(not_inmigrate(&status)));
    }
    Ok(())
}

/// [`check_target`]'s error when the accelerators differ.
pub(super) fn accel_mismatch(vm: &str, recorded: &str, target: &str) -> String {
    format!("snapshot of VM {vm} was taken under {recorded}, but the target QEMU runs {target}; a snapshot restores only on the same accelerator")
}

/// [`check_target`]'s error when the target QEMU waits for no stream.
pub(super) fn not_inmigrate(status: &str) -> String {
    format!("the target QEMU is {status}, not waiting for an incoming migration")
}


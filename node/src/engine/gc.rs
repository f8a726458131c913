//! Garbage collection: pages that no live snapshot references are deleted on every owner, and
//! their space goes back to the file system.
//!
//! Each owner collects its own store, on its own, in cycles:
//!
//! 1. **Watch.** [`Store::watch_begin`]: from now on every page a `Have` finds present or a
//!    `Put` stores is remembered, and no deletion touches it.
//! 2. **Mark.** Every commit record in the catalog is expanded (manifest chunks, memory pages,
//!    device state) into a Bloom filter of live pages ([`Bloom`]: about 10 bits per stored
//!    page, never a list of hashes); what this store holds and no record references is a
//!    candidate. So is a referenced page this node no longer owns (it is not among the page's
//!    first `replicas` owners in the owner view: a member joined or came back, and repair
//!    moved the page there): a *surplus* copy.
//! 3. **Grace.** Wait [`NodeConfig::gc_grace`]: the snapshot deadline plus two catalog syncs.
//!    A snapshot that found a page present *before* the watch began started before it, so it
//!    commits within the deadline, and its record is here by the end of the grace period —
//!    or it never commits (the initiator refuses to commit past the deadline).
//! 4. **Mark again.** Every live peer is asked for its catalog digest, and the revocations,
//!    tombstones and catalog of each whose digest differs are pulled (a majority of the
//!    members must agree or answer in full, or nothing is deleted), and records that arrived
//!    since the first mark are expanded too.
//! 5. **Sweep.** A walk over the store deletes, in throttled batches, what neither mark saw
//!    and no snapshot touched since the watch began ([`Store::delete_unwatched`] is exclusive with `have`, so no page reported
//!    present is deleted under a snapshot), then the page files are compacted so the space
//!    goes back. A surplus copy goes only if, at the sweep, every one of the page's owners
//!    in the view says it holds it durably (`Have`, then `Sync` under the incarnation it
//!    answered with): the owners keep it for as long as a live record references it, and a
//!    snapshot that found this copy present committed before the sweep (the grace period).
//!
//! A record whose manifest cannot be read (every owner of a chunk down) stops the cycle:
//! nothing is deleted on a guess. A restart forgets the watch and starts a new cycle.
//!
//! [`Store::watch_begin`]: crate::store::Store::watch_begin
//! [`Store::delete_unwatched`]: crate::store::Store::delete_unwatched
//! [`NodeConfig::gc_grace`]: crate::config::NodeConfig::gc_grace

use super::error::RestoreError;
use crate::node::Node;
use crate::store::{Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_dht::placement::{is_owner, owners, View};
use vmcsnap_dht::Member;
use vmcsnap_protocol::wire::{DataRequest, DataResponse, HAVE_HASHES_MAX};
use vmcsnap_protocol::{NodeId, PageHash, PAGE_SIZE};

/// Pages deleted per batch.
pub const DELETE_BATCH_PAGES: usize = 4096;
/// Pause after each batch, so that a sweep leaves the disk to snapshots and restores
/// (at most 16 MiB of pages freed per 100 ms).
pub const DELETE_BATCH_PAUSE: Duration = Duration::from_millis(100);

/// Why a cycle deleted nothing.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A snapshot's manifest could not be read.
    #[error("cannot read the pages of snapshot {name}: {source}; nothing deleted")]
    Unreadable {
        /// The snapshot.
        name: String,
        /// Why.
        source: RestoreError,
    },
    /// Too few members answered the catalog pull to be sure no new snapshot is missing.
    #[error("only {answered} of {members} members answered the catalog pull; nothing deleted")]
    TooFewMembers {
        /// Members that answered (this node included).
        answered: usize,
        /// Members known.
        members: usize,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task failed.
    #[error("{0}")]
    Internal(String),
}

/// What one cycle did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cycle {
    /// Commit records whose pages were marked.
    pub records: usize,
    /// Pages stored here that no record referenced at the first mark.
    pub candidates: u64,
    /// Pages deleted.
    pub deleted: u64,
}

/// Runs garbage collection for as long as the node runs: a cycle every
/// [`NodeConfig::gc_interval`], or as soon as a snapshot is deleted.
///
/// [`NodeConfig::gc_interval`]: crate::config::NodeConfig::gc_interval
pub async fn run(node: Arc<Node>) {
    loop {
        tokio::select! {
            _ = node.gc_wake.notified() => {}
            _ = tokio::time::sleep(node.config.gc_interval) => {}
        }
        let began = vmcsnap_protocol::units::unix_ms();
        match cycle(&node).await {
            Ok(c) => {
                tracing::info!(target: "vmcsnap::gc", records = c.records, candidates = c.candidates, deleted = c.deleted,
                    freed_mib = (c.deleted * PAGE_SIZE as u64) >> 20, "garbage collection done");
                node.store.gc_publish("idle", None);
                node.store.gc_cycle_done(began);
            }
            Err(e) => {
                tracing::warn!(target: "vmcsnap::gc", error = %e, "garbage collection stopped");
                node.store.gc_publish(&format!("stopped: {e}"), None);
            }
        }
    }
}

/// Ends the watch however the cycle ends.
struct Watch<'a>(&'a Store);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.0.watch_end();
    }
}

/// One cycle (see the module documentation).
pub async fn cycle(node: &Arc<Node>) -> Result<Cycle, GcError> {
    let store = node.store.clone();
    store.watch_begin();
    let _watch = Watch(&store);
    let started = tokio::time::Instant::now();
    store.gc_publish("marking", None);
    let mut marks = Marks::new(node, store.page_count());
    let records = mark(node, &mut marks).await?;
    let found = count_unreferenced(&store, &marks.live).await?;
    store.gc_publish("waiting out the grace period", Some(found * PAGE_SIZE as u64));
    tracing::debug!(target: "vmcsnap::gc", records, candidates = found, grace_s = node.config.gc_grace().as_secs(), "marked");
    if found == 0 {
        return Ok(Cycle { records, candidates: 0, deleted: 0 });
    }
    tokio::time::sleep_until(started + node.config.gc_grace()).await;

    store.gc_publish("marking again", None);
    let (answered, members) = node.sync_catalog_counted().await;
    if answered * 2 <= members {
        return Err(GcError::TooFewMembers { answered, members });
    }
    let records = records + mark(node, &mut marks).await?;

    // Sweep: walk the store; what neither mark saw and no snapshot touched since goes.
    store.gc_publish("sweeping", None);
    let mut deleted = 0;
    let mut after = None;
    loop {
        let s = store.clone();
        let batch = tokio::task::spawn_blocking(move || s.stored_hashes(after, DELETE_BATCH_PAGES)).await.map_err(|e| GcError::Internal(e.to_string()))??;
        let Some(&last) = batch.last() else { break };
        after = Some(last);
        // Referenced pages this node no longer owns go only once their owners hold them.
        let (surplus, mut doomed): (Vec<PageHash>, Vec<PageHash>) = batch.into_iter().filter(|h| !marks.live.contains(h)).partition(|h| marks.referenced.contains(h));
        doomed.extend(held_by_owners(node, marks.replicas_max, surplus).await);
        if doomed.is_empty() {
            continue;
        }
        let s = store.clone();
        deleted += tokio::task::spawn_blocking(move || s.delete_unwatched(&doomed)).await.map_err(|e| GcError::Internal(e.to_string()))??;
        tokio::time::sleep(DELETE_BATCH_PAUSE).await;
    }
    if deleted > 0 {
        store.gc_publish("compacting", None);
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.compact_pages()).await.map_err(|e| GcError::Internal(e.to_string()))??;
    }
    store.gc_publish("idle", Some(0));
    Ok(Cycle { records, candidates: found, deleted })
}

/// What deleting each of `records` alone would free: per record, the bytes (one copy) of the
/// pages (memory, manifest chunks, device state) that no other of `records` references.
/// Reads every record's manifest (from its owners). Counts by the first 8 bytes of each hash:
/// one hash-map entry (8-byte key, 4-byte index; not measured) per distinct page, and two distinct pages sharing a prefix (odds
/// about n²/2⁶⁵ for n pages) are counted as one shared page.
pub async fn unique_bytes(node: &Arc<Node>, records: &[&vmcsnap_protocol::manifest::CommitRecord], mut progress: super::Progress) -> Result<Vec<u64>, RestoreError> {
    /// Marks a page that two records or more reference.
    const SHARED: u32 = u32::MAX;
    let mut first: HashMap<u64, u32> = HashMap::new();
    progress.phase("reading manifests", records.len() as u64);
    for (i, r) in records.iter().enumerate() {
        super::fetch::referenced_pages(node, r, |h| {
            let key = u64::from_le_bytes(h.0[..8].try_into().unwrap_or_default());
            let seen = first.entry(key).or_insert(i as u32);
            if *seen != i as u32 {
                *seen = SHARED;
            }
        })
        .await?;
        progress.set(i as u64 + 1);
    }
    let mut pages = vec![0u64; records.len()];
    for &i in first.values().filter(|&&i| i != SHARED) {
        pages[i as usize] += 1;
    }
    Ok(pages.into_iter().map(|p| p * PAGE_SIZE as u64).collect())
}

/// Stored pages that `live` does not hold.
async fn count_unreferenced(store: &Arc<Store>, live: &Bloom) -> Result<u64, GcError> {
    let mut n = 0;
    let mut after = None;
    loop {
        let s = store.clone();
        let batch = tokio::task::spawn_blocking(move || s.stored_hashes(after, DELETE_BATCH_PAGES)).await.map_err(|e| GcError::Internal(e.to_string()))??;
        let Some(&last) = batch.last() else { return Ok(n) };
        after = Some(last);
        n += batch.iter().filter(|h| !live.contains(h)).count() as u64;
    }
}

/// The live pages of a cycle: a Bloom filter, so that a cycle holds about 10 bits per stored
/// page (at least 2 MiB) rather than every hash. A false positive only keeps a dead page
/// until a later cycle (each cycle draws a new seed, so not the same page again); a live page
/// is never missed.
pub struct Bloom {
    bits: Vec<u64>,
    seed: u64,
}

/// Bits of the filter per stored page, and hash functions (about 1% false positives).
const BLOOM_BITS_PER_PAGE: u64 = 10;
const BLOOM_HASHES: u64 = 7;
/// Smallest filter, in bits (2 MiB): small stores get no false positives to speak of.
const BLOOM_BITS_MIN: u64 = 1 << 24;

impl Bloom {
    /// A filter for about `pages` pages.
    pub fn new(pages: u64) -> Self {
        let bits = pages.saturating_mul(BLOOM_BITS_PER_PAGE).max(BLOOM_BITS_MIN);
        Self { bits: vec![0; bits.div_ceil(64) as usize], seed: rand::random() }
    }

    fn positions(&self, h: &PageHash) -> impl Iterator<Item = usize> + '_ {
        // Page hashes are uniform already: two words of the hash, mixed with the seed, make
        // the k positions (double hashing).
        let word = |i: usize| u64::from_le_bytes(h.0[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let (a, b) = (word(0) ^ self.seed, (word(1) ^ self.seed.rotate_left(32)) | 1);
        let m = self.bits.len() as u64 * 64;
        (0..BLOOM_HASHES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % m) as usize)
    }

    /// Adds a page.
    pub fn insert(&mut self, h: &PageHash) {
        let pos: Vec<usize> = self.positions(h).collect();
        for p in pos {
            self.bits[p / 64] |= 1 << (p % 64);
        }
    }

    /// Whether the page may have been added (never false for one that was).
    pub fn contains(&self, h: &PageHash) -> bool {
        self.positions(h).all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }
}

/// What a cycle's marks found.
struct Marks {
    /// Records marked (by id).
    ids: HashSet<PageHash>,
    /// Pages some record references and this node owns in the owner view: kept.
    live: Bloom,
    /// Pages some record references (owned here or not).
    referenced: Bloom,
    /// The owner view at the first mark, and this node's index in it.
    view: View,
    me: Option<usize>,
    /// The most replicas any marked record asked for.
    replicas_max: usize,
}

impl Marks {
    fn new(node: &Node, pages: u64) -> Self {
        let view = node.owner_view();
        let me = view.index_of(&node.id);
        Self { ids: HashSet::new(), live: Bloom::new(pages), referenced: Bloom::new(pages), view, me, replicas_max: 1 }
    }
}

/// Adds the pages of every record not marked yet (by record id) to the marks, keeping only
/// those this store may hold. Returns how many records were marked.
async fn mark(node: &Arc<Node>, marks: &mut Marks) -> Result<usize, GcError> {
    let s = node.store.clone();
    let records = tokio::task::spawn_blocking(move || s.catalog_all()).await.map_err(|e| GcError::Internal(e.to_string()))??;
    let mut n = 0;
    for r in records {
        let id = r.id().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if !marks.ids.insert(id) {
            continue;
        }
        let store = &node.store;
        let replicas = r.record.replicas as usize;
        marks.replicas_max = marks.replicas_max.max(replicas);
        let Marks { live, referenced, view, me, .. } = marks;
        super::fetch::referenced_pages(node, &r.record, |h| {
            if store.may_hold(&h) {
                referenced.insert(&h);
                if me.is_none_or(|me| is_owner(view, &h, replicas, me)) {
                    live.insert(&h);
                }
            }
        })
        .await
        .map_err(|source| GcError::Unreadable { name: r.record.name.clone(), source })?;
        n += 1;
    }
    Ok(n)
}

/// Those of `surplus` (referenced pages this node held past their first owners) that may go:
/// this node is not among a page's first `replicas` owners in today's view, and every one of
/// those owners says it holds the page durably (`Have`, then `Sync` under the incarnation it
/// answered with). An owner that is down or restarted confirms nothing: the copy stays.
async fn held_by_owners(node: &Arc<Node>, replicas: usize, surplus: Vec<PageHash>) -> Vec<PageHash> {
    if surplus.is_empty() {
        return surplus;
    }
    let view = node.owner_view();
    let Some(me) = view.index_of(&node.id) else { return Vec::new() };
    let members: HashMap<NodeId, Member> = node.members().into_iter().map(|m| (m.id, m)).collect();
    let mut by_owner: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut needed = vec![0usize; surplus.len()];
    for (i, h) in surplus.iter().enumerate() {
        let o = owners(&view, h, replicas);
        if o.contains(&me) {
            continue; // owned here again: kept
        }
        needed[i] = o.len();
        for o in o {
            by_owner.entry(o).or_default().push(i);
        }
    }
    let mut confirmed = vec![0usize; surplus.len()];
    for (o, items) in by_owner {
        let Some(m) = members.get(&view.members()[o]).filter(|m| m.alive) else { continue };
        let hashes: Vec<PageHash> = items.iter().map(|&i| surplus[i]).collect();
        match durably_held(node, m, &hashes).await {
            Ok(held) => items.iter().zip(held).filter(|(_, h)| *h).for_each(|(&i, _)| confirmed[i] += 1),
            Err(e) => tracing::debug!(target: "vmcsnap::gc", owner = %m.id.short(), error = %e, "owner did not confirm its copies; old copies kept"),
        }
    }
    surplus.into_iter().enumerate().filter(|&(i, _)| needed[i] > 0 && confirmed[i] == needed[i]).map(|(_, h)| h).collect()
}

/// Which of `hashes` `member` holds durably.
async fn durably_held(node: &Arc<Node>, member: &Member, hashes: &[PageHash]) -> Result<Vec<bool>, String> {
    let mut incarnation = None;
    let mut held = vec![true; hashes.len()];
    for (n, batch) in hashes.chunks(HAVE_HASHES_MAX).enumerate() {
        match node.call(member, DataRequest::Have { hashes: batch.to_vec() }).await.map_err(|e| e.to_string())? {
            DataResponse::Have { missing, incarnation: i } if *incarnation.get_or_insert(i) == i => {
                for m in missing {
                    if let Some(x) = held.get_mut(n * HAVE_HASHES_MAX + m as usize) {
                        *x = false;
                    }
                }
            }
            DataResponse::Have { .. } => return Err("restarted while asked".into()),
            _ => return Err("answered with the wrong message".into()),
        }
    }
    let Some(incarnation) = incarnation else { return Ok(held) };
    match node.call(member, DataRequest::Sync { incarnation }).await.map_err(|e| e.to_string())? {
        DataResponse::Synced => Ok(held),
        _ => Err("did not sync".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> PageHash {
        vmcsnap_protocol::hash_page(&[i.to_le_bytes().as_slice(), &[0u8; PAGE_SIZE - 8]].concat())
    }

    #[test]
    fn the_bloom_filter_never_misses_a_live_page_and_rarely_keeps_a_dead_one() {
        // A large store: 10 bits a page, about 1% false positives.
        let n = 2_000_000u64;
        let mut live = Bloom::new(n);
        for i in 0..n / 10 {
            live.insert(&h(i));
        }
        assert!((0..n / 10).all(|i| live.contains(&h(i))), "a live page was missed");
        // Only a tenth of the capacity is used here, so false positives are far below 1%.
        let fp = (n..n + 100_000).filter(|&i| live.contains(&h(i))).count();
        assert!(fp < 100, "{fp} false positives in 100000");
        // Another cycle draws another seed: not the same false positives.
        let other = Bloom::new(n);
        assert_ne!(live.seed, other.seed);
    }
}

//! Garbage collection: pages that no live snapshot references are deleted on every owner, and
//! their space goes back to the file system.
//!
//! Each owner collects its own store, on its own, in cycles:
//!
//! 1. **Watch.** [`Store::watch_begin`]: from now on every page a `Have` finds present or a
//!    `Put` stores is remembered, and no deletion touches it.
//! 2. **Mark.** Every commit record in the catalog is expanded (manifest chunks, memory pages,
//!    device state); what this store holds and no record references is a candidate.
//! 3. **Grace.** Wait [`NodeConfig::gc_grace`]: the snapshot deadline plus two catalog syncs.
//!    A snapshot that found a page present *before* the watch began started before it, so it
//!    commits within the deadline, and its record is here by the end of the grace period —
//!    or it never commits (the initiator refuses to commit past the deadline).
//! 4. **Mark again.** The catalog and the tombstones are pulled from every live peer (a
//!    majority of the members must answer, or nothing is deleted), and records that arrived
//!    since the first mark are expanded too.
//! 5. **Sweep.** Candidates still unreferenced and not watched are deleted in throttled
//!    batches ([`Store::delete_unwatched`] is exclusive with `have`, so no page reported
//!    present is deleted under a snapshot), then the page files are compacted so the space
//!    goes back.
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
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_protocol::{PageHash, PAGE_SIZE};

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
        match cycle(&node).await {
            Ok(c) => {
                tracing::info!(target: "vmcsnap::gc", records = c.records, candidates = c.candidates, deleted = c.deleted,
                    freed_mib = c.deleted * PAGE_SIZE as u64 >> 20, "garbage collection done");
                node.store.gc_publish("idle", None);
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
    let mut marked = HashSet::new();
    let mut live = HashSet::new();
    let records = mark(node, &mut marked, &mut live).await?;
    let s = store.clone();
    let stored = tokio::task::spawn_blocking(move || s.stored_hashes()).await.map_err(|e| GcError::Internal(e.to_string()))??;
    let mut candidates: Vec<PageHash> = stored.into_iter().filter(|h| !live.contains(h)).collect();
    let found = candidates.len() as u64;
    store.gc_publish("waiting out the grace period", Some(found * PAGE_SIZE as u64));
    tracing::debug!(target: "vmcsnap::gc", records, candidates = found, grace_s = node.config.gc_grace().as_secs(), "marked");
    if candidates.is_empty() {
        return Ok(Cycle { records, candidates: 0, deleted: 0 });
    }
    tokio::time::sleep_until(started + node.config.gc_grace()).await;

    store.gc_publish("marking again", None);
    node.sync_tombstones().await;
    let (answered, members) = node.sync_catalog_counted().await;
    if answered * 2 <= members {
        return Err(GcError::TooFewMembers { answered, members });
    }
    let records = records + mark(node, &mut marked, &mut live).await?;
    candidates.retain(|h| !live.contains(h));

    store.gc_publish("sweeping", None);
    let mut deleted = 0;
    for batch in candidates.chunks(DELETE_BATCH_PAGES) {
        let (s, batch) = (store.clone(), batch.to_vec());
        deleted += tokio::task::spawn_blocking(move || s.delete_unwatched(&batch)).await.map_err(|e| GcError::Internal(e.to_string()))??;
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

/// Adds the pages of every record not marked yet (by record id) to `live`, keeping only those
/// this store may hold. Returns how many records were marked.
async fn mark(node: &Arc<Node>, marked: &mut HashSet<PageHash>, live: &mut HashSet<PageHash>) -> Result<usize, GcError> {
    let s = node.store.clone();
    let records = tokio::task::spawn_blocking(move || s.catalog_all()).await.map_err(|e| GcError::Internal(e.to_string()))??;
    let mut n = 0;
    for r in records {
        let id = r.id().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if !marked.insert(id) {
            continue;
        }
        let store = &node.store;
        super::restore::referenced_pages(node, &r.record, |h| {
            if store.may_hold(&h) {
                live.insert(h);
            }
        })
        .await
        .map_err(|source| GcError::Unreadable { name: r.record.name.clone(), source })?;
        n += 1;
    }
    Ok(n)
}

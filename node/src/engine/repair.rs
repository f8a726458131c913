//! Repair and rebalance: every committed page on its first `replicas` owners in the owner view.
//!
//! The owner view ([`Node::owner_view`]) is every member that is not gone (removed, or down
//! longer than `--repair-after`). A snapshot placed its pages over the members of its moment;
//! when the view changes (a member removed or long gone, one joined, one that was down during
//! the snapshot back) some pages have new owners. Each node *pulls* what it now owns and lacks:
//! for every snapshot not done for this view yet, it lists the snapshot's pages, keeps those
//! whose first `replicas` owners in the view include itself, fetches the ones it lacks from wherever
//! they are (this node's ranking over placement and members, as a restore looks; every page
//! verified against its hash), stores them and syncs. Each lost or moved copy is fetched once,
//! by the one node that needs it.
//!
//! The old copies, on members that are no longer among a page's first owners, are dropped by
//! garbage collection, and only once every owner has confirmed that it holds the page durably
//! (see [`super::gc`]).
//!
//! A snapshot done for a view is remembered (meta key `rebalanced/` + record id, the view's
//! digest as value; every mark goes when the view changes), so a cycle with nothing to do
//! reads no manifest, and a restart resumes with the snapshots not done yet. Fetches are paced at `--repair-rate`. A node whose disk is
//! nearly full pulls nothing (its share stays where it is, counted as surplus nowhere).

use super::error::SnapshotError;
use crate::node::Node;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_dht::placement::{is_owner, View};
use vmcsnap_protocol::manifest::SignedRecord;
use vmcsnap_protocol::{PageHash, PAGE_SIZE};

/// Pages fetched as one unit (16 MiB).
pub const PULL_BATCH_PAGES: usize = 4096;
/// Meta-key prefix of the per-snapshot "done for this view" marks.
const DONE_PREFIX: &[u8] = b"rebalanced/";
/// Meta key of the view the marks were made under.
const VIEW_KEY: &[u8] = b"rebalance-view";

/// What one cycle did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cycle {
    /// Snapshots whose pages were looked at (not done for this view yet).
    pub records: usize,
    /// Copies fetched and stored here.
    pub copies: u64,
    /// Bytes fetched doing it.
    pub bytes: u64,
    /// Snapshots left for a later cycle (a page no member could serve, a manifest unreadable).
    pub left: usize,
}

/// A digest of a view's members (which are sorted).
pub fn view_digest(view: &View) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for id in view.members() {
        h.update(&id.0);
    }
    *h.finalize().as_bytes()
}

/// How long after its start a node waits, before each cycle, for its owner view to stay still
/// for [`VIEW_QUIET`]: a node that has just joined meets the members one by one, and a cycle
/// on a view that lacks some would fetch copies it gives back once it knows them all.
pub const NEW_NODE_SETTLING: Duration = Duration::from_secs(30);
/// See [`NEW_NODE_SETTLING`].
pub const VIEW_QUIET: Duration = Duration::from_secs(3);

/// Waits until the owner view has not changed for [`VIEW_QUIET`] (at most ten times that: a
/// view that keeps changing does not hold repair back for ever).
async fn view_settled(node: &Node) {
    let mut seen = view_digest(&node.owner_view());
    for _ in 0..10 {
        tokio::time::sleep(VIEW_QUIET).await;
        let now = view_digest(&node.owner_view());
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Repairs and rebalances for as long as the node runs: a cycle every `--repair-interval`,
/// when woken (a removal, newly learned snapshots), and when the owner view changes.
pub async fn run(node: Arc<Node>) {
    let started = tokio::time::Instant::now();
    let mut members = node.subscribe_members();
    let mut last = None;
    loop {
        tokio::select! {
            _ = node.repair_wake.notified() => {}
            _ = tokio::time::sleep(node.config.repair_interval) => {}
            Ok(()) = members.changed() => {
                // Liveness alone changes no owner; a join, a removal or a member gone does.
                if last == Some(view_digest(&node.owner_view())) {
                    continue;
                }
            }
        }
        if started.elapsed() < NEW_NODE_SETTLING {
            view_settled(&node).await;
        }
        last = Some(view_digest(&node.owner_view()));
        let began = vmcsnap_protocol::units::unix_ms();
        match cycle(&node).await {
            Ok(c) => {
                if c.copies > 0 || c.left > 0 {
                    tracing::info!(target: "vmcsnap::repair", records = c.records, copies = c.copies, mib = c.bytes >> 20, left = c.left, "repair and rebalance done");
                }
                node.store.repair_publish(|r| {
                    r.state = if c.left > 0 { format!("{} snapshot(s) left for the next cycle", c.left) } else { "idle".into() };
                    r.copies_made += c.copies;
                    r.bytes_sent += c.bytes;
                    if c.left == 0 && !node.store.is_full() {
                        r.done_began_unix_ms = began;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(target: "vmcsnap::repair", error = %e, "repair stopped; it runs again at the next interval");
                node.store.repair_publish(|r| r.state = format!("stopped: {e}"));
            }
        }
    }
}

/// One cycle over every snapshot in the catalog.
pub async fn cycle(node: &Arc<Node>) -> Result<Cycle, SnapshotError> {
    let view = node.owner_view();
    let digest = view_digest(&view);
    let mut c = Cycle::default();
    let Some(me) = view.index_of(&node.id) else { return Ok(c) };
    if node.store.is_full() {
        return Ok(c);
    }
    let blocking = |e: tokio::task::JoinError| SnapshotError::Internal(e.to_string());
    let s = node.store.clone();
    let todo = tokio::task::spawn_blocking(move || not_done(&s, &digest)).await.map_err(blocking)??;
    for (key, r) in todo {
        let rec = &r.record;
        c.records += 1;
        node.store.repair_publish(|s| s.state = format!("repairing snapshot {}", rec.name));
        match pull(node, rec, &view, me, &mut c).await {
            Ok(()) => {
                let s = node.store.clone();
                tokio::task::spawn_blocking(move || s.meta_put(&key, &digest)).await.map_err(blocking)??;
            }
            Err(e) => {
                tracing::warn!(target: "vmcsnap::repair", snapshot = %rec.name, error = %e, "cannot bring this snapshot's pages here yet; tried again next cycle");
                c.left += 1;
            }
        }
    }
    Ok(c)
}

/// The snapshots not done for the view with `digest` yet, each with its mark's key. A mark
/// holds only while the view it was made under lasts (after views A, B and A again, a page
/// this node dropped under B must come back), so every mark goes when the view changes; marks
/// of snapshots deleted since go too.
fn not_done(store: &crate::store::Store, digest: &[u8; 32]) -> Result<Vec<(Vec<u8>, SignedRecord)>, SnapshotError> {
    let records = store.catalog_all()?;
    let view_changed = store.meta_get(VIEW_KEY)?.as_deref() != Some(&digest[..]);
    let mut known = HashSet::new();
    let mut todo = Vec::new();
    for r in records {
        let id = r.id().map_err(|e| SnapshotError::Internal(e.to_string()))?;
        known.insert(id);
        let key = [DONE_PREFIX, &id.0].concat();
        if view_changed || store.meta_get(&key)?.as_deref() != Some(&digest[..]) {
            todo.push((key, r));
        }
    }
    for (key, _) in store.meta_prefix(DONE_PREFIX)? {
        let id = key.get(DONE_PREFIX.len()..).and_then(|b| <[u8; 32]>::try_from(b).ok()).map(PageHash);
        if view_changed || id.is_none_or(|id| !known.contains(&id)) {
            store.meta_delete(&key)?;
        }
    }
    store.meta_put(VIEW_KEY, digest)?;
    Ok(todo)
}

/// Fetches the pages of `rec` that this node (index `me` in `view`) owns and lacks.
async fn pull(node: &Arc<Node>, rec: &vmcsnap_protocol::manifest::CommitRecord, view: &View, me: usize, c: &mut Cycle) -> Result<(), SnapshotError> {
    let err = |e: super::error::RestoreError| SnapshotError::Internal(e.to_string());
    let pages: HashSet<PageHash> = super::fetch::pages_by_vm(node, rec).await.map_err(err)?.into_iter().flatten().collect();
    let mine: Vec<PageHash> = pages.into_iter().filter(|h| is_owner(view, h, rec.replicas as usize, me)).collect();
    let rate = node.config.repair_rate.max(PAGE_SIZE as u64);
    for batch in mine.chunks(PULL_BATCH_PAGES) {
        let s = node.store.clone();
        let b = batch.to_vec();
        let held = tokio::task::spawn_blocking(move || s.have(&b)).await.map_err(|e| SnapshotError::Internal(e.to_string()))??;
        let lacking: Vec<PageHash> = batch.iter().zip(held).filter(|(_, h)| !h).map(|(h, _)| *h).collect();
        if lacking.is_empty() {
            continue;
        }
        let t0 = tokio::time::Instant::now();
        let got = super::fetch::fetch_pages(node, rec, lacking).await.map_err(err)?;
        let n = got.len() as u64;
        let s = node.store.clone();
        tokio::task::spawn_blocking(move || {
            let pages: Vec<(PageHash, &[u8])> = got.iter().map(|(h, p)| (*h, &p[..])).collect();
            // Durable, or refused if the store was reopened in between (the pages may be gone).
            let (_, _, incarnation) = s.put_own_at(&pages)?;
            s.sync_incarnation(incarnation)
        })
        .await
        .map_err(|e| SnapshotError::Internal(e.to_string()))??;
        c.copies += n;
        c.bytes += n * PAGE_SIZE as u64;
        // At most `rate` bytes a second.
        tokio::time::sleep_until(t0 + Duration::from_secs_f64((n * PAGE_SIZE as u64) as f64 / rate as f64)).await;
    }
    Ok(())
}

//! Repair: when a member is removed (`cluster remove`) or has been down longer than
//! `--repair-after`, the pages it held for committed snapshots are copied from the surviving
//! copies to new owners, until every page has `replicas` copies again.
//!
//! Every node repairs from what it holds, on its own, every `--repair-interval` (and at once
//! when it learns of a removal). For each snapshot whose placement names a gone member, and
//! each page of it this node holds, the page's owners are re-ranked over the placement
//! without the gone members (the same rendezvous ranking, so the survivors keep their pages
//! and the new owner is the next-ranked member); each of the first `replicas` that lacks the
//! page gets it (`Have`, `Put`, then `Sync` under the incarnation it answered with). A restore
//! looks for a page past its first `replicas` owners, in the same ranking, so it finds the new
//! copies. Pages it cannot repair (every copy gone) are counted and logged.

use super::error::SnapshotError;
use super::upload::owner_error;
use crate::node::Node;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use vmcsnap_dht::placement::{owners, View};
use vmcsnap_dht::Member;
use vmcsnap_protocol::wire::{DataRequest, DataResponse, PagePut, HAVE_HASHES_MAX, PUT_PAGES_MAX};
use vmcsnap_protocol::{NodeId, PageHash};

/// What one cycle did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cycle {
    /// Snapshots that had a gone member in their placement.
    pub records: usize,
    /// Copies made on new owners.
    pub copies: u64,
    /// Bytes sent doing it.
    pub bytes: u64,
}

/// Repairs for as long as the node runs.
pub async fn run(node: Arc<Node>) {
    loop {
        tokio::select! {
            _ = node.repair_wake.notified() => {}
            _ = tokio::time::sleep(node.config.repair_interval) => {}
        }
        match cycle(&node).await {
            Ok(c) if c.copies > 0 => {
                tracing::info!(target: "vmcsnap::repair", records = c.records, copies = c.copies, mib = c.bytes >> 20, "repair done: lost copies made again");
                node.store.repair_publish(|r| {
                    r.state = "idle".into();
                    r.copies_made += c.copies;
                    r.bytes_sent += c.bytes;
                });
            }
            Ok(_) => node.store.repair_publish(|r| r.state = "idle".into()),
            Err(e) => {
                tracing::warn!(target: "vmcsnap::repair", error = %e, "repair stopped; it runs again at the next interval");
                node.store.repair_publish(|r| r.state = format!("stopped: {e}"));
            }
        }
    }
}

/// One cycle over every snapshot in the catalog.
pub async fn cycle(node: &Arc<Node>) -> Result<Cycle, SnapshotError> {
    let s = node.store.clone();
    let records = tokio::task::spawn_blocking(move || s.catalog_all()).await.map_err(|e| SnapshotError::Internal(e.to_string()))??;
    let members: HashMap<NodeId, Member> = node.members().into_iter().map(|m| (m.id, m)).collect();
    let gone = |id: &NodeId| node.is_gone(id);
    let mut c = Cycle::default();
    for r in records {
        let rec = &r.record;
        if !rec.placement.iter().any(gone) {
            continue;
        }
        c.records += 1;
        node.store.repair_publish(|s| s.state = format!("repairing snapshot {}", rec.name));
        let view = View::new(rec.placement.clone());
        let pages: HashSet<PageHash> = match super::restore::pages_by_vm(node, rec).await {
            Ok(p) => p.into_iter().flatten().collect(),
            Err(e) => {
                tracing::warn!(target: "vmcsnap::repair", snapshot = %rec.name, error = %e, "cannot list the snapshot's pages; skipped");
                continue;
            }
        };
        let pages: Vec<PageHash> = pages.into_iter().collect();
        let s = node.store.clone();
        let p = pages.clone();
        let held = tokio::task::spawn_blocking(move || s.have(&p)).await.map_err(|e| SnapshotError::Internal(e.to_string()))??;
        // Each page this node holds, to each of its first `replicas` surviving owners.
        let mut to: HashMap<NodeId, Vec<PageHash>> = HashMap::new();
        for (h, _) in pages.iter().zip(held).filter(|(_, held)| *held) {
            let ranked = owners(&view, h, view.members().len());
            for id in ranked.into_iter().map(|o| view.members()[o]).filter(|id| !gone(id)).take(rec.replicas as usize) {
                if id != node.id {
                    to.entry(id).or_default().push(*h);
                }
            }
        }
        for (id, hashes) in to {
            let Some(m) = members.get(&id).filter(|m| m.alive) else { continue };
            let (copies, bytes) = send_missing(node, m, &hashes).await?;
            c.copies += copies;
            c.bytes += bytes;
        }
    }
    Ok(c)
}

/// Gives `member` those of `hashes` it lacks, durably. Returns (copies, bytes).
async fn send_missing(node: &Arc<Node>, member: &Member, hashes: &[PageHash]) -> Result<(u64, u64), SnapshotError> {
    let mut incarnation = None;
    let (mut copies, mut bytes) = (0, 0);
    for batch in hashes.chunks(HAVE_HASHES_MAX) {
        let missing = match node.call(member, DataRequest::Have { hashes: batch.to_vec() }).await.map_err(|e| owner_error(member, e))? {
            DataResponse::Have { missing, incarnation: i } => {
                incarnation.get_or_insert(i);
                missing
            }
            _ => return Err(SnapshotError::Protocol(member.id.short())),
        };
        let want: Vec<PageHash> = missing.iter().filter_map(|&i| batch.get(i as usize).copied()).collect();
        for chunk in want.chunks(PUT_PAGES_MAX) {
            let s = node.store.clone();
            let c = chunk.to_vec();
            let data = tokio::task::spawn_blocking(move || s.get(&c)).await.map_err(|e| SnapshotError::Internal(e.to_string()))??;
            let pages: Vec<PagePut> = chunk.iter().zip(data).filter_map(|(h, d)| d.map(|d| PagePut { hash: *h, data: d.into() })).collect();
            let n = pages.len() as u64;
            match node.call(member, DataRequest::Put { pages }).await.map_err(|e| owner_error(member, e))? {
                DataResponse::Put { incarnation: i, .. } if Some(i) == incarnation => {}
                DataResponse::Put { .. } => return Err(SnapshotError::Protocol(format!("{} restarted during repair", member.id.short()))),
                _ => return Err(SnapshotError::Protocol(member.id.short())),
            }
            copies += n;
            bytes += n * vmcsnap_protocol::PAGE_SIZE as u64;
        }
    }
    if copies > 0 {
        if let Some(incarnation) = incarnation {
            match node.call(member, DataRequest::Sync { incarnation }).await.map_err(|e| owner_error(member, e))? {
                DataResponse::Synced => {}
                _ => return Err(SnapshotError::Protocol(member.id.short())),
            }
        }
    }
    Ok((copies, bytes))
}

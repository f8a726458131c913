//! The scrubber: reads back every page this node stores, at a bounded rate, checks each
//! against its hash, and repairs a damaged copy from another member that holds a good one.
//!
//! A pass starts every [`NodeConfig::scrub_interval`] and reads at most
//! [`NodeConfig::scrub_rate`] bytes a second. A damaged copy is never served meanwhile
//! (every read is checked: `Store::get` answers it as absent, so restores take another
//! replica). If no member has a good copy, the damaged one is dropped, so that `Have` stops
//! claiming it and the next snapshot that needs the page stores it again; the error is
//! logged. Figures are in `cluster status` (`scrub` in its JSON).
//!
//! [`NodeConfig::scrub_interval`]: crate::config::NodeConfig::scrub_interval
//! [`NodeConfig::scrub_rate`]: crate::config::NodeConfig::scrub_rate

use crate::node::Node;
use crate::store::{Read, StoreError};
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_protocol::wire::{DataRequest, DataResponse};
use vmcsnap_protocol::{hash_page, PageHash, PAGE_SIZE};

/// Pages read per step.
pub const SCRUB_BATCH_PAGES: usize = 256;

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Pages read and checked.
    pub checked: u64,
    /// Damaged copies found.
    pub corrupt: u64,
    /// Of those, repaired from a replica.
    pub repaired: u64,
}

/// Scrubs for as long as the node runs.
pub async fn run(node: Arc<Node>) {
    loop {
        tokio::time::sleep(node.config.scrub_interval).await;
        match pass(&node).await {
            Ok(p) => {
                let level_error = p.corrupt > p.repaired;
                if p.corrupt > 0 {
                    tracing::warn!(target: "vmcsnap::scrub", checked = p.checked, corrupt = p.corrupt, repaired = p.repaired, "scrub found damaged pages");
                } else {
                    tracing::info!(target: "vmcsnap::scrub", checked = p.checked, "scrub pass clean");
                }
                let now = vmcsnap_protocol::units::unix_ms();
                node.store.scrub_publish(|s| {
                    s.state = if level_error { "idle; some damaged pages had no good replica (see the log)".into() } else { "idle".into() };
                    s.last_pass_unix_ms = now;
                });
            }
            Err(e) => {
                tracing::warn!(target: "vmcsnap::scrub", error = %e, "scrub pass stopped");
                node.store.scrub_publish(|s| s.state = format!("stopped: {e}"));
            }
        }
    }
}

/// One pass over every stored page.
pub async fn pass(node: &Arc<Node>) -> Result<Pass, StoreError> {
    let store = node.store.clone();
    store.scrub_publish(|s| s.state = "scrubbing".into());
    let rate = node.config.scrub_rate.max(PAGE_SIZE as u64);
    let mut p = Pass::default();
    let mut after = None;
    loop {
        let s = store.clone();
        let batch = tokio::task::spawn_blocking(move || s.stored_hashes(after, SCRUB_BATCH_PAGES)).await.map_err(|e| StoreError::Corrupt(e.to_string()))??;
        let Some(&last) = batch.last() else { break };
        after = Some(last);
        let batch = batch.as_slice();
        let t0 = tokio::time::Instant::now();
        let (s, b) = (store.clone(), batch.to_vec());
        let reads = tokio::task::spawn_blocking(move || s.read(&b)).await.map_err(|e| StoreError::Corrupt(e.to_string()))??;
        for (h, r) in batch.iter().zip(reads) {
            if r != Read::Corrupt {
                continue;
            }
            p.corrupt += 1;
            store.scrub_publish(|s| s.corrupt_found += 1);
            if repair(node, *h).await {
                p.repaired += 1;
                store.scrub_publish(|s| s.repaired += 1);
                tracing::warn!(target: "vmcsnap::scrub", page = %h, "damaged page repaired from a replica");
            } else {
                let s = store.clone();
                let h = *h;
                let _ = tokio::task::spawn_blocking(move || s.drop_corrupt(h)).await;
                tracing::error!(target: "vmcsnap::scrub", page = %h, "damaged page has no good copy on any live member; dropped here (the next snapshot that needs it stores it again)");
            }
        }
        p.checked += batch.len() as u64;
        store.scrub_publish(|s| s.pages_checked += batch.len() as u64);
        // At most `rate` bytes a second.
        let budget = Duration::from_secs_f64((batch.len() * PAGE_SIZE) as f64 / rate as f64);
        tokio::time::sleep_until(t0 + budget).await;
    }
    Ok(p)
}

/// Fetches a good copy of `hash` from any live member and writes it over the damaged one.
async fn repair(node: &Arc<Node>, hash: PageHash) -> bool {
    for peer in node.alive_peers() {
        let Ok(DataResponse::Pages { pages }) = node.call(&peer, DataRequest::Get { hashes: vec![hash] }).await else { continue };
        let Some(Some(data)) = pages.pages().and_then(|p| p.into_iter().next()).map(|p| p.map(<[u8]>::to_vec)) else { continue };
        if hash_page(&data) != hash {
            continue;
        }
        let s = node.store.clone();
        if let Ok(Ok(())) = tokio::task::spawn_blocking(move || s.repair(hash, &data)).await {
            return true;
        }
    }
    false
}

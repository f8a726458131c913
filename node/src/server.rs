//! The data plane's serving side: accepts member connections and answers requests.
//!
//! Each connection is checked once: the TLS certificate proves a node key, and that key must
//! belong to a current member, or the connection is closed with [`CLOSE_NOT_MEMBER`]. (The
//! ALPN, [`vmcsnap_protocol::wire::DATA_ALPN`], already kept out peers of another version.)
//! Each stream carries one request: store requests go to [`crate::answer`] on the blocking
//! pool; a cut, the VM list, forgetting a VM and a restore go to the engines.

use crate::answer::{answer, Asker};
use crate::net::{read_frame, write_frame, FrameError, CLOSE_NOT_MEMBER, CLOSE_TOO_MANY};
use crate::node::Node;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::Instrument;
use vmcsnap_protocol::wire::{DataRequest, DataResponse, RemoteErrorKind};
use vmcsnap_protocol::NodeId;

/// How long a peer has to send a request's frame once it opened a stream.
pub const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a connection from an unknown peer waits for the membership layer to learn of it
/// before it is refused (a peer that just joined may not be known yet).
pub const NEW_PEER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Connections open at once, from anyone (each holds at most one receive window of data).
pub const CONNECTIONS_MAX: usize = 512;
/// Connections one peer may hold at once (a node uses one; a restarted node's old one lingers
/// until it times out).
pub const CONNECTIONS_PER_PEER_MAX: usize = 4;
/// Restores other members asked this host for that may run at once.
pub const REMOTE_RESTORES_MAX: usize = 8;

/// Counts open connections, in all and per peer.
#[derive(Default)]
struct Slots {
    all: usize,
    per_peer: HashMap<NodeId, usize>,
}

/// One connection's place in [`Slots`], given back when dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    peer: Option<NodeId>,
}

impl Slot {
    fn take(slots: &Arc<Mutex<Slots>>) -> Option<Slot> {
        let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
        if s.all >= CONNECTIONS_MAX {
            return None;
        }
        s.all += 1;
        Some(Slot { slots: slots.clone(), peer: None })
    }

    /// Counts the connection as `peer`'s; false if that peer holds too many already.
    fn assign(&mut self, peer: NodeId) -> bool {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.per_peer.entry(peer).or_default();
        if *n >= CONNECTIONS_PER_PEER_MAX {
            return false;
        }
        *n += 1;
        self.peer = Some(peer);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.all -= 1;
        if let Some(p) = self.peer {
            if let Some(n) = s.per_peer.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    s.per_peer.remove(&p);
                }
            }
        }
    }
}

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(node: Arc<Node>, endpoint: quinn::Endpoint) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let restores = Arc::new(tokio::sync::Semaphore::new(REMOTE_RESTORES_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Some(mut slot) = Slot::take(&slots) else {
            tracing::warn!(target: "vmcsnap::net", addr = %incoming.remote_address(), "refusing a connection: {CONNECTIONS_MAX} open already");
            incoming.refuse();
            continue;
        };
        let (node, restores) = (node.clone(), restores.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(target: "vmcsnap::net", error = %e, "handshake failed");
                    return;
                }
            };
            let Some(peer) = crate::net::peer_node_id(&conn) else {
                conn.close(CLOSE_NOT_MEMBER.into(), b"no node identity");
                return;
            };
            // A peer that just joined may be a member we have not heard of yet: give the
            // membership layer a moment before refusing.
            let t0 = std::time::Instant::now();
            let mut known = node.is_member(&peer);
            while !known && t0.elapsed() < NEW_PEER_GRACE && !node.trust.is_revoked(&peer) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                known = node.is_member(&peer);
            }
            if !known {
                tracing::warn!(target: "vmcsnap::net", peer = %peer, addr = %conn.remote_address(), "refusing a connection from a non-member");
                conn.close(CLOSE_NOT_MEMBER.into(), b"not a member");
                return;
            }
            if !slot.assign(peer) {
                tracing::warn!(target: "vmcsnap::net", peer = %peer.short(), "refusing a connection: the peer holds {CONNECTIONS_PER_PEER_MAX} already");
                conn.close(CLOSE_TOO_MANY.into(), b"too many connections");
                return;
            }
            let span = tracing::debug_span!("conn", peer = %peer.short());
            serve_connection(node, conn, peer, restores).instrument(span).await;
            drop(slot);
        });
    }
}

async fn serve_connection(node: Arc<Node>, conn: quinn::Connection, peer: NodeId, restores: Arc<tokio::sync::Semaphore>) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        // A member removed since the connection was made is cut off here.
        if !node.is_member(&peer) {
            tracing::warn!(target: "vmcsnap::net", peer = %peer.short(), "closing the connection of a peer that is no longer a member");
            conn.close(CLOSE_NOT_MEMBER.into(), b"not a member");
            return;
        }
        let (node, restores) = (node.clone(), restores.clone());
        tokio::spawn(async move {
            // A request must arrive whole within the request time: a peer cannot hold a
            // stream (and its task) open by sending nothing.
            let req = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame::<DataRequest>(&mut recv)).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(target: "vmcsnap::net", peer = %peer.short(), "request not received in time; stream dropped");
                    return;
                }
            };
            let resp = match req {
                Ok(DataRequest::Cut(begin)) => {
                    tracing::info!(target: "vmcsnap::snapshot", snapshot = %begin.name, from = %peer.short(), vms = begin.vms.len(), "taking part in a cluster snapshot");
                    crate::engine::cut::transport::serve(node, begin, send, recv).await;
                    return;
                }
                Ok(req @ DataRequest::RestoreVm { .. }) => match restores.try_acquire_owned() {
                    Ok(_permit) => dispatch(node, req, peer).await,
                    Err(_) => error(RemoteErrorKind::Failed, format!("this host runs {REMOTE_RESTORES_MAX} restores already; try again later")),
                },
                Ok(req) => dispatch(node, req, peer).await,
                Err(FrameError::Codec(e)) => {
                    tracing::warn!(target: "vmcsnap::net", peer = %peer.short(), error = %e, "bad request");
                    error(RemoteErrorKind::BadRequest, e.to_string())
                }
                Err(FrameError::Io(_)) => return,
            };
            let _ = write_frame(&mut send, &resp).await;
        });
    }
}

/// Answers one request from `peer` (a cut is served on its stream instead).
async fn dispatch(node: Arc<Node>, req: DataRequest, peer: NodeId) -> DataResponse {
    match req {
        // The record is kept, then handed on to the members `relay` names (a broadcast tree).
        DataRequest::Commit { record, relay } => {
            if relay.len() > vmcsnap_protocol::wire::RELAY_MAX {
                return error(RemoteErrorKind::BadRequest, format!("Commit to relay to {} members (max {})", relay.len(), vmcsnap_protocol::wire::RELAY_MAX));
            }
            let (n, rec) = (node.clone(), record.clone());
            match tokio::task::spawn_blocking(move || n.keep_record(&rec)).await {
                Ok(Ok(kept)) => {
                    if kept != crate::store::Kept::Deleted && !relay.is_empty() {
                        crate::node::relay_record(&node, record, relay.into_iter().filter(|id| *id != peer).collect());
                    }
                    DataResponse::Committed
                }
                Ok(Err(crate::node::RecordRefused::Invalid(e))) => error(RemoteErrorKind::BadRequest, format!("commit record refused: {e}")),
                Ok(Err(crate::node::RecordRefused::Store(e))) => crate::answer::AnswerError::from(e).into_response(),
                Err(e) => error(RemoteErrorKind::Failed, e.to_string()),
            }
        }
        DataRequest::VmList => DataResponse::Vms { host: node.config.name.clone(), vms: node.local_vms().await },
        DataRequest::VmForget { id } => match node.vms.remove(&id) {
            Ok(_) => {
                node.publish_state();
                DataResponse::Ok
            }
            Err(e) => error(RemoteErrorKind::Storage, e.to_string()),
        },
        DataRequest::Revoke { token } => match vmcsnap_dht::admission::Revocation::from_token(&token) {
            Ok(r) => match node.revoke(&r).await {
                Ok(_) => DataResponse::Ok,
                Err(e) => error(RemoteErrorKind::BadRequest, e.to_string()),
            },
            Err(e) => error(RemoteErrorKind::BadRequest, e.to_string()),
        },
        DataRequest::Delete { tombstone } => {
            let n = node.clone();
            match tokio::task::spawn_blocking(move || n.take_tombstone(&tombstone)).await {
                Ok(Ok(_)) => DataResponse::Ok,
                Ok(Err(crate::node::RecordRefused::Invalid(e))) => error(RemoteErrorKind::BadRequest, e),
                Ok(Err(e)) => error(RemoteErrorKind::Storage, e.to_string()),
                Err(e) => error(RemoteErrorKind::Failed, e.to_string()),
            }
        }
        DataRequest::CatalogDigest => {
            let store = node.store.clone();
            match tokio::task::spawn_blocking(move || crate::node::catalog_digest(&store)).await {
                Ok(Ok(digest)) => DataResponse::CatalogDigest { digest },
                Ok(Err(e)) => error(RemoteErrorKind::Storage, e.to_string()),
                Err(e) => error(RemoteErrorKind::Failed, e.to_string()),
            }
        }
        DataRequest::Revocations => match crate::admission::revocations(&node.store) {
            Ok(list) => DataResponse::Revocations { tokens: list.iter().take(vmcsnap_protocol::wire::REVOCATIONS_MAX).map(|r| r.to_token()).collect() },
            Err(e) => error(RemoteErrorKind::Storage, e.to_string()),
        },
        DataRequest::RestoreVm { name, vm, eager, in_place } => {
            let opts = crate::engine::restore::RestoreOptions { launch: true, eager, in_place, ..Default::default() };
            match crate::engine::restore::restore(node.clone(), name, vm, opts, crate::engine::Progress::new(None)).await {
                Ok(s) => DataResponse::Restored(s),
                Err(e) => error(RemoteErrorKind::Failed, e.to_string()),
            }
        }
        req => {
            let (store, trust) = (node.store.clone(), node.trust.clone());
            let id = node.id;
            tokio::task::spawn_blocking(move || answer(&store, &trust, id, req, Asker::Peer).unwrap_or_else(|e| e.into_response()))
                .await
                .unwrap_or_else(|e| error(RemoteErrorKind::Storage, format!("handler failed: {e}")))
        }
    }
}

fn error(kind: RemoteErrorKind, message: String) -> DataResponse {
    DataResponse::Error { kind, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_bounded_in_all_and_per_peer_and_given_back() {
        let slots = Arc::new(Mutex::new(Slots::default()));
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut held: Vec<Slot> = (0..CONNECTIONS_PER_PEER_MAX)
            .map(|_| {
                let mut s = Slot::take(&slots).expect("slot");
                assert!(s.assign(a));
                s
            })
            .collect();
        let mut fifth = Slot::take(&slots).expect("slot");
        assert!(!fifth.assign(a), "one peer got more than {CONNECTIONS_PER_PEER_MAX}");
        assert!(fifth.assign(b), "another peer was refused");
        held.pop();
        let mut again = Slot::take(&slots).expect("slot");
        assert!(again.assign(a), "a closed connection's place was not given back");
        drop((held, fifth, again));
        let s = slots.lock().expect("slots");
        assert_eq!((s.all, s.per_peer.len()), (0, 0));
        drop(s);
        let all: Vec<Slot> = (0..CONNECTIONS_MAX).map(|_| Slot::take(&slots).expect("slot")).collect();
        assert!(Slot::take(&slots).is_none(), "more than {CONNECTIONS_MAX} connections at once");
        drop(all);
        assert!(Slot::take(&slots).is_some());
    }
}

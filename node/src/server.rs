//! The data plane's serving side: accepts member connections and answers requests.
//!
//! Each connection is checked once: the TLS certificate proves a node key, and that key must
//! belong to a current member, or the connection is closed with [`CLOSE_NOT_MEMBER`]. (The
//! ALPN, [`vmcsnap_protocol::wire::DATA_ALPN`], already kept out peers of another version.)
//! Each stream carries one request: store requests go to [`crate::answer`] on the blocking
//! pool; a cut, the VM list, forgetting a VM and a restore go to the engines.

use crate::answer::{answer, Asker};
use crate::net::{read_frame, write_frame, FrameError, CLOSE_NOT_MEMBER};
use crate::node::Node;
use std::sync::Arc;
use tracing::Instrument;
use vmcsnap_protocol::wire::{DataRequest, DataResponse, RemoteErrorKind};
use vmcsnap_protocol::NodeId;

/// How long a peer has to send a request's frame once it opened a stream.
pub const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a connection from an unknown peer waits for the membership layer to learn of it
/// before it is refused (a peer that just joined may not be known yet).
pub const NEW_PEER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Accepts connections until the endpoint closes.
pub async fn accept_loop(node: Arc<Node>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let node = node.clone();
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
            let span = tracing::debug_span!("conn", peer = %peer.short());
            serve_connection(node, conn, peer).instrument(span).await;
        });
    }
}

async fn serve_connection(node: Arc<Node>, conn: quinn::Connection, peer: NodeId) {
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
        let node = node.clone();
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
                Ok(req) => dispatch(node, req).await,
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

/// Answers one request from a peer (a cut is served on its stream instead).
async fn dispatch(node: Arc<Node>, req: DataRequest) -> DataResponse {
    match req {
        DataRequest::VmList => DataResponse::Vms { host: node.config.name.clone(), vms: node.local_vms().await },
        DataRequest::VmForget { id } => match node.vms.remove(&id) {
            Ok(_) => DataResponse::Ok,
            Err(e) => error(RemoteErrorKind::Storage, e.to_string()),
        },
        DataRequest::Revoke { token } => match vmcsnap_dht::admission::Revocation::from_token(&token) {
            Ok(r) => match node.revoke(&r).await {
                Ok(_) => DataResponse::Ok,
                Err(e) => error(RemoteErrorKind::BadRequest, e.to_string()),
            },
            Err(e) => error(RemoteErrorKind::BadRequest, e.to_string()),
        },
        DataRequest::Revocations => match crate::admission::revocations(&node.store) {
            Ok(list) => DataResponse::Revocations { tokens: list.iter().take(vmcsnap_protocol::wire::REVOCATIONS_MAX).map(|r| r.to_token()).collect() },
            Err(e) => error(RemoteErrorKind::Storage, e.to_string()),
        },
        DataRequest::RestoreVm { name, vm } => {
            let opts = crate::engine::restore::RestoreOptions { launch: true, ..Default::default() };
            match crate::engine::restore::restore(node.clone(), name, vm, opts, crate::engine::Progress::new(None)).await {
                Ok(s) => DataResponse::Restored(s),
                Err(e) => error(RemoteErrorKind::Failed, e.to_string()),
            }
        }
        req => {
            let store = node.store.clone();
            let id = node.id;
            tokio::task::spawn_blocking(move || answer(&store, id, req, Asker::Peer).unwrap_or_else(|e| e.into_response()))
                .await
                .unwrap_or_else(|e| error(RemoteErrorKind::Storage, format!("handler failed: {e}")))
        }
    }
}

fn error(kind: RemoteErrorKind, message: String) -> DataResponse {
    DataResponse::Error { kind, message }
}

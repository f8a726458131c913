//! The data plane's serving side: accepts member connections and answers requests.
//!
//! Each connection is checked once: the TLS certificate proves a node key, and that key must
//! belong to a current member, or the connection is closed with [`CLOSE_NOT_MEMBER`].
//! Each stream carries one request; the handler runs store work on the blocking pool.

use crate::net::{read_frame, write_frame, FrameError, CLOSE_NOT_MEMBER};
use crate::node::Node;
use crate::store::{Store, StoreError};
use std::sync::Arc;
use tracing::Instrument;
use vmcsnap_protocol::wire::{
    CatalogEntry, DataRequest, DataResponse, RemoteErrorKind, CATALOG_ENTRIES_MAX, GET_PAGES_MAX,
    HAVE_HASHES_MAX, PUT_PAGES_MAX,
};
use vmcsnap_protocol::{NodeId, PAGE_SIZE};

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
            let mut known = node.member(&peer).is_some();
            for _ in 0..20 {
                if known {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                known = node.member(&peer).is_some();
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
        let node = node.clone();
        tokio::spawn(async move {
            let resp = match read_frame::<DataRequest>(&mut recv).await {
                Ok(DataRequest::Cut(begin)) => {
                    tracing::info!(target: "vmcsnap::snapshot", snapshot = %begin.name, from = %peer.short(), vms = begin.vms.len(), "taking part in a cluster snapshot");
                    crate::engine::cut::serve(node, begin, send, recv).await;
                    return;
                }
                Ok(DataRequest::VmList) => {
                    DataResponse::Vms { host: node.config.name.clone(), vms: crate::engine::snapshot::local_vms(&node).await }
                }
                Ok(DataRequest::VmForget { id }) => match node.vms.remove(&id) {
                    Ok(_) => DataResponse::Ok,
                    Err(e) => error(RemoteErrorKind::Storage, e.to_string()),
                },
                Ok(DataRequest::RestoreVm { name, vm }) => {
                    let opts = crate::engine::restore::RestoreOptions { launch: true, ..Default::default() };
                    match crate::engine::restore::restore(node.clone(), name, vm, opts, crate::engine::Progress::new(None)).await {
                        Ok(s) => DataResponse::Restored(s),
                        Err(e) => error(RemoteErrorKind::Failed, e.to_string()),
                    }
                }
                Ok(req) => {
                    let store = node.store.clone();
                    let id = node.id;
                    tokio::task::spawn_blocking(move || serve(&store, id, req, false))
                        .await
                        .unwrap_or_else(|e| error(RemoteErrorKind::Storage, format!("handler failed: {e}")))
                }
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

fn error(kind: RemoteErrorKind, message: String) -> DataResponse {
    DataResponse::Error { kind, message }
}

fn store_error(e: StoreError) -> DataResponse {
    match e {
        StoreError::HashMismatch { .. } | StoreError::BadPageSize(_) => error(RemoteErrorKind::HashMismatch, e.to_string()),
        StoreError::NameConflict(_) => error(RemoteErrorKind::NameConflict, e.to_string()),
        _ => error(RemoteErrorKind::Storage, e.to_string()),
    }
}

/// Answers one request against `store`. `local` requests come from this node itself, whose
/// pages were hashed here, so they skip the re-hash that every received page gets.
pub fn serve(store: &Store, id: NodeId, req: DataRequest, local: bool) -> DataResponse {
    let r: Result<DataResponse, StoreError> = (|| match req {
        DataRequest::Have { hashes } => {
            if hashes.len() > HAVE_HASHES_MAX {
                return Ok(error(RemoteErrorKind::BadRequest, format!("Have of {} hashes (max {HAVE_HASHES_MAX})", hashes.len())));
            }
            let have = store.have(&hashes)?;
            let missing = have.iter().enumerate().filter(|(_, h)| !**h).map(|(i, _)| i as u32).collect();
            Ok(DataResponse::Have { missing })
        }
        DataRequest::Put { pages } => {
            if pages.len() > PUT_PAGES_MAX {
                return Ok(error(RemoteErrorKind::BadRequest, format!("Put of {} pages (max {PUT_PAGES_MAX})", pages.len())));
            }
            let refs: Vec<_> = pages.iter().map(|p| (p.hash, p.data.as_slice())).collect();
            let (stored, already) = if local { store.put_own(&refs)? } else { store.put_verified(&refs)? };
            Ok(DataResponse::Put { stored, already })
        }
        DataRequest::Get { hashes } => {
            if hashes.len() > GET_PAGES_MAX {
                return Ok(error(RemoteErrorKind::BadRequest, format!("Get of {} pages (max {GET_PAGES_MAX})", hashes.len())));
            }
            let pages = store.get(&hashes)?.into_iter().map(|p| p.map(serde_bytes::ByteBuf::from)).collect();
            Ok(DataResponse::Pages { pages })
        }
        DataRequest::Sync => {
            store.sync()?;
            Ok(DataResponse::Synced)
        }
        DataRequest::Commit { record } => {
            if let Err(e) = record.validate() {
                return Ok(error(RemoteErrorKind::BadRequest, e.to_string()));
            }
            store.catalog_put(&record)?;
            Ok(DataResponse::Committed)
        }
        DataRequest::CatalogList => {
            let mut entries = Vec::new();
            for r in store.catalog_all()?.into_iter().take(CATALOG_ENTRIES_MAX) {
                let record_hash = r.record_hash().map_err(|e| StoreError::Corrupt(e.to_string()))?;
                entries.push(CatalogEntry { name: r.name, record_hash });
            }
            Ok(DataResponse::Catalog { entries })
        }
        DataRequest::CatalogGet { name } => Ok(DataResponse::Record { record: store.catalog_get(&name)? }),
        DataRequest::Stats => {
            let pages = store.page_count();
            Ok(DataResponse::Stats { node: id, pages, bytes: pages * PAGE_SIZE as u64 })
        }
        DataRequest::Cut(_) | DataRequest::VmList | DataRequest::VmForget { .. } | DataRequest::RestoreVm { .. } => {
            Ok(error(RemoteErrorKind::BadRequest, "this request needs the node, not just its store".into()))
        }
    })();
    r.unwrap_or_else(store_error)
}

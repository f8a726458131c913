//! Answers the data-plane requests that need only this node's store: `Have`, `Put`, `Get`,
//! `Sync`, `Commit`, the catalog, `Stats`, name claims. Both the data-plane server (for peers) and
//! [`crate::node::Node::call`] (for this node itself) go through [`answer`], so a node treats
//! itself exactly like any owner — except that its own pages, hashed here, are not re-hashed.
//!
//! Requests that need the whole node (a cut, the VM registry, a restore) are not answered
//! here: [`AnswerError::NeedsNode`].

use crate::store::{Store, StoreError};
use vmcsnap_protocol::manifest::validate_name;
use vmcsnap_protocol::wire::{CatalogEntry, DataRequest, DataResponse, PageSet, RemoteErrorKind, CATALOG_ENTRIES_MAX, GET_PAGES_MAX, HAVE_HASHES_MAX, NAME_CLAIM_TTL_MS, PUT_PAGES_MAX, TOMBSTONES_MAX};
use vmcsnap_dht::admission::Trust;
use vmcsnap_protocol::{NodeId, PAGE_SIZE};

/// Who asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asker {
    /// This node: its pages were hashed here.
    Local,
    /// A peer: every page it sends is re-hashed.
    Peer,
}

/// Why a store request was not answered.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The request broke a limit or a rule.
    #[error("{0}")]
    BadRequest(String),
    /// The store failed, or refused a page or record.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request needs the node, not just its store.
    #[error("this request needs the node, not just its store")]
    NeedsNode,
}

impl AnswerError {
    /// The kind a peer is told.
    pub fn remote_kind(&self) -> RemoteErrorKind {
        match self {
            AnswerError::BadRequest(_) | AnswerError::NeedsNode => RemoteErrorKind::BadRequest,
            AnswerError::Store(StoreError::HashMismatch { .. } | StoreError::BadPageSize(_)) => RemoteErrorKind::HashMismatch,
            AnswerError::Store(StoreError::NameConflict(_)) => RemoteErrorKind::NameConflict,
            AnswerError::Store(StoreError::Restarted) => RemoteErrorKind::Restarted,
            AnswerError::Store(_) => RemoteErrorKind::Storage,
        }
    }

    /// The answer a peer gets.
    pub fn into_response(self) -> DataResponse {
        DataResponse::Error { kind: self.remote_kind(), message: self.to_string() }
    }
}

/// Answers one request against `store` (node `id`, trusting what `trust` says of commit
/// records). Runs store work inline: call it from the blocking pool.
pub fn answer(store: &Store, trust: &Trust, id: NodeId, req: DataRequest, asker: Asker) -> Result<DataResponse, AnswerError> {
    match req {
        DataRequest::Have { hashes } => {
            if hashes.len() > HAVE_HASHES_MAX {
                return Err(AnswerError::BadRequest(format!("Have of {} hashes (max {HAVE_HASHES_MAX})", hashes.len())));
            }
            let (have, incarnation) = store.have_at(&hashes)?;
            let missing = have.iter().enumerate().filter(|(_, h)| !**h).map(|(i, _)| i as u32).collect();
            Ok(DataResponse::Have { missing, incarnation })
        }
        DataRequest::Put { pages } => {
            if pages.len() > PUT_PAGES_MAX {
                return Err(AnswerError::BadRequest(format!("Put of {} pages (max {PUT_PAGES_MAX})", pages.len())));
            }
            let refs = pages.pages().ok_or_else(|| AnswerError::BadRequest("Put whose bytes are not one page per hash".into()))?;
            let (stored, already, incarnation) = match asker {
                Asker::Local => store.put_own_at(&refs)?,
                Asker::Peer => store.put_verified_at(&refs)?,
            };
            Ok(DataResponse::Put { stored, already, incarnation })
        }
        DataRequest::Get { hashes } => {
            if hashes.len() > GET_PAGES_MAX {
                return Err(AnswerError::BadRequest(format!("Get of {} pages (max {GET_PAGES_MAX})", hashes.len())));
            }
            // A peer hashes every page it gets (and asks the next owner for a damaged one).
            let pages = match asker {
                Asker::Local => PageSet::of(store.get_shared(&hashes)?),
                Asker::Peer => store.get_for_peer(&hashes)?,
            };
            Ok(DataResponse::Pages { pages })
        }
        DataRequest::Sync { incarnation } => {
            store.sync_incarnation(incarnation)?;
            Ok(DataResponse::Synced)
        }
        // Relaying is the server's ([`crate::node::relay_record`]); a record is only kept here.
        DataRequest::Commit { record, .. } => {
            record.validate().map_err(|e| AnswerError::BadRequest(e.to_string()))?;
            trust.check_record(&record).map_err(|e| AnswerError::BadRequest(format!("commit record refused: {e}")))?;
            store.catalog_put(&record)?;
            Ok(DataResponse::Committed)
        }
        // Only signed records leave the node: an unsigned one (from before admission) is
        // trusted here alone.
        DataRequest::CatalogList => {
            let mut entries = Vec::new();
            for r in store.catalog_all()?.into_iter().filter(|r| r.is_signed()).take(CATALOG_ENTRIES_MAX) {
                let record_hash = r.id().map_err(|e| StoreError::Corrupt(e.to_string()))?;
                entries.push(CatalogEntry { name: r.record.name, record_hash });
            }
            Ok(DataResponse::Catalog { entries })
        }
        DataRequest::CatalogGet { name } => {
            let records = store.catalog_get(&name)?.into_iter().filter(|r| r.is_signed()).collect();
            Ok(DataResponse::Records { records })
        }
        DataRequest::Stats => {
            let pages = store.page_count();
            Ok(DataResponse::Stats { node: id, pages, bytes: pages * PAGE_SIZE as u64, free_bytes: store.free_bytes(), full: store.is_full(), gc: store.gc_stats()?, scrub: store.scrub_stats(), repair: store.repair_stats() })
        }
        DataRequest::Tombstones => {
            let tombstones = store.tombstones()?.into_iter().take(TOMBSTONES_MAX).collect();
            Ok(DataResponse::Tombstones { tombstones })
        }
        DataRequest::ClaimName { name, record, release } => {
            validate_name("snapshot name", &name).map_err(AnswerError::BadRequest)?;
            let now_ms = vmcsnap_protocol::units::unix_ms();
            let holder = store.claim_name(&name, record, now_ms, NAME_CLAIM_TTL_MS, release)?;
            Ok(DataResponse::NameClaim { holder })
        }
        DataRequest::Cut(_)
        | DataRequest::Delete { .. }
        | DataRequest::VmList
        | DataRequest::VmForget { .. }
        | DataRequest::RestoreVm { .. }
        | DataRequest::Revoke { .. }
        | DataRequest::Revocations
        | DataRequest::CatalogDigest => Err(AnswerError::NeedsNode),
    }
}

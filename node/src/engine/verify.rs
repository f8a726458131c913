//! `snapshot verify`: is every page of a snapshot on each of its owners, and (deep) is each
//! copy correct?
//!
//! The VM's pages are listed as a restore lists them (the manifest, read and verified), then
//! each owner of each page in today's owner view ([`Node::owner_view`]) is asked: `Have` (present), and
//! with `deep` also `Get` (an owner reads and hashes its copy and serves only a correct one,
//! so a page it has but does not serve is damaged). Every owner is asked for all its pages;
//! an owner that cannot be reached is reported as such.

use super::error::RestoreError;
use super::Progress;
use crate::node::Node;
use std::collections::HashMap;
use std::sync::Arc;
use vmcsnap_dht::placement::owners;
use vmcsnap_protocol::control::{OwnerVerify, VerifyReport, VmVerify};
use vmcsnap_protocol::manifest::{short_record_id, CommitRecord};
use vmcsnap_protocol::wire::{DataRequest, DataResponse, GET_PAGES_MAX, HAVE_HASHES_MAX};
use vmcsnap_protocol::{NodeId, PageHash};

/// Checks every copy of every page of `record`.
pub async fn verify(node: &Arc<Node>, record: &CommitRecord, deep: bool, mut progress: Progress) -> Result<VerifyReport, RestoreError> {
    let id = record.record_hash().map_err(|e| RestoreError::Internal(e.to_string()))?;
    // Where the pages belong now: the first `replicas` owners in the owner view (after a
    // join or a loss, repair moves them there; the snapshot's placement is where they went).
    let view = node.owner_view();
    let per_vm = super::fetch::pages_by_vm(node, record).await?;
    progress.phase(if deep { "reading every copy" } else { "asking every owner" }, per_vm.iter().map(|p| p.len() as u64).sum());
    let mut done = 0;
    let mut vms = Vec::new();
    for (entry, pages) in record.vms.iter().zip(per_vm) {
        let mut by_owner: HashMap<NodeId, Vec<PageHash>> = HashMap::new();
        for h in &pages {
            for o in owners(&view, h, record.replicas as usize) {
                by_owner.entry(view.members()[o]).or_default().push(*h);
            }
        }
        let mut list: Vec<(NodeId, Vec<PageHash>)> = by_owner.into_iter().collect();
        list.sort_by_key(|(id, _)| node.host_name(id));
        let checks = futures::future::join_all(list.iter().map(|(owner, hashes)| check_owner(node, *owner, hashes, deep))).await;
        let mut out = Vec::new();
        for ((owner, hashes), c) in list.iter().zip(checks) {
            let (missing, corrupt, unreachable) = match c {
                Ok((m, c)) => (m, c, None),
                Err(why) => (0, 0, Some(why)),
            };
            out.push(OwnerVerify { owner: node.host_name(owner), pages: hashes.len() as u64, missing, corrupt, unreachable });
        }
        done += pages.len() as u64;
        progress.set(done);
        vms.push(VmVerify { vm: entry.id.clone(), pages: pages.len() as u64, owners: out });
    }
    let ok = vms.iter().all(|v| v.owners.iter().all(|o| o.missing == 0 && o.corrupt == 0 && o.unreachable.is_none()));
    Ok(VerifyReport { name: record.name.clone(), record: short_record_id(&id), deep, vms, ok })
}

/// (missing, corrupt) of `hashes` on `owner`, or why it could not be asked.
async fn check_owner(node: &Arc<Node>, owner: NodeId, hashes: &[PageHash], deep: bool) -> Result<(u64, u64), String> {
    let member = node.member(&owner).filter(|m| m.alive).ok_or_else(|| "down or not a member".to_string())?;
    let mut missing = 0u64;
    let mut present = Vec::new();
    for batch in hashes.chunks(HAVE_HASHES_MAX) {
        match node.call(&member, DataRequest::Have { hashes: batch.to_vec() }).await {
            Ok(DataResponse::Have { missing: m, .. }) => {
                missing += m.len() as u64;
                let mut skip = m.iter().peekable();
                for (i, h) in batch.iter().enumerate() {
                    if skip.next_if(|&&j| j as usize == i).is_none() {
                        present.push(*h);
                    }
                }
            }
            Ok(_) => return Err("answered Have with the wrong message".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut corrupt = 0u64;
    if deep {
        for batch in present.chunks(GET_PAGES_MAX) {
            match node.call(&member, DataRequest::Get { hashes: batch.to_vec() }).await {
                Ok(DataResponse::Pages { pages }) if pages.len() == batch.len() => {
                    let pages = pages.pages().ok_or("answered Get with a malformed page set")?;
                    corrupt += batch.iter().zip(pages).filter(|(h, p)| p.is_none_or(|p| vmcsnap_protocol::hash_page(p) != **h)).count() as u64;
                }
                Ok(_) => return Err("answered Get with the wrong message".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok((missing, corrupt))
}

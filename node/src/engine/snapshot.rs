//! Taking a snapshot, from the node the operator asked (the coordinator of the cut).
//!
//! States, each with its own failure, in order:
//! 1. **Check**: name free (here and on every live member), enough live members for
//!    `replicas`, every VM found (registered on exactly one live member, or given with its
//!    source on this host). Fails with nothing written.
//! 2. **Capture** (on each VM's host, as one cut: [`super::cut`]): read, hash, group by owner,
//!    `Have`, `Put` the missing pages. Pages written here are invisible (no record names them)
//!    until step 4.
//! 3. **Seal** (on each host): build each VM's manifest tree and store its chunks like pages;
//!    `Sync` every owner so that every page is durable on `replicas` owners.
//! 4. **Commit**: claim the name with a majority of its arbiters (of two creates of one name
//!    at once, exactly one gets it), store the commit record here (the commit point: every
//!    page it names is already durable on its owners), then send it to every live member
//!    until `replicas` hold it; members that miss it pull it later through the catalog sync.
//!
//! A failure in 1–3 leaves no record anywhere, so `snapshot list` never shows it. Pages a
//! failed snapshot wrote stay in the store unreferenced (a later snapshot reuses them).

use super::cut::coordinate::Cut;
use super::error::SnapshotError;
use super::Progress;
use crate::config::check_replicas;
use crate::node::{fan_out, Node};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmcsnap_dht::Member;
use vmcsnap_protocol::control::{CreateSummary, VmInfo, VmSpec};
use vmcsnap_protocol::manifest::{validate_name, CaptureMode, CommitRecord, VmEntry, VmStats, SNAPSHOT_VMS_MAX};
use vmcsnap_dht::placement::{owners, View};
use vmcsnap_protocol::wire::{CutBegin, DataRequest, DataResponse, NAME_ARBITERS};
use vmcsnap_protocol::{NodeId, PageHash, PAGE_SIZE};

/// What `snapshot create` asks for.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// Snapshot name.
    pub name: String,
    /// VMs named by the operator.
    pub vms: Vec<VmSpec>,
    /// Also every VM registered in the cluster.
    pub all: bool,
    /// Capture mode for running VMs.
    pub mode: CaptureMode,
    /// Replicas; `None` for the node's default.
    pub replicas: Option<u8>,
    /// Live-copy bandwidth cap, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Which disks to capture with each VM's memory.
    pub disks: vmcsnap_protocol::wire::DiskChoice,
}

/// One VM of the snapshot: its id, its source if given (on this host), and its host.
struct Placed {
    id: String,
    source: Option<String>,
    host: NodeId,
}

/// Takes snapshot `req.name` of VMs wherever they run, as one cut driven from this node.
pub async fn create(node: Arc<Node>, req: CreateRequest, progress: Progress) -> Result<CreateSummary, SnapshotError> {
    validate_name("snapshot name", &req.name).map_err(SnapshotError::Invalid)?;
    let name = req.name.clone();
    if !node.reserve_name(&name) {
        return Err(SnapshotError::NameTaken(name));
    }
    let r = create_reserved(&node, req, progress).await;
    node.release_name(&name);
    match &r {
        Ok(s) => tracing::info!(target: "vmcsnap::snapshot", snapshot = %name, raw = s.raw_bytes, new = s.new_bytes, ms = s.elapsed_ms, "snapshot committed"),
        Err(e) => tracing::warn!(target: "vmcsnap::snapshot", snapshot = %name, error = %e, "snapshot failed; nothing committed"),
    }
    r
}

async fn create_reserved(node: &Arc<Node>, req: CreateRequest, mut progress: Progress) -> Result<CreateSummary, SnapshotError> {
    let t0 = Instant::now();
    // 1. Check.
    let replicas = check(node, &req).await?;
    let members = node.alive_members();
    if members.len() < replicas as usize {
        return Err(SnapshotError::TooFewMembers { alive: members.len(), replicas });
    }
    let members = with_room(node, members, replicas).await?;
    let placed = place_vms(node, &req).await?;
    let stage = |s: &str| crate::engine::stage(&req.name, t0, s);
    stage("placed");

    // 2 and 3. The cut: one participant per host; each seals its own VMs.
    let placement: Vec<NodeId> = members.iter().map(|m| m.id).collect();
    let mut parts: Vec<(Member, CutBegin)> = Vec::new();
    for vm in &placed {
        match parts.iter_mut().find(|(m, _)| m.id == vm.host) {
            Some((_, begin)) => begin.vms.push((vm.id.clone(), vm.source.clone())),
            None => {
                let member = node.member(&vm.host).ok_or_else(|| SnapshotError::Invalid(format!("host {} left the cluster", vm.host.short())))?;
                let begin = CutBegin {
                    name: req.name.clone(),
                    vms: vec![(vm.id.clone(), vm.source.clone())],
                    mode: req.mode,
                    replicas,
                    placement: placement.clone(),
                    max_bandwidth: req.max_bandwidth,
                    disks: req.disks.clone(),
                };
                parts.push((member, begin));
            }
        }
    }
    let mut cut = Cut::start(node, parts).await;
    let entries = cut.run(&mut progress).await?;
    stage("cut");

    // 4. Commit: VMs in the order asked.
    let mut by_id: HashMap<String, VmEntry> = entries.into_iter().flatten().map(|v| (v.id.clone(), v)).collect();
    let mut vms = Vec::new();
    for p in &placed {
        vms.push(by_id.remove(&p.id).ok_or_else(|| SnapshotError::Internal(format!("no entry came back for VM {}", p.id)))?);
    }
    let starts: Vec<u64> = vms.iter().filter_map(|v| v.stats.paused_unix_us).collect();
    let pause_skew_us = match (starts.iter().min(), starts.iter().max()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let record = CommitRecord {
        name: req.name.clone(),
        created_unix_ms: vmcsnap_protocol::units::unix_ms(),
        replicas,
        placement,
        initiator: node.id,
        vms,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        pause_skew_us,
    };
    record.validate().map_err(|e| SnapshotError::Internal(format!("the record built for {} is invalid: {e}", record.name)))?;
    // Garbage collection frees a page only after it was unreferenced for longer than the
    // deadline: a snapshot that ran longer might name pages freed meanwhile.
    if t0.elapsed() > node.config.snapshot_deadline {
        return Err(SnapshotError::DeadlinePassed { secs: node.config.snapshot_deadline.as_secs() });
    }
    commit(node, &record).await?;
    stage("committed");
    drop(cut);
    Ok(summary(&record, t0))
}

/// The members that have room for pages: one that says its disk is nearly full (less free
/// than its `--min-free`) is left out of this snapshot's placement. What each member says
/// comes by gossip ([`Node::member_states`]); only a member not heard of yet is asked (one
/// that does not answer is kept: if it is down, the snapshot fails on it and is retried
/// without it). A member that filled up in the last seconds may not be known as full yet: its
/// store refuses the pages and the snapshot fails whole.
async fn with_room(node: &Arc<Node>, members: Vec<Member>, replicas: u8) -> Result<Vec<Member>, SnapshotError> {
    let states = node.member_states();
    let (heard, unheard): (Vec<Member>, Vec<Member>) = members.into_iter().partition(|m| states.contains_key(&m.id));
    let answers = fan_out(&unheard, crate::node::PEER_ANSWER_TIMEOUT, |m| async move { node.call(&m, DataRequest::Stats).await }).await;
    let said_full = heard.into_iter().map(|m| {
        let full = states.get(&m.id).is_some_and(|s| s.full);
        (m, full)
    });
    let answered_full = unheard.into_iter().zip(answers).map(|(m, a)| {
        let full = matches!(a, Ok(DataResponse::Stats { full: true, .. }));
        (m, full)
    });
    let mut room = Vec::new();
    let mut full = Vec::new();
    for (m, is_full) in said_full.chain(answered_full) {
        if is_full {
            tracing::warn!(target: "vmcsnap::snapshot", member = %node.host_name(&m.id), "member's disk is nearly full; placing around it");
            full.push(node.host_name(&m.id));
        } else {
            room.push(m);
        }
    }
    room.sort_by_key(|m| m.id); // as the member list comes: by id
    if room.len() < replicas as usize {
        return Err(SnapshotError::NoRoom { room: room.len(), replicas, full: full.join(", ") });
    }
    Ok(room)
}

/// Step 1's checks of the request, the name and the replicas; returns the replicas to use.
async fn check(node: &Arc<Node>, req: &CreateRequest) -> Result<u8, SnapshotError> {
    if req.vms.is_empty() && !req.all {
        return Err(SnapshotError::Invalid(
            "name the VMs: --vm ID (registered with a node: see `vmcsnap vm list`), --vm ID=qemu:QMP_SOCKET or ID=file:PATH (on this host), or --all".into(),
        ));
    }
    let mut ids = HashSet::new();
    for spec in &req.vms {
        validate_name("VM id", &spec.id).map_err(SnapshotError::Invalid)?;
        if !ids.insert(spec.id.clone()) {
            return Err(SnapshotError::Invalid(format!("VM id {} is given twice", spec.id)));
        }
        if let Some(source) = &spec.source {
            crate::source::Source::parse(source).map_err(SnapshotError::Invalid)?;
        }
    }
    let replicas = req.replicas.unwrap_or(node.config.replicas);
    check_replicas(replicas).map_err(SnapshotError::Invalid)?;
    // Here, then the name's arbiters (a few, whatever the cluster's size): a committed record
    // of the name is held by a majority of them (its commit waits for that) and they refuse a
    // second claim of it anyway; this only says so before any VM is paused.
    if !node.store.catalog_get(&req.name)?.is_empty() || name_on_arbiters(node, &req.name).await {
        return Err(SnapshotError::NameTaken(req.name.clone()));
    }
    Ok(replicas)
}

/// Where each VM runs: the asked ones in order, then (with `--all`) every other registered one.
async fn place_vms(node: &Arc<Node>, req: &CreateRequest) -> Result<Vec<Placed>, SnapshotError> {
    let named: Vec<String> = req.vms.iter().filter(|v| v.source.is_none()).map(|v| v.id.clone()).collect();
    let known = if req.all || !named.is_empty() {
        // Named VMs: the hosts that gossip says may hold them are asked; if one is not found
        // on exactly one host that way (it moved, or was registered a moment ago), everyone
        // is. `--all` asks everyone: a VM registered a moment ago must not be left out.
        let (mut known, mut silent) = if req.all { node.cluster_vms().await } else { node.find_vms(&named).await };
        if !named.iter().all(|id| known.iter().filter(|v| v.id == *id).count() == 1) {
            (known, silent) = node.cluster_vms().await;
        }
        if !silent.is_empty() {
            // Their VMs could be the ones asked for (or, with --all, left out unseen).
            return Err(SnapshotError::Invalid(format!("host(s) {} did not list their VMs; try again", silent.join(", "))));
        }
        known
    } else {
        vec![]
    };
    let host_of = |id: &str| -> Result<NodeId, SnapshotError> {
        let hosts: Vec<&VmInfo> = known.iter().filter(|v| v.id == id).collect();
        match hosts.as_slice() {
            [v] => Ok(v.node),
            [] => Err(SnapshotError::Invalid(format!("VM {id} is not registered on any live member (see `vmcsnap vm list`; register it with `vmcsnap vm add`)"))),
            many => Err(SnapshotError::Invalid(format!(
                "VM {id} is registered on several hosts ({}); remove the stale registration with `vmcsnap vm remove {id}` there",
                many.iter().map(|v| v.host.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    };
    let mut placed = Vec::new();
    for spec in &req.vms {
        let host = match &spec.source {
            Some(_) => node.id,
            None => host_of(&spec.id)?,
        };
        placed.push(Placed { id: spec.id.clone(), source: spec.source.clone(), host });
    }
    if req.all {
        for v in &known {
            if !placed.iter().any(|p| p.id == v.id) {
                placed.push(Placed { id: v.id.clone(), source: None, host: host_of(&v.id)? });
            }
        }
    }
    if placed.is_empty() {
        return Err(SnapshotError::Invalid("--all: no VM is registered on any live member (see `vmcsnap vm add`)".into()));
    }
    if placed.len() > SNAPSHOT_VMS_MAX {
        return Err(SnapshotError::Invalid(format!("{} VMs; one snapshot takes at most {SNAPSHOT_VMS_MAX}", placed.len())));
    }
    Ok(placed)
}

/// Signs the record and writes it here first (the commit point), then on the members that
/// must hold it: the name's arbiters, and by the name's ranking enough others for `replicas`
/// copies. The snapshot is reported done only once its record is durable on `replicas`
/// members (this one included; fewer if fewer are alive) and a majority of the arbiters: if it
/// cannot get there, it is deleted again (a tombstone where it went) and the snapshot fails.
/// It waits on those few members only: every other live member gets the record in the
/// background down a broadcast tree ([`crate::node::relay_record`]: each member hands it on to
/// a few, each with its share of the rest), and catalog sync brings it to any that miss it.
async fn commit(node: &Arc<Node>, record: &CommitRecord) -> Result<(), SnapshotError> {
    let signed = node.signer.sign(record.clone()).map_err(|e| SnapshotError::Internal(format!("cannot sign the commit record: {e}")))?;
    let id = signed.id().map_err(|e| SnapshotError::Internal(e.to_string()))?;
    let (arbiters, needed) = claim_name(node, &record.name, id).await?;
    if let Err(e) = node.store.catalog_put_first(&signed) {
        release_name(node, &record.name, id).await;
        return Err(match e {
            crate::store::StoreError::NameConflict(n) => SnapshotError::NameTaken(n),
            e => SnapshotError::Store(e),
        });
    }
    let mut holders = std::collections::HashSet::from([node.id]);
    let arbiters_holding = |holders: &HashSet<NodeId>| arbiters.iter().filter(|a| holders.contains(*a)).count();
    let key = name_key(&record.name);
    // Members that failed to take it: tried again only if they are arbiters.
    let mut failed: HashSet<NodeId> = HashSet::new();
    let mut reasons = Vec::new();
    for attempt in 0..COMMIT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let peers = commit_targets(&node.alive_peers(), &key, &arbiters, &holders, &failed, record.replicas as usize);
        if peers.is_empty() {
            break;
        }
        let answers = fan_out(&peers, crate::net::REQUEST_TIMEOUT, |p| {
            let req = DataRequest::Commit { record: signed.clone(), relay: vec![] };
            async move { node.call(&p, req).await }
        })
        .await;
        reasons.clear();
        for (p, a) in peers.iter().zip(answers) {
            match a {
                Ok(DataResponse::Committed) => {
                    holders.insert(p.id);
                }
                Ok(_) => reasons.push(format!("{}: wrong answer", node.host_name(&p.id))),
                Err(e) => reasons.push(format!("{}: {e}", node.host_name(&p.id))),
            }
            if !holders.contains(&p.id) {
                failed.insert(p.id);
            }
        }
        if (holders.len() >= record.replicas as usize || reasons.is_empty()) && arbiters_holding(&holders) >= needed {
            break;
        }
    }
    // The name stays claimed only while its grants last; a majority of the arbiters holding
    // the record keeps it the name's for good.
    let named = arbiters_holding(&holders) >= needed;
    if !named {
        reasons.push(format!("only {} of the {needed} arbiters of the name that must keep it took it", arbiters_holding(&holders)));
    }
    if !named || (holders.len() < record.replicas as usize && !reasons.is_empty()) {
        // Not durable enough to report: undo it everywhere it went.
        let undo = async {
            let t = node.signer.sign_tombstone(&record.name, id, vmcsnap_protocol::units::unix_ms()).map_err(|e| e.to_string())?;
            node.take_tombstone(&t).map_err(|e| e.to_string())?;
            node.ask_peers(DataRequest::Delete { tombstone: t }, crate::net::REQUEST_TIMEOUT).await;
            Ok::<(), String>(())
        };
        if let Err(e) = undo.await {
            tracing::error!(target: "vmcsnap::snapshot", snapshot = %record.name, error = %e, "cannot undo a commit that is not durable enough");
        }
        release_name(node, &record.name, id).await;
        return Err(SnapshotError::CommitNotDurable { held: holders.len(), needed: record.replicas as usize, reasons: reasons.join("; ") });
    }
    // The rest of the cluster gets it down a broadcast tree, in a random order each time.
    let mut rest: Vec<NodeId> = node.alive_peers().into_iter().map(|p| p.id).filter(|id| !holders.contains(id)).collect();
    rand::seq::SliceRandom::shuffle(rest.as_mut_slice(), &mut rand::rng());
    crate::node::relay_record(node, signed, rest);
    Ok(())
}

/// The members the commit asks next: the alive arbiters that do not hold the record yet (each
/// until it does), then, by the name's ranking among the alive members, others that have not
/// failed, until `replicas` would hold it.
fn commit_targets(alive_peers: &[Member], key: &PageHash, arbiters: &[NodeId], holders: &HashSet<NodeId>, failed: &HashSet<NodeId>, replicas: usize) -> Vec<Member> {
    let peers: Vec<&Member> = alive_peers.iter().filter(|p| !holders.contains(&p.id)).collect();
    let view = View::new(peers.iter().map(|p| p.id).collect());
    let by_id: HashMap<NodeId, &Member> = peers.iter().map(|p| (p.id, *p)).collect();
    // `owners` indexes the view's (sorted) members.
    let ranked: Vec<&Member> = owners(&view, key, view.len()).into_iter().filter_map(|i| by_id.get(&view.members()[i]).copied()).collect();
    let mut out: Vec<Member> = ranked.iter().filter(|p| arbiters.contains(&p.id)).map(|p| (*p).clone()).collect();
    let mut others = ranked.iter().filter(|p| !arbiters.contains(&p.id) && !failed.contains(&p.id));
    while holders.len() + out.len() < replicas {
        match others.next() {
            Some(p) => out.push((*p).clone()),
            None => break,
        }
    }
    out
}

/// Claims `name` for record `id` with the name's arbiters (its first [`NAME_ARBITERS`] owners
/// among every admitted member, down or not): a majority must grant it. Returns the arbiters
/// and the majority; the commit then succeeds only once that many of them hold the record
/// (a grant lapses after `NAME_CLAIM_TTL_MS`; a kept record never does). An arbiter grants one record per name, so of
/// two creates of one name at once only one gets a majority; the other fails here with
/// nothing committed (and gives back the grants it got, so that a retry need not wait for
/// them to lapse). Arbiters that are down count against the majority.
async fn claim_name(node: &Arc<Node>, name: &str, id: PageHash) -> Result<(Vec<NodeId>, usize), SnapshotError> {
    let arbiters = name_arbiters(node, name);
    let needed = arbiters.len() / 2 + 1;
    let mut reachable = Vec::new();
    let mut reasons = Vec::new();
    for a in &arbiters {
        match node.member(a).filter(|m| m.alive) {
            Some(m) => reachable.push(m),
            None => reasons.push(format!("{} is down", node.host_name(a))),
        }
    }
    let answers = fan_out(&reachable, crate::node::PEER_ANSWER_TIMEOUT, |m| async move {
        node.call(&m, DataRequest::ClaimName { name: name.to_string(), record: id, release: false }).await
    })
    .await;
    let mut granted = Vec::new();
    let mut holder = None;
    for (m, a) in reachable.into_iter().zip(answers) {
        match a {
            Ok(DataResponse::NameClaim { holder: None }) => granted.push(m),
            Ok(DataResponse::NameClaim { holder: Some(h) }) => holder = Some(h),
            Ok(_) => reasons.push(format!("{}: wrong answer", node.host_name(&m.id))),
            Err(e) => reasons.push(format!("{}: {e}", node.host_name(&m.id))),
        }
    }
    if granted.len() >= needed {
        return Ok((arbiters, needed));
    }
    if !granted.is_empty() {
        release_name(node, name, id).await;
    }
    match holder {
        Some(h) => Err(SnapshotError::NameClaimed { name: name.to_string(), holder: vmcsnap_protocol::manifest::short_record_id(&h) }),
        None => Err(SnapshotError::NameUndecided { granted: granted.len(), needed, reasons: reasons.join("; ") }),
    }
}

/// Whether a live arbiter of `name` (this node aside) holds a record of that name.
async fn name_on_arbiters(node: &Arc<Node>, name: &str) -> bool {
    let arbiters: Vec<Member> = name_arbiters(node, name).iter().filter(|a| **a != node.id).filter_map(|a| node.member(a)).filter(|m| m.alive).collect();
    let answers = fan_out(&arbiters, crate::node::PEER_ANSWER_TIMEOUT, |m| async move { node.call(&m, DataRequest::CatalogGet { name: name.to_string() }).await }).await;
    answers.into_iter().any(|a| matches!(a, Ok(DataResponse::Records { records }) if !records.is_empty()))
}

/// The members that decide who gets `name`.
fn name_arbiters(node: &Node, name: &str) -> Vec<NodeId> {
    // Every admitted member, down or not: a view that changes with liveness (or with a
    // node's restart) could give two sides of a partition arbiters of their own.
    let view = View::new(node.members().into_iter().map(|m| m.id).collect());
    owners(&view, &name_key(name), NAME_ARBITERS).into_iter().map(|o| view.members()[o]).collect()
}

/// Where a snapshot name ranks members (its arbiters, where its record goes first).
fn name_key(name: &str) -> PageHash {
    PageHash(*blake3::hash(name.as_bytes()).as_bytes())
}

/// Gives back record `id`'s claim on `name` (its commit failed), where the arbiters answer.
async fn release_name(node: &Arc<Node>, name: &str, id: PageHash) {
    let arbiters: Vec<Member> = name_arbiters(node, name).iter().filter_map(|a| node.member(a)).filter(|m| m.alive).collect();
    fan_out(&arbiters, crate::node::PEER_ANSWER_TIMEOUT, |m| async move {
        node.call(&m, DataRequest::ClaimName { name: name.to_string(), record: id, release: true }).await
    })
    .await;
}

/// Rounds of sending the commit record to the members that do not hold it yet.
const COMMIT_ATTEMPTS: usize = 3;

fn summary(record: &CommitRecord, t0: Instant) -> CreateSummary {
    let raw_bytes = record.vms.iter().map(|v| v.manifest.pages * PAGE_SIZE as u64).sum();
    let vms: Vec<(String, VmStats)> = record.vms.iter().map(|v| (v.id.clone(), v.stats.clone())).collect();
    CreateSummary {
        name: record.name.clone(),
        raw_bytes,
        bytes_sent: vms.iter().map(|(_, s)| s.bytes_sent).sum(),
        new_bytes: vms.iter().map(|(_, s)| s.pages_new).sum::<u64>() * PAGE_SIZE as u64,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        hosts: record.vms.iter().map(|v| v.host_name.clone()).collect(),
        pause_skew_us: record.pause_skew_us,
        vms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: u8) -> Member {
        Member { id: NodeId([i; 32]), data_addr: ([127, 0, 0, 1], 7000 + i as u16).into(), alive: true, name: format!("n{i}"), incarnation: 1 }
    }

    #[test]
    fn the_commit_asks_the_arbiters_and_the_best_ranked_others_until_replicas_hold_it() {
        let peers: Vec<Member> = (1..=20).map(member).collect();
        let key = name_key("nightly");
        let view = View::new(peers.iter().map(|p| p.id).collect());
        let ranked: Vec<NodeId> = owners(&view, &key, view.len()).into_iter().map(|i| view.members()[i]).collect();
        let arbiters = vec![ranked[5], ranked[9], ranked[12]];
        let me = NodeId([0; 32]);
        let ids = |v: Vec<Member>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
        // Only this node holds it, R = 2: the three arbiters, and no other (they make 4).
        let holders = HashSet::from([me]);
        assert_eq!(ids(commit_targets(&peers, &key, &arbiters, &holders, &HashSet::new(), 2)), arbiters);
        // R = 6: the arbiters, then the best-ranked others.
        assert_eq!(ids(commit_targets(&peers, &key, &arbiters, &holders, &HashSet::new(), 6)), [arbiters.clone(), vec![ranked[0], ranked[1]]].concat());
        // The first-ranked failed, an arbiter holds it now: the failed one is skipped, the
        // arbiter not asked again.
        let holders = HashSet::from([me, ranked[9]]);
        let failed = HashSet::from([ranked[0]]);
        assert_eq!(ids(commit_targets(&peers, &key, &arbiters, &holders, &failed, 6)), vec![ranked[5], ranked[12], ranked[1], ranked[2]]);
        // Fewer alive members than replicas: every one of them.
        assert_eq!(commit_targets(&peers[..2], &key, &[], &HashSet::from([me]), &HashSet::new(), 5).len(), 2);
    }
}

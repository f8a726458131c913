//! The [`Node`] API the engines and servers use: members, calling a member (or this node
//! itself), asking every peer at once ([`fan_out`]), the catalog, and this host's VMs.
//!
//! A `Node` holds no task of its own: [`crate::daemon::run`] builds it and runs the daemon's
//! background work around it.

use crate::admission::{AdmitError, Signer};
use crate::answer::{answer, Asker};
use crate::config::NodeConfig;
use crate::net::{DataClient, NetError};
use crate::store::{Store, StoreError};
use crate::vms::Registry;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_dht::admission::{Revocation, Trust};
use vmcsnap_dht::placement::View;
use vmcsnap_dht::{Member, Membership};
use vmcsnap_protocol::control::VmInfo;
use vmcsnap_protocol::control::Deleted;
use vmcsnap_protocol::manifest::{short_record_id, split_pick, CommitRecord, SignedRecord, SignedTombstone};
use vmcsnap_protocol::wire::{DataRequest, DataResponse};
use vmcsnap_protocol::NodeId;

/// How long a quick question to one peer (a catalog entry, its VM list, its store figures)
/// may take in a fan-out before that peer counts as silent.
pub const PEER_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node checks whether its disk filled up or its VMs changed, to tell the
/// cluster ([`Node::publish_state`]).
pub const STATE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long pulling missing commit records from one peer may take in a catalog sync.
pub const CATALOG_PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Peers one round of the background catalog sync asks (at random among the node's sync
/// partners): a round costs this many digest answers whatever the cluster's size.
pub const CATALOG_SYNC_FANOUT: usize = 3;
/// Live peers a node keeps as its catalog-sync partners. Rounds ask partners only, so the
/// data-plane connections to them stay open and are reused; asking any random peer instead
/// made almost every round a new QUIC handshake in a cluster of 100.
pub const SYNC_PARTNERS: usize = 6;
/// How often one sync partner is swapped for another live peer picked at random (so that
/// partners form a random graph that changes, and news crosses it within a few rounds).
pub const PARTNER_ROTATION: Duration = Duration::from_secs(60);

/// A node's catalog-sync partners.
#[derive(Debug, Default)]
struct Partners {
    ids: Vec<NodeId>,
    rotated: Option<std::time::Instant>,
}

impl Partners {
    /// Drops partners that are no longer live, tops the set up to [`SYNC_PARTNERS`] from
    /// `alive`, swaps one for another when `rotate`, and returns up to `fanout` of them at
    /// random.
    fn pick(&mut self, alive: &[NodeId], rotate: bool, fanout: usize, rng: &mut impl rand::Rng) -> Vec<NodeId> {
        use rand::seq::{IndexedRandom, SliceRandom};
        self.ids.retain(|p| alive.contains(p));
        let mut rotated_out = None;
        if rotate && !self.ids.is_empty() && alive.len() > self.ids.len() {
            let i = rng.random_range(0..self.ids.len());
            rotated_out = Some(self.ids.swap_remove(i));
        }
        // Not the one just rotated out (a rotation would then change nothing), unless the
        // set stays short without it.
        let others: Vec<NodeId> = alive.iter().filter(|p| !self.ids.contains(p) && Some(**p) != rotated_out).copied().collect();
        let want = SYNC_PARTNERS.saturating_sub(self.ids.len());
        self.ids.extend(others.choose_multiple(rng, want).copied());
        if let Some(r) = rotated_out.filter(|_| self.ids.len() < SYNC_PARTNERS) {
            self.ids.push(r);
        }
        let mut out = self.ids.clone();
        out.shuffle(rng);
        out.truncate(fanout);
        out
    }
}

/// What a catalog sync learned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// Member removals that were new here.
    pub revocations: usize,
    /// Snapshot deletions that were new here.
    pub tombstones: usize,
    /// Commit records that were new here.
    pub records: usize,
}

/// Why one peer of a [`fan_out`] gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum FanOutError {
    /// The peer did not answer within the fan-out's timeout.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The request failed.
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Asks every member of `peers` at once with `ask`, giving each at most `timeout`. Answers
/// come back in the order of `peers`; a slow or failed peer never delays the others' answers
/// beyond `timeout`.
pub async fn fan_out<T, F, Fut>(peers: &[Member], timeout: Duration, ask: F) -> Vec<Result<T, FanOutError>>
where
    F: Fn(Member) -> Fut,
    Fut: Future<Output = Result<T, NetError>>,
{
    futures::future::join_all(peers.iter().map(|p| {
        let fut = ask(p.clone());
        async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.map_err(FanOutError::Net),
                Err(_) => Err(FanOutError::TimedOut(timeout)),
            }
        }
    }))
    .await
}

/// Members a member hands a commit record on to directly, each with its share of the rest to
/// hand on in turn (a broadcast tree): a record reaches N members in about `log4 N` hops, no
/// member sends it more than this many times, and the cluster sends it N − 1 times in all.
pub const RECORD_RELAY_FANOUT: usize = 4;

/// How `group` is handed on: [`RECORD_RELAY_FANOUT`] shares as even as can be, each as (the
/// member given the record, the members it hands it on to).
pub fn relay_shares<T: Clone>(group: &[T]) -> Vec<(T, Vec<T>)> {
    let k = RECORD_RELAY_FANOUT.min(group.len());
    let mut out = Vec::with_capacity(k);
    let mut at = 0;
    for s in 0..k {
        let len = group.len() / k + usize::from(s < group.len() % k);
        out.push((group[at].clone(), group[at + 1..at + len].to_vec()));
        at += len;
    }
    out
}

/// Gives `rec` to the members of `group` in the background, as a broadcast tree: each share
/// ([`relay_shares`]) goes to its first member with the rest of the share to hand on; one that
/// does not take it within [`PEER_ANSWER_TIMEOUT`] is passed over for the next. Members not
/// live here are left out: catalog sync brings them the record.
pub fn relay_record(node: &Arc<Node>, rec: SignedRecord, group: Vec<NodeId>) {
    let alive: std::collections::HashMap<NodeId, Member> = node.alive_peers().into_iter().map(|m| (m.id, m)).collect();
    let live: Vec<Member> = group.iter().filter_map(|id| alive.get(id).cloned()).collect();
    for (head, rest) in relay_shares(&live) {
        let (node, rec) = (node.clone(), rec.clone());
        tokio::spawn(async move {
            let mut share = std::iter::once(head).chain(rest).collect::<std::collections::VecDeque<_>>();
            while let Some(m) = share.pop_front() {
                let req = DataRequest::Commit { record: rec.clone(), relay: share.iter().map(|m| m.id).collect() };
                match tokio::time::timeout(PEER_ANSWER_TIMEOUT, node.call(&m, req)).await {
                    Ok(Ok(DataResponse::Committed)) => return,
                    other => {
                        let why = match other {
                            Ok(Ok(_)) => "wrong answer".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => format!("no answer within {PEER_ANSWER_TIMEOUT:?}"),
                        };
                        tracing::debug!(target: "vmcsnap::catalog", name = %rec.record.name, peer = %m.id.short(), error = %why, left = share.len(), "commit record not handed on; trying the next member of the share");
                    }
                }
            }
        });
    }
}

/// Why a record from a peer was not kept.
#[derive(Debug, thiserror::Error)]
pub enum RecordRefused {
    /// It breaks a rule, or no admitted member signed it.
    #[error("{0}")]
    Invalid(String),
    /// The store failed (or holds too many records under the name).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Why [`Node::find_record`] found no single record.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// A malformed `NAME@ID`.
    #[error("{0}")]
    Invalid(String),
    /// No such snapshot (or no record with that id).
    #[error("no snapshot {0:?} (see `vmcsnap snapshot list`)")]
    NotFound(String),
    /// Several records under the name: the operator picks one.
    #[error("snapshot {name:?} has conflicting records from different members: {records}; pick one as NAME@ID")]
    Conflict {
        /// The name.
        name: String,
        /// Each record, described.
        records: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Why [`Node::delete`] deleted nothing.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// No single record to delete.
    #[error(transparent)]
    Find(#[from] FindError),
    /// Signing or keeping the tombstone failed.
    #[error("cannot delete: {0}")]
    Internal(String),
}

/// Most `Get`s for the background push of lazy restores in flight from one node (each answer is
/// up to 1 MiB). What is asked for arrives at once and waits in this node's UDP receive buffer
/// (4 MiB, [`crate::net::UDP_RECEIVE_BUFFER`]) until the node reads it, and a page a running
/// guest asked for (never held back by this) waits behind it. Unbounded, six lazy restores on
/// three busy hosts had their last guest run 0.54 s after the rollback began; bounded, 0.26 s.
/// On a LAN, 2 MiB in flight still carries gigabytes a second.
pub const LAZY_PUSH_GETS_IN_FLIGHT: usize = 2;

/// A running node.
pub struct Node {
    /// This node's identity.
    pub id: NodeId,
    /// Its store.
    pub store: Arc<Store>,
    /// Its configuration.
    pub config: NodeConfig,
    /// This host's VMs.
    pub vms: Registry,
    /// The cluster key and the revocations this node knows.
    pub trust: Arc<Trust>,
    /// Signs the commit records this node makes.
    pub signer: Signer,
    /// Wakes the garbage collector (a snapshot was deleted).
    pub gc_wake: tokio::sync::Notify,
    /// Pages fetched from other members, shared by the fetches running at once.
    pub fetch_share: crate::share::FetchShare,
    /// `Get`s of lazy restores' background push in flight from this node, at most
    /// [`LAZY_PUSH_GETS_IN_FLIGHT`] (see there).
    pub lazy_push_gets: tokio::sync::Semaphore,
    /// Wakes repair (a member was removed).
    pub repair_wake: tokio::sync::Notify,
    /// When each member that is down now was first seen down.
    down_since: std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>,
    membership: Membership,
    client: DataClient,
    busy: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The catalog-sync partners ([`SYNC_PARTNERS`]).
    partners: std::sync::Mutex<Partners>,
    /// Held while VMs of this node are paused for a cut; snapshots' background work waits.
    pub quiet: crate::source::Quiet,
    /// Work that winds down before the node stops.
    pub drain: Drain,
    /// What `--metrics` exports.
    pub metrics: crate::metrics::Metrics,
}

/// The node's work that must wind down, not vanish, when it stops: parts of cuts (their
/// captures cancel and resume their VMs) and restores (a lazy one's guest runs on memory this
/// node serves). [`crate::daemon::run`] calls [`Drain::stop`] on SIGTERM and waits for
/// [`Drain::idle`] before it ends.
#[derive(Default)]
pub struct Drain {
    stopping: tokio::sync::watch::Sender<bool>,
    active: tokio::sync::watch::Sender<usize>,
}

/// Held while one piece of work runs ([`Drain::enter`]).
pub struct DrainGuard<'a>(&'a Drain);

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n -= 1);
    }
}

impl Drain {
    /// Counts a piece of work in until the guard drops; `None` once the node is stopping (the
    /// work must not start).
    pub fn enter(&self) -> Option<DrainGuard<'_>> {
        if *self.stopping.borrow() {
            return None;
        }
        self.active.send_modify(|n| *n += 1);
        Some(DrainGuard(self))
    }

    /// The node is stopping: work in progress winds down, new work is refused.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once the node is stopping.
    pub async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Pieces of work running now.
    pub fn active(&self) -> usize {
        *self.active.borrow()
    }

    /// Waits until no work runs or `limit` passes; returns what still runs.
    pub async fn idle(&self, limit: Duration) -> usize {
        let mut rx = self.active.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        self.active()
    }
}

impl Node {
    /// A node over its parts (see [`crate::daemon::run`]).
    pub fn new(store: Arc<Store>, config: NodeConfig, vms: Registry, trust: Arc<Trust>, signer: Signer, membership: Membership, client: DataClient) -> Self {
        Self { id: membership.local(), store, config, vms, trust, signer, gc_wake: Default::default(), fetch_share: Default::default(), lazy_push_gets: tokio::sync::Semaphore::new(LAZY_PUSH_GETS_IN_FLIGHT), repair_wake: Default::default(), down_since: Default::default(), membership, client, busy: Default::default(), partners: Default::default(), quiet: Default::default(), drain: Default::default(), metrics: Default::default() }
    }

    /// What this host lets a restore launch: QEMU from `--qemu-dir`, its files in the data
    /// directory, `--vm-dir`, a `--launch-dir`, or (the disks a restore wrote) the disk
    /// directory.
    pub fn launch_policy(&self) -> crate::qemu::launch::LaunchPolicy {
        let c = &self.config;
        let mut dirs: Vec<_> = c.vm_dir.iter().cloned().collect();
        dirs.extend(c.launch_dirs.iter().cloned());
        dirs.push(c.disk_dir());
        crate::qemu::launch::LaunchPolicy { qemu_dir: c.qemu_dir.clone(), dirs, own: c.data_dir.clone(), sandbox: c.launch_sandbox }
    }

    /// Notes a member's liveness (for [`Node::is_gone`]).
    pub fn note_liveness(&self, m: &Member) {
        let mut d = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if m.alive {
            d.remove(&m.id);
        } else {
            d.entry(m.id).or_insert_with(std::time::Instant::now);
        }
    }

    /// Whether a member's pages are to be copied elsewhere: it was removed, or it has been
    /// down longer than `--repair-after`.
    pub fn is_gone(&self, id: &NodeId) -> bool {
        self.trust.is_revoked(id)
            || self.down_since.lock().unwrap_or_else(|p| p.into_inner()).get(id).is_some_and(|t| t.elapsed() > self.config.repair_after)
    }

    /// The view that owns pages now: every member that is not gone. A member that is down but
    /// not gone keeps its share (its pages wait for it); a member that joined takes its share
    /// (repair moves it there, garbage collection drops the old copies once it holds them).
    /// Every committed page belongs on its first `replicas` owners in this view.
    pub fn owner_view(&self) -> View {
        View::new(self.members().into_iter().map(|m| m.id).filter(|id| !self.is_gone(id)).collect())
    }

    /// Whether `peer` is an admitted member now (the data plane serves no one else).
    pub fn is_member(&self, peer: &NodeId) -> bool {
        !self.trust.is_revoked(peer) && self.member(peer).is_some()
    }

    /// Applies a revocation: kept in the store, the member dropped on both planes, and (when it
    /// is new here) passed on to every live peer. Returns whether it was new, and how many
    /// peers took it.
    pub async fn revoke(&self, r: &Revocation) -> Result<(bool, usize), AdmitError> {
        let new = crate::admission::revoke(&self.store, &self.trust, r)?;
        self.membership.revoke(r.node);
        self.client.forget(&r.node).await;
        if !new {
            return Ok((false, 0));
        }
        tracing::warn!(target: "vmcsnap::admission", node = %r.node.short(), "member removed from the cluster");
        self.wake_repair();
        let answers = self.ask_peers(DataRequest::Revoke { token: r.to_token() }, PEER_ANSWER_TIMEOUT).await;
        Ok((true, answers.iter().filter(|(_, a)| a.is_ok()).count()))
    }

    /// Pulls the revocations this node lacks from `peer` (a member that was down when one was
    /// made learns it here) and applies them. Returns how many were new.
    async fn revocations_from(&self, peer: &Member) -> usize {
        let Ok(DataResponse::Revocations { tokens }) = self.call(peer, DataRequest::Revocations).await else { return 0 };
        let mut added = 0;
        for t in tokens.iter().take(vmcsnap_protocol::wire::REVOCATIONS_MAX) {
            match Revocation::from_token(t).map_err(AdmitError::from).and_then(|r| crate::admission::revoke(&self.store, &self.trust, &r).map(|n| (r, n))) {
                Ok((r, true)) => {
                    self.membership.revoke(r.node);
                    self.client.forget(&r.node).await;
                    self.wake_repair();
                    added += 1;
                }
                Ok((_, false)) => {}
                Err(e) => tracing::warn!(target: "vmcsnap::admission", peer = %peer.id.short(), error = %e, "peer sent a revocation that does not verify"),
            }
        }
        added
    }

    /// Whether the membership layer still runs.
    pub fn membership_running(&self) -> bool {
        self.membership.is_running()
    }

    /// Every known member (sorted by id), with liveness.
    pub fn members(&self) -> Vec<Member> {
        self.membership.members()
    }

    /// A receiver of every change of the member list.
    pub fn subscribe_members(&self) -> tokio::sync::watch::Receiver<Vec<Member>> {
        self.membership.subscribe()
    }

    /// Members reachable now, this node included.
    pub fn alive_members(&self) -> Vec<Member> {
        self.members().into_iter().filter(|m| m.alive).collect()
    }

    /// Members reachable now, other than this node.
    pub fn alive_peers(&self) -> Vec<Member> {
        self.members().into_iter().filter(|m| m.alive && m.id != self.id).collect()
    }

    /// The member with this id, if known.
    pub fn member(&self, id: &NodeId) -> Option<Member> {
        self.members().into_iter().find(|m| m.id == *id)
    }

    /// A member's name for messages: its `--name`, else its short id.
    pub fn host_name(&self, id: &NodeId) -> String {
        match self.member(id) {
            Some(m) if !m.name.is_empty() => m.name,
            _ => id.short(),
        }
    }

    /// The member an operator means by `host`: its name, or (a prefix of) its node id.
    pub fn find_host(&self, host: &str) -> Result<Member, String> {
        let members = self.members();
        if let Some(m) = members.iter().find(|m| m.name == host) {
            return Ok(m.clone());
        }
        let by_id: Vec<&Member> = members.iter().filter(|m| !host.is_empty() && m.id.to_string().starts_with(host)).collect();
        match by_id.as_slice() {
            [m] => Ok((*m).clone()),
            [] => Err(format!(
                "no member named {host:?} (members: {})",
                members.iter().map(|m| if m.name.is_empty() { m.id.short() } else { m.name.clone() }).collect::<Vec<_>>().join(", ")
            )),
            _ => Err(format!("{host:?} matches several node ids; give more of it")),
        }
    }

    /// Sends `req` to `member`, or answers it here when the member is this node (with the
    /// same handler peers get, so a store failure here is the same error as there). A call to
    /// a member that is down, or goes down while it waits (a hung host: missed pings), fails
    /// at once instead of waiting out its timeouts and retries.
    pub async fn call(&self, member: &Member, req: DataRequest) -> Result<DataResponse, NetError> {
        if member.id == self.id {
            return self.call_inner(member, req).await;
        }
        let mut members = self.subscribe_members();
        let id = member.id;
        let down = async move {
            loop {
                if members.borrow_and_update().iter().any(|m| m.id == id && !m.alive) {
                    return;
                }
                if members.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            r = self.call_inner(member, req) => r,
            () = down => Err(NetError::Unreachable { peer: member.id.short(), addr: member.data_addr, reason: "it is down (missed its pings)".into() }),
        }
    }

    async fn call_inner(&self, member: &Member, req: DataRequest) -> Result<DataResponse, NetError> {
        if member.id == self.id {
            let (store, trust) = (self.store.clone(), self.trust.clone());
            let id = self.id;
            let r = tokio::task::spawn_blocking(move || answer(&store, &trust, id, req, Asker::Local))
                .await
                .map_err(|e| NetError::Transport { peer: "self".into(), reason: e.to_string() })?;
            return r.map_err(|e| match e {
                crate::answer::AnswerError::Store(s) => NetError::Store(s),
                e => NetError::Remote { peer: "self".into(), kind: e.remote_kind(), message: e.to_string() },
            });
        }
        self.client.request(member.id, member.data_addr, &req).await
    }

    /// Sends `req` to every live peer at once (not this node), each within `timeout`.
    pub async fn ask_peers(&self, req: DataRequest, timeout: Duration) -> Vec<(Member, Result<DataResponse, FanOutError>)> {
        let peers = self.alive_peers();
        let answers = fan_out(&peers, timeout, |p| {
            let req = req.clone();
            async move { self.call(&p, req).await }
        })
        .await;
        peers.into_iter().zip(answers).collect()
    }

    /// Opens a conversation stream to `member` (a cut), sending `req` first.
    pub async fn open_session(&self, member: &Member, req: &DataRequest) -> Result<(quinn::SendStream, quinn::RecvStream), NetError> {
        self.client.open_session(member.id, member.data_addr, req).await
    }

    /// Sends `req` to a remote `member` once, waiting up to `timeout` (for work that must not
    /// run twice).
    pub async fn call_within(&self, member: &Member, req: DataRequest, timeout: Duration) -> Result<DataResponse, NetError> {
        self.client.request_within(member.id, member.data_addr, &req, timeout).await
    }

    /// Drops the cached data-plane connection to `peer` (it went down).
    pub async fn forget_connection(&self, peer: &NodeId) {
        self.client.forget(peer).await;
    }

    /// Bytes sent to and received from each member over the connections this node opened,
    /// by member name (its id's short form if its name is unknown), since the node started.
    pub async fn traffic(&self) -> Vec<(String, u64, u64)> {
        let names: std::collections::HashMap<NodeId, String> = self.members().into_iter().map(|m| (m.id, m.name)).collect();
        let mut out: Vec<(String, u64, u64)> = self
            .client
            .traffic()
            .await
            .into_iter()
            .map(|(id, tx, rx)| (names.get(&id).filter(|n| !n.is_empty()).cloned().unwrap_or_else(|| id.short()), tx, rx))
            .collect();
        out.sort();
        out
    }

    /// Closes the data-plane connections idle for [`crate::net::CONNECTION_IDLE`]; returns how
    /// many.
    pub async fn close_idle_connections(&self) -> usize {
        self.client.close_idle(crate::net::CONNECTION_IDLE).await
    }

    /// Closes every data-plane connection (shutdown).
    pub async fn close_connections(&self) {
        self.client.close().await;
    }

    /// Marks a snapshot name as being created here; false if it already is.
    pub fn reserve_name(&self, name: &str) -> bool {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string())
    }

    /// Starts a garbage-collection cycle soon: a deletion arrived (noted for `Stats`, which
    /// `snapshot delete --wait` follows).
    pub fn wake_gc(&self) {
        self.store.gc_changed(vmcsnap_protocol::units::unix_ms());
        self.gc_wake.notify_one();
    }

    /// Starts a repair cycle soon: something it acts on changed (noted for `Stats`, which
    /// `cluster remove --wait` follows).
    pub fn wake_repair(&self) {
        let now = vmcsnap_protocol::units::unix_ms();
        self.store.repair_publish(|r| r.changed_unix_ms = now);
        self.repair_wake.notify_one();
    }

    /// Releases a name taken by [`Node::reserve_name`].
    pub fn release_name(&self, name: &str) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Pulls what this node lacks of the catalog from every live peer whose catalog differs
    /// (see [`Node::sync_with`]). Returns how many commit records were added.
    pub async fn sync_catalog(&self) -> usize {
        self.sync_with(&self.alive_peers()).await.0.records
    }

    /// Syncs with every live peer, like [`Node::sync_catalog`]. Returns how many members now
    /// agree with this node's catalog (this node, each peer whose digest matched and each
    /// peer whose lists were read in full) and how many members are known.
    pub async fn sync_catalog_counted(&self) -> (usize, usize) {
        let members = self.members().len().max(1);
        let (_, agreed) = self.sync_with(&self.alive_peers()).await;
        (1 + agreed, members)
    }

    /// One round of the background catalog sync: [`Node::sync_with`] at most
    /// [`CATALOG_SYNC_FANOUT`] of this node's [`SYNC_PARTNERS`] live partners, picked at random,
    /// so that a round costs the same in a cluster of any size and reuses open connections.
    /// One partner is swapped for a random live peer every [`PARTNER_ROTATION`]. A record,
    /// tombstone or revocation some member lacks reaches it in a few rounds, and the peers
    /// whose catalogs match cost one small answer each.
    pub async fn sync_round(&self) -> Learned {
        let alive = self.alive_peers();
        let ids: Vec<NodeId> = alive.iter().map(|m| m.id).collect();
        let picked = {
            let mut p = self.partners.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            let rotate = p.rotated.is_none_or(|t| now.duration_since(t) >= PARTNER_ROTATION);
            if rotate {
                p.rotated = Some(now);
            }
            p.pick(&ids, rotate, CATALOG_SYNC_FANOUT, &mut rand::rng())
        };
        let picked: Vec<Member> = alive.into_iter().filter(|m| picked.contains(&m.id)).collect();
        self.sync_with(&picked).await.0
    }

    /// Asks each of `peers` for its catalog digest and, from each whose digest differs from
    /// this node's, pulls its revocations, its tombstones and then the commit records this
    /// node lacks (in that order: a record of a removed member or a deleted snapshot is then
    /// refused). Returns what was learned and how many peers agree with this node now (their
    /// digest matched, or their lists were read in full).
    pub async fn sync_with(&self, peers: &[Member]) -> (Learned, usize) {
        if peers.is_empty() {
            return (Learned::default(), 0);
        }
        let store = self.store.clone();
        let own = match tokio::task::spawn_blocking(move || catalog_digest(&store)).await {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                tracing::warn!(target: "vmcsnap::catalog", error = %e, "cannot compute this node's catalog digest; pulling the lists");
                None
            }
            Err(_) => None,
        };
        let digests = fan_out(peers, PEER_ANSWER_TIMEOUT, |p| async move { self.call(&p, DataRequest::CatalogDigest).await }).await;
        let mut agreed = 0;
        let mut differ = Vec::new();
        for (p, d) in peers.iter().zip(digests) {
            match d {
                Ok(DataResponse::CatalogDigest { digest }) if Some(digest) == own => agreed += 1,
                Ok(_) => differ.push(p.clone()),
                Err(e) => tracing::debug!(target: "vmcsnap::catalog", peer = %p.id.short(), error = %e, "no catalog digest"),
            }
        }
        let pulls = fan_out(&differ, CATALOG_PEER_TIMEOUT, |p| async move {
            let revocations = self.revocations_from(&p).await;
            let tombstones = self.tombstones_from(&p).await;
            let records = self.sync_catalog_from(&p).await;
            Ok((revocations, tombstones, records))
        })
        .await;
        let mut learned = Learned::default();
        for (r, t, c) in pulls.into_iter().flatten() {
            learned.revocations += r;
            learned.tombstones += t;
            learned.records += c.unwrap_or(0);
            agreed += usize::from(c.is_some());
        }
        (learned, agreed)
    }

    /// `None` if the peer's list could not be read.
    async fn sync_catalog_from(&self, peer: &Member) -> Option<usize> {
        let Ok(DataResponse::Catalog { entries }) = self.call(peer, DataRequest::CatalogList).await else {
            return None;
        };
        let mut added = 0;
        let mut asked = std::collections::HashSet::new();
        for e in entries {
            let held = self.store.catalog_get(&e.name).unwrap_or_default();
            if held.iter().any(|r| r.is_signed() && r.id().ok() == Some(e.record_hash)) || !asked.insert(e.name.clone()) {
                continue;
            }
            let Ok(DataResponse::Records { records }) = self.call(peer, DataRequest::CatalogGet { name: e.name.clone() }).await else {
                continue;
            };
            for rec in records.into_iter().take(vmcsnap_protocol::manifest::NAME_VERSIONS_MAX) {
                if rec.record.name != e.name {
                    tracing::warn!(target: "vmcsnap::catalog", peer = %peer.id.short(), name = %e.name, "peer sent a record under another name");
                    continue;
                }
                match self.keep_record(&rec) {
                    Ok(crate::store::Kept::New | crate::store::Kept::Signed) => added += 1,
                    Ok(crate::store::Kept::Already | crate::store::Kept::Deleted) => {}
                    Err(err) => tracing::warn!(target: "vmcsnap::catalog", peer = %peer.id.short(), name = %e.name, error = %err, "commit record refused"),
                }
            }
        }
        Some(added)
    }

    /// Checks a record from a peer (its rules, and that an admitted member signed it) and keeps
    /// it. A second record under a name is kept too: a conflict the operator resolves.
    pub fn keep_record(&self, rec: &SignedRecord) -> Result<crate::store::Kept, RecordRefused> {
        rec.validate().map_err(|e| RecordRefused::Invalid(e.to_string()))?;
        self.trust.check_record(rec).map_err(|e| RecordRefused::Invalid(e.to_string()))?;
        let kept = self.store.catalog_put(rec)?;
        if kept == crate::store::Kept::New {
            tracing::info!(target: "vmcsnap::catalog", name = %rec.record.name, by = %self.host_name(&rec.record.initiator), "snapshot recorded");
        }
        if kept == crate::store::Kept::New && self.store.catalog_get(&rec.record.name)?.len() > 1 {
            tracing::warn!(target: "vmcsnap::catalog", name = %rec.record.name, "two members committed different snapshots under one name; `vmcsnap snapshot list` shows both");
        }
        Ok(kept)
    }

    /// The commit record `spec` names: `NAME`, or `NAME@ID` to pick one of several records
    /// under a name. Looks in this node's catalog, then pulls from peers.
    pub async fn find_record(&self, spec: &str) -> Result<CommitRecord, FindError> {
        let (name, pick) = split_pick(spec).map_err(FindError::Invalid)?;
        let mut found = self.store.catalog_get(name)?;
        if found.is_empty() || pick.is_some_and(|p| !found.iter().any(|r| r.id().is_ok_and(|id| id.to_string().starts_with(p)))) {
            self.sync_catalog().await;
            found = self.store.catalog_get(name)?;
        }
        if let Some(p) = pick {
            found.retain(|r| r.id().is_ok_and(|id| id.to_string().starts_with(&p.to_ascii_lowercase())));
        }
        match found.len() {
            0 => Err(FindError::NotFound(spec.to_string())),
            1 => Ok(found.remove(0).record),
            _ => Err(FindError::Conflict {
                name: name.to_string(),
                records: found.iter().map(|r| self.describe(r)).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Checks a tombstone (from a peer or this node) and keeps it: the record it names leaves
    /// the catalog for good. Returns whether it was new here.
    pub fn take_tombstone(&self, t: &SignedTombstone) -> Result<bool, RecordRefused> {
        t.validate().map_err(|e| RecordRefused::Invalid(e.to_string()))?;
        self.trust.check_tombstone(t).map_err(|e| RecordRefused::Invalid(format!("tombstone refused: {e}")))?;
        let new = self.store.tombstone_put(t)?;
        if new {
            tracing::info!(target: "vmcsnap::catalog", name = %t.tombstone.name, record = %short_record_id(&t.tombstone.record),
                by = %self.host_name(&t.tombstone.deleted_by), "snapshot deleted");
            self.wake_gc();
        }
        Ok(new)
    }

    /// Deletes the snapshot record `spec` names (`NAME` or `NAME@ID`) everywhere: a tombstone
    /// signed by this node, kept here and given to every live peer (the others pull it at
    /// their next catalog sync). Returns the deleted record's id and how many peers took it.
    pub async fn delete(&self, spec: &str) -> Result<Deleted, DeleteError> {
        let record = self.find_record(spec).await?;
        let id = record.record_hash().map_err(|e| DeleteError::Internal(e.to_string()))?;
        let now = vmcsnap_protocol::units::unix_ms();
        let t = self.signer.sign_tombstone(&record.name, id, now).map_err(|e| DeleteError::Internal(e.to_string()))?;
        self.take_tombstone(&t).map_err(|e| DeleteError::Internal(e.to_string()))?;
        let answers = self.ask_peers(DataRequest::Delete { tombstone: t }, PEER_ANSWER_TIMEOUT).await;
        let told = answers.iter().filter(|(_, a)| matches!(a, Ok(DataResponse::Ok))).count();
        Ok(Deleted { name: record.name, record: short_record_id(&id), told })
    }

    /// Pulls the tombstones this node lacks from `peer` and applies them (the records they
    /// name are dropped). Returns how many were new.
    async fn tombstones_from(&self, peer: &Member) -> usize {
        let Ok(DataResponse::Tombstones { tombstones }) = self.call(peer, DataRequest::Tombstones).await else { return 0 };
        let mut added = 0;
        for t in tombstones.iter().take(vmcsnap_protocol::wire::TOMBSTONES_MAX) {
            match self.take_tombstone(t) {
                Ok(true) => added += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(target: "vmcsnap::catalog", peer = %peer.id.short(), error = %e, "tombstone refused"),
            }
        }
        added
    }

    /// `NAME@ID (committed by HOST at TIME ms)` for an operator choosing among records.
    fn describe(&self, r: &SignedRecord) -> String {
        let id = r.id().map(|i| short_record_id(&i)).unwrap_or_default();
        format!("{}@{id} (committed by {}, created_unix_ms {})", r.record.name, self.host_name(&r.record.initiator), r.record.created_unix_ms)
    }

    /// This host's VMs, with their status.
    pub async fn local_vms(&self) -> Vec<VmInfo> {
        let list = self.vms.list().unwrap_or_default();
        let statuses = futures::future::join_all(list.iter().map(|(_, qmp, _)| crate::vms::status(qmp))).await;
        list.into_iter()
            .zip(statuses)
            .map(|((id, qmp, origin), status)| VmInfo {
                id,
                qmp: qmp.display().to_string(),
                origin: origin.as_str().into(),
                status,
                host: self.config.name.clone(),
                node: self.id,
            })
            .collect()
    }

    /// Tells the cluster (by SWIM's gossip, [`vmcsnap_dht::state`]) whether this node's disk
    /// is full and which VMs it runs; spreads only what changed. Called every
    /// [`STATE_CHECK_INTERVAL`] and after each change of the VM registry.
    pub fn publish_state(&self) {
        let vms = self.vms.list().unwrap_or_default().into_iter().map(|(id, _, _)| id).collect();
        self.membership.publish_state(self.store.is_full(), vms);
    }

    /// The newest state each node said about itself; a live member missing here has not been
    /// heard of yet (ask it).
    pub fn member_states(&self) -> std::collections::HashMap<NodeId, vmcsnap_dht::state::MemberState> {
        self.membership.states()
    }

    /// The VMs registered on this node and on the live peers that may hold one of `wanted`,
    /// with the names of those peers that did not answer. Only peers whose gossiped state
    /// lists a wanted VM, or whose state is not known yet, are asked: not every member. A VM
    /// registered elsewhere in the last seconds may be missing; [`Node::cluster_vms`] asks
    /// everyone.
    pub async fn find_vms(&self, wanted: &[String]) -> (Vec<VmInfo>, Vec<String>) {
        self.vms_of(self.may_hold(self.alive_peers(), wanted)).await
    }

    /// Those of `members` that may run one of the VMs `wanted`: their gossiped state lists one,
    /// or is not known yet.
    pub fn may_hold(&self, members: Vec<Member>, wanted: &[String]) -> Vec<Member> {
        let states = self.member_states();
        members.into_iter().filter(|m| states.get(&m.id).and_then(|s| s.vms.as_ref()).is_none_or(|vms| vms.iter().any(|v| wanted.contains(v)))).collect()
    }

    /// Every VM registered on a live member (this node included), with its status, and the
    /// names of the live peers that did not answer. Asks every live member.
    pub async fn cluster_vms(&self) -> (Vec<VmInfo>, Vec<String>) {
        self.vms_of(self.alive_peers()).await
    }

    /// This node's VMs and those `peers` list, with the names of the peers that did not answer.
    async fn vms_of(&self, peers: Vec<Member>) -> (Vec<VmInfo>, Vec<String>) {
        let mut out = self.local_vms().await;
        let mut silent = Vec::new();
        let answers = fan_out(&peers, PEER_ANSWER_TIMEOUT, |p| async move { self.call(&p, DataRequest::VmList).await }).await;
        for (p, a) in peers.into_iter().zip(answers) {
            match a {
                Ok(DataResponse::Vms { vms, .. }) => out.extend(vms),
                _ => silent.push(self.host_name(&p.id)),
            }
        }
        out.sort_by(|a, b| (&a.id, &a.host).cmp(&(&b.id, &b.host)));
        (out, silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: u8) -> Member {
        Member { id: NodeId([i; 32]), data_addr: ([127, 0, 0, 1], 7000 + i as u16).into(), alive: true, name: format!("n{i}"), incarnation: 1 }
    }

    #[tokio::test(start_paused = true)]
    async fn fan_out_keeps_order_and_bounds_each_peer() {
        let peers: Vec<Member> = (1..=4).map(member).collect();
        let t0 = tokio::time::Instant::now();
        let answers = fan_out(&peers, Duration::from_secs(3), |p| {
            let i = p.id.0[0];
            async move {
                match i {
                    // A silent peer: counted as timed out, and the others do not wait for it.
                    2 => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok(0)
                    }
                    3 => Err(NetError::Transport { peer: "n3".into(), reason: "broken".into() }),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                        Ok(i)
                    }
                }
            }
        })
        .await;
        assert!(t0.elapsed() <= Duration::from_secs(3) + Duration::from_millis(1), "took {:?}", t0.elapsed());
        assert_eq!(answers.len(), 4);
        assert_eq!(answers[0].as_ref().ok(), Some(&1));
        assert!(matches!(answers[1], Err(FanOutError::TimedOut(d)) if d == Duration::from_secs(3)));
        assert!(matches!(answers[2], Err(FanOutError::Net(NetError::Transport { .. }))));
        assert_eq!(answers[3].as_ref().ok(), Some(&4));
    }

    #[tokio::test]
    async fn fan_out_to_nobody_is_empty() {
        let answers: Vec<Result<(), FanOutError>> = fan_out(&[], Duration::from_secs(1), |_| async { Ok(()) }).await;
        assert!(answers.is_empty());
    }
}

/// The digest of what this node shares of its catalog: the signed commit records (name and
/// record id, as `CatalogList` lists them), the tombstones and the revocations, each set
/// sorted. Two nodes whose digests match hold the same catalog, so a sync between them sends
/// nothing more (see `DataResponse::CatalogDigest`).
pub fn catalog_digest(store: &Store) -> Result<[u8; 32], StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
    let mut records = Vec::new();
    for r in store.catalog_all()?.into_iter().filter(|r| r.is_signed()) {
        let id = r.id().map_err(|e| corrupt(&e))?;
        records.push((r.record.name, id));
    }
    records.sort();
    let mut tombstones = Vec::new();
    for t in store.tombstones()? {
        tombstones.push(t.encode().map_err(|e| corrupt(&e))?);
    }
    tombstones.sort();
    let mut revocations: Vec<String> = crate::admission::revocations(store).map_err(|e| corrupt(&e))?.iter().map(|r| r.to_token()).collect();
    revocations.sort();
    let mut h = blake3::Hasher::new_derive_key("vmcsnap catalog digest v1");
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for n in [records.len(), tombstones.len(), revocations.len()] {
        field(&(n as u64).to_le_bytes());
    }
    for (name, id) in &records {
        field(name.as_bytes());
        field(&id.0);
    }
    for t in &tombstones {
        field(t);
    }
    for r in &revocations {
        field(r.as_bytes());
    }
    Ok(*h.finalize().as_bytes())
}

#[cfg(test)]
mod digest_tests {
    use super::*;
    use vmcsnap_dht::admission::{sign_record, sign_tombstone};
    use vmcsnap_protocol::manifest::{CommitRecord, SignedRecord, Tombstone};

    /// Equal catalogs give equal digests whatever order they were filled in; a record, a
    /// tombstone or an unsigned record changes (or does not change) it as `CatalogList`,
    /// `Tombstones` and `Revocations` would.
    #[test]
    fn the_digest_is_of_the_shared_catalog_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (a, b) = (Store::open(&tmp.path().join("a")).expect("a"), Store::open(&tmp.path().join("b")).expect("b"));
        let cluster = vmcsnap_dht::ClusterKey::generate();
        let key = libp2p::identity::Keypair::generate_ed25519();
        let id = vmcsnap_dht::membership::node_id_of_key(&key.public()).expect("id");
        let cert = cluster.certify(id, "n1", 1).expect("certify");
        let recs: Vec<_> = ["x", "y", "z"].iter().map(|n| sign_record(&key, &cert, CommitRecord::minimal(id, n)).expect("sign")).collect();
        let empty = catalog_digest(&a).expect("digest");
        for r in &recs {
            a.catalog_put(r).expect("put");
        }
        for r in recs.iter().rev() {
            b.catalog_put(r).expect("put");
        }
        assert_ne!(catalog_digest(&a).expect("digest"), empty);
        assert_eq!(catalog_digest(&a).expect("digest"), catalog_digest(&b).expect("digest"));
        // An unsigned record never leaves its node: it does not count.
        b.catalog_put(&SignedRecord { record: CommitRecord::minimal(id, "local"), certificate: String::new(), signature: vec![] }).expect("put");
        assert_eq!(catalog_digest(&a).expect("digest"), catalog_digest(&b).expect("digest"));
        // A tombstone does.
        let t = Tombstone { name: "x".into(), record: recs[0].id().expect("id"), deleted_by: id, deleted_unix_ms: 7 };
        a.tombstone_put(&sign_tombstone(&key, &cert, t).expect("sign")).expect("tombstone");
        assert_ne!(catalog_digest(&a).expect("digest"), catalog_digest(&b).expect("digest"));
    }
}

#[cfg(test)]
mod partner_tests {
    use super::*;

    fn ids(n: u8) -> Vec<NodeId> {
        (1..=n).map(|i| NodeId([i; 32])).collect()
    }

    #[test]
    fn partners_stay_put_rotate_one_at_a_time_and_follow_liveness() {
        let mut rng = rand::rng();
        let alive = ids(40);
        let mut p = Partners::default();
        let first = p.pick(&alive, true, CATALOG_SYNC_FANOUT, &mut rng);
        assert_eq!(first.len(), CATALOG_SYNC_FANOUT);
        assert_eq!(p.ids.len(), SYNC_PARTNERS);
        assert!(first.iter().all(|f| p.ids.contains(f)), "a round asks partners only");
        // Without rotation the partners stay the same.
        let before = p.ids.clone();
        for _ in 0..20 {
            p.pick(&alive, false, CATALOG_SYNC_FANOUT, &mut rng);
        }
        assert_eq!(p.ids, before);
        // A rotation swaps exactly one, for another (it once drew the one it dropped, in
        // about one round of 35 here).
        for _ in 0..200 {
            let before = p.ids.clone();
            p.pick(&alive, true, CATALOG_SYNC_FANOUT, &mut rng);
            assert_eq!(p.ids.len(), SYNC_PARTNERS);
            assert_eq!(p.ids.iter().filter(|i| before.contains(i)).count(), SYNC_PARTNERS - 1);
        }
        // With one peer beyond the partners, a rotation swaps it in.
        let seven = ids(7);
        let mut r = Partners::default();
        r.pick(&seven, false, CATALOG_SYNC_FANOUT, &mut rng);
        let before = r.ids.clone();
        r.pick(&seven, true, CATALOG_SYNC_FANOUT, &mut rng);
        assert_eq!(r.ids.len(), SYNC_PARTNERS);
        assert_eq!(r.ids.iter().filter(|i| before.contains(i)).count(), SYNC_PARTNERS - 1);
        // A partner that goes down is replaced by a live peer at the next round.
        let gone = p.ids[0];
        let alive2: Vec<NodeId> = alive.iter().copied().filter(|i| *i != gone).collect();
        p.pick(&alive2, false, CATALOG_SYNC_FANOUT, &mut rng);
        assert!(!p.ids.contains(&gone));
        assert_eq!(p.ids.len(), SYNC_PARTNERS);
        // A small cluster: every peer is a partner, no duplicates.
        let mut q = Partners::default();
        let small = ids(3);
        let got = q.pick(&small, true, CATALOG_SYNC_FANOUT, &mut rng);
        assert_eq!(q.ids.len(), 3);
        assert_eq!(got.len(), 3);
        assert!(q.pick(&[], true, CATALOG_SYNC_FANOUT, &mut rng).is_empty());
    }
}

#[cfg(test)]
mod relay_tests {
    use super::*;

    /// Hands `group` on from member 0 as [`relay_record`] does (nobody fails); returns how
    /// often each member got it, how many each sent, and the deepest hop.
    fn broadcast(n: usize) -> (Vec<usize>, Vec<usize>, usize) {
        let (mut got, mut sent, mut depth) = (vec![0; n], vec![0; n], 0);
        let mut todo = vec![(0usize, (1..n).collect::<Vec<_>>(), 0usize)];
        while let Some((from, group, hops)) = todo.pop() {
            for (head, rest) in relay_shares(&group) {
                sent[from] += 1;
                got[head] += 1;
                depth = depth.max(hops + 1);
                todo.push((head, rest, hops + 1));
            }
        }
        (got, sent, depth)
    }

    #[test]
    fn a_record_reaches_every_member_once_in_logarithmic_hops() {
        for n in [1, 2, 5, 6, 48, 100, 1000, 10_000] {
            let (got, sent, depth) = broadcast(n);
            assert!(got[1..].iter().all(|g| *g == 1) && got[0] == 0, "{n} members: each gets it exactly once");
            assert_eq!(sent.iter().sum::<usize>(), n - 1, "{n} members: N - 1 messages in all");
            assert!(sent.iter().all(|s| *s <= RECORD_RELAY_FANOUT), "{n} members: nobody sends more than the fan-out");
            // log4 N hops, and one more for shares of uneven size.
            let bound = (n.max(2) as f64).log(RECORD_RELAY_FANOUT as f64).ceil() as usize + 1;
            assert!(depth <= bound, "{n} members: {depth} hops (bound {bound})");
        }
        assert_eq!(relay_shares(&[1, 2, 3, 4, 5, 6, 7]), vec![(1, vec![2]), (3, vec![4]), (5, vec![6]), (7, vec![])]);
    }
}

//! The node: wiring of store, membership, data plane and control socket, and the helpers the
//! engines share (calling a member, finding a snapshot, the placement view).
//!
//! Tasks a running node owns:
//! - the membership swarm (`vmcsnap_dht::Membership`);
//! - the data-plane accept loop ([`crate::server`]), one task per connection and per stream;
//! - the control-socket accept loop ([`crate::control`]), one task per CLI request;
//! - `members-saver`: persists the member list whenever it changes, and drops the data-plane
//!   connection of a member that went down (so its next run gets a fresh one);
//! - `catalog-sync`: every [`CATALOG_SYNC_INTERVAL`], pulls commit records this node lacks
//!   from live members (so a node that was down when a snapshot committed learns of it).

use crate::net::{DataClient, NetError};
use crate::store::Store;
use anyhow::Context;
use futures::future::join_all;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_dht::{Member, Membership, MembershipConfig};
use vmcsnap_protocol::codec;
use vmcsnap_protocol::manifest::CommitRecord;
use vmcsnap_protocol::wire::{DataRequest, DataResponse};
use vmcsnap_protocol::NodeId;

/// How often a node pulls missing commit records from its peers.
pub const CATALOG_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long a catalog question to one peer may take before it is skipped.
pub const CATALOG_PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Default replicas of every page.
pub const DEFAULT_REPLICAS: u8 = 2;
/// Most replicas a snapshot may ask for.
pub const REPLICAS_MAX: u8 = 8;

const MEMBERS_MAGIC: [u8; 4] = *b"VMMB";
const MEMBERS_VERSION: u16 = 2;

/// Validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Data directory (identity, RocksDB, control socket).
    pub data_dir: PathBuf,
    /// Address for libp2p (TCP) and the data plane (UDP).
    pub listen: SocketAddr,
    /// Existing members to join through.
    pub peers: Vec<SocketAddr>,
    /// Replicas of every page for snapshots this node takes.
    pub replicas: u8,
    /// This node's name, shown to operators and used by `restore --on` (default: hostname).
    pub name: String,
    /// A directory of QMP sockets (`ID.qmp`) of this host's VMs, registered as they appear.
    pub vm_dir: Option<PathBuf>,
}

impl NodeConfig {
    /// Checks the values an operator can get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            anyhow::bail!("--replicas must be 1 to {REPLICAS_MAX}, not {}", self.replicas);
        }
        if self.listen.port() == 0 {
            anyhow::bail!("--listen needs an explicit port: peers reach this node there");
        }
        vmcsnap_protocol::manifest::validate_name("--name", &self.name).map_err(|e| anyhow::anyhow!(e))?;
        if let Some(d) = &self.vm_dir {
            if !d.is_absolute() {
                anyhow::bail!("--vm-dir must be an absolute path, not {}", d.display());
            }
        }
        if self.listen.ip().is_unspecified() {
            anyhow::bail!("--listen needs the address peers should use, not {}", self.listen.ip());
        }
        Ok(())
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }
}

/// A running node.
pub struct Node {
    /// This node's identity.
    pub id: NodeId,
    /// Its store.
    pub store: Arc<Store>,
    /// Its configuration.
    pub config: NodeConfig,
    /// This host's VMs.
    pub vms: crate::vms::Registry,
    membership: Membership,
    client: DataClient,
    busy: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedMember {
    id: NodeId,
    addr: SocketAddr,
    name: String,
}

impl Node {
    /// Every known member (sorted by id), with liveness.
    pub fn members(&self) -> Vec<Member> {
        self.membership.members()
    }

    /// Members reachable now, this node included.
    pub fn alive_members(&self) -> Vec<Member> {
        self.members().into_iter().filter(|m| m.alive).collect()
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

    /// Sends `req` to `member`, or serves it here when the member is this node.
    pub async fn call(&self, member: &Member, req: DataRequest) -> Result<DataResponse, NetError> {
        if member.id == self.id {
            let store = self.store.clone();
            let id = self.id;
            return tokio::task::spawn_blocking(move || crate::server::serve(&store, id, req, true))
                .await
                .map_err(|e| NetError::Transport { peer: "self".into(), reason: e.to_string() });
        }
        self.client.request(member.id, member.data_addr, &req).await
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

    /// Marks a snapshot name as being created here; false if it already is.
    pub fn reserve_name(&self, name: &str) -> bool {
        #[allow(clippy::unwrap_used)]
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string())
    }

    /// Releases a name taken by [`Node::reserve_name`].
    pub fn release_name(&self, name: &str) {
        #[allow(clippy::unwrap_used)]
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Pulls commit records this node lacks from every live peer. Returns how many were added.
    pub async fn sync_catalog(&self) -> usize {
        let peers: Vec<Member> = self.alive_members().into_iter().filter(|m| m.id != self.id).collect();
        let added = join_all(peers.iter().map(|p| async move {
            tokio::time::timeout(CATALOG_PEER_TIMEOUT, self.sync_catalog_from(p)).await.unwrap_or(0)
        }))
        .await;
        added.into_iter().sum()
    }

    async fn sync_catalog_from(&self, peer: &Member) -> usize {
        let Ok(DataResponse::Catalog { entries }) = self.call(peer, DataRequest::CatalogList).await else {
            return 0;
        };
        let mut added = 0;
        for e in entries {
            if matches!(self.store.catalog_get(&e.name), Ok(Some(_))) {
                continue;
            }
            if let Ok(DataResponse::Record { record: Some(rec) }) =
                self.call(peer, DataRequest::CatalogGet { name: e.name.clone() }).await
            {
                if rec.name != e.name || rec.validate().is_err() {
                    tracing::warn!(target: "vmcsnap::catalog", peer = %peer.id.short(), name = %e.name, "peer sent an invalid commit record");
                    continue;
                }
                match self.store.catalog_put(&rec) {
                    Ok(true) => added += 1,
                    Ok(false) => {}
                    Err(err) => tracing::warn!(target: "vmcsnap::catalog", name = %e.name, error = %err, "cannot store commit record"),
                }
            }
        }
        added
    }

    /// The commit record of `name`, from this node's catalog or, failing that, from peers.
    pub async fn find_record(&self, name: &str) -> anyhow::Result<Option<CommitRecord>> {
        if let Some(r) = self.store.catalog_get(name)? {
            return Ok(Some(r));
        }
        self.sync_catalog().await;
        Ok(self.store.catalog_get(name)?)
    }
}

fn save_members(store: &Store, members: &[Member]) {
    let saved: Vec<SavedMember> = members.iter().map(|m| SavedMember { id: m.id, addr: m.data_addr, name: m.name.clone() }).collect();
    match codec::encode_record(MEMBERS_MAGIC, MEMBERS_VERSION, &saved) {
        Ok(b) => {
            if let Err(e) = store.save_members(&b) {
                tracing::warn!(target: "vmcsnap::node", error = %e, "cannot save the member list");
            }
        }
        Err(e) => tracing::warn!(target: "vmcsnap::node", error = %e, "cannot encode the member list"),
    }
}

fn load_members(store: &Store) -> anyhow::Result<Vec<Member>> {
    let Some(b) = store.load_members()? else { return Ok(vec![]) };
    let saved: Vec<SavedMember> = codec::decode_record(MEMBERS_MAGIC, "member list", MEMBERS_VERSION, &b)?;
    Ok(saved.into_iter().map(|s| Member { id: s.id, data_addr: s.addr, alive: false, name: s.name }).collect())
}

/// Starts a node and runs it until `shutdown` resolves (or SIGINT/SIGTERM when `None`).
pub async fn run(config: NodeConfig, shutdown: Option<tokio::sync::oneshot::Receiver<()>>) -> anyhow::Result<()> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let keypair = crate::identity::load_or_create(&config.data_dir)?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    let known = load_members(&store).unwrap_or_else(|e| {
        tracing::warn!(target: "vmcsnap::node", error = %e, "ignoring the saved member list");
        vec![]
    });
    // Bind the data plane first: a taken port then fails before anything else starts.
    let endpoint = crate::net::endpoint(&keypair, config.listen)?;
    let membership = Membership::start(MembershipConfig {
        keypair: keypair.clone(),
        listen: config.listen,
        bootstrap: config.peers.clone(),
        known,
        name: config.name.clone(),
    })
    .await?;
    let id = membership.local();
    let control = crate::control::bind(&config.control_socket())?;
    let node = Arc::new(Node {
        id,
        store: store.clone(),
        config: config.clone(),
        client: DataClient::new(endpoint.clone(), keypair),
        vms: crate::vms::Registry::new(store.clone(), config.vm_dir.clone()),
        membership,
        busy: Default::default(),
    });
    tracing::info!(target: "vmcsnap::node", node = %id, listen = %config.listen, dir = %config.data_dir.display(),
        pages = store.page_count(), "node started");
    println!("vmcsnap node {id} listening on {} (control: {})", config.listen, config.control_socket().display());

    let mut tasks = tokio::task::JoinSet::new();
    {
        // A node that died mid-snapshot may have left a VM paused: resume it.
        let node = node.clone();
        tasks.spawn(async move { node.vms.resume_journaled().await });
    }
    {
        let mut rx = node.membership.subscribe();
        let store = store.clone();
        let node = node.clone();
        tasks.spawn(async move {
            let mut last: Vec<(NodeId, SocketAddr)> = vec![];
            let mut was_alive: std::collections::HashSet<NodeId> = Default::default();
            loop {
                let members = rx.borrow_and_update().clone();
                for m in &members {
                    if !m.alive && was_alive.remove(&m.id) {
                        node.client.forget(&m.id).await;
                    } else if m.alive {
                        was_alive.insert(m.id);
                    }
                }
                let now: Vec<(NodeId, SocketAddr)> = members.iter().map(|m| (m.id, m.data_addr)).collect();
                if now != last {
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || save_members(&s, &members)).await;
                    last = now;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    tasks.spawn(crate::server::accept_loop(node.clone(), endpoint.clone()));
    tasks.spawn(crate::control::accept_loop(node.clone(), control));
    {
        let node = node.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(CATALOG_SYNC_INTERVAL);
            loop {
                tick.tick().await;
                let n = node.sync_catalog().await;
                if n > 0 {
                    tracing::info!(target: "vmcsnap::catalog", added = n, "learned snapshots from peers");
                }
            }
        });
    }

    match shutdown {
        Some(rx) => {
            let _ = rx.await;
        }
        None => wait_for_signal().await,
    }
    tracing::info!(target: "vmcsnap::node", "shutting down");
    tasks.abort_all();
    node.client.close().await;
    endpoint.close(crate::net::CLOSE_SHUTDOWN.into(), b"shutdown");
    let _ = std::fs::remove_file(config.control_socket());
    if let Err(e) = store.sync() {
        tracing::warn!(target: "vmcsnap::node", error = %e, "final sync failed");
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

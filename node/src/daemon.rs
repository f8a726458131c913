//! The daemon: builds a [`Node`] from its configuration and runs it, with its background
//! work as named tasks, until shutdown.
//!
//! Tasks a running node owns:
//! - the membership swarm (`vmcsnap_dht::Membership`, its own task);
//! - [`resume_journaled`]: once at start, resumes VMs a crashed capture left paused and sets
//!   their QEMU's migration settings back;
//! - [`crate::engine::lazy::recover_journaled`]: once at start, resumes the lazy restores a
//!   crash left paused in postcopy;
//! - [`watch_members`]: persists the member list whenever it changes, and drops the
//!   data-plane connection of a member that went down (so its next run gets a fresh one);
//! - the data-plane accept loop ([`crate::server::accept_loop`]), one task per connection
//!   and per stream;
//! - the control-socket accept loop ([`crate::control::accept_loop`]), one task per CLI
//!   request;
//! - [`sync_catalog`]: every [`CATALOG_SYNC_INTERVAL`], compares catalog digests with
//!   [`crate::node::CATALOG_SYNC_FANOUT`] of its sync partners and pulls the revocations,
//!   tombstones and commit records this node lacks from those whose digest differs (so a
//!   node that was down when a member was removed or a snapshot committed or deleted learns
//!   of it within a few rounds, at a cost per round that does not grow with the cluster);
//! - garbage collection ([`crate::engine::gc::run`]): a cycle every `--gc-interval`, or at
//!   once when a snapshot is deleted;
//! - the scrubber ([`crate::engine::scrub::run`]): a pass every `--scrub-interval` that reads
//!   back every stored page at `--scrub-rate` and repairs damaged copies from replicas;
//! - repair and rebalance ([`crate::engine::repair::run`]): a cycle every `--repair-interval`,
//!   and at once on a removal, a change of the owner view or newly learned snapshots, that
//!   fetches the pages this node now owns and lacks (those of removed or long-gone members,
//!   its share after it joined or came back).
//!
//! Stopping (SIGTERM, SIGINT): the node refuses new cut parts and restores, aborts the cut
//! parts running here (their captures resume their VMs and set QEMU's migration settings
//! back) and waits up to [`DRAIN_TIMEOUT`] for them and for running restores to end; then the
//! tasks end and the store syncs. What a stop by SIGKILL leaves, the next start undoes.

use crate::config::NodeConfig;
use crate::net::DataClient;
use crate::node::{Node, STATE_CHECK_INTERVAL};
use crate::store::Store;
use crate::vms::Registry;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use vmcsnap_dht::{Member, Membership, MembershipConfig};
use vmcsnap_protocol::codec;
use vmcsnap_protocol::NodeId;

pub use crate::config::CATALOG_SYNC_INTERVAL;

/// How long a stopping node (SIGTERM) waits for the snapshot parts and restores running on it
/// to wind down before it ends anyway. Below systemd's default stop timeout (90 s).
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

const MEMBERS_MAGIC: [u8; 4] = *b"VMMB";
const MEMBERS_VERSION: u16 = 2;

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedMember {
    id: NodeId,
    addr: SocketAddr,
    name: String,
}

/// Starts a node and runs it until `shutdown` resolves (or SIGINT/SIGTERM when `None`).
pub async fn run(config: NodeConfig, shutdown: Option<tokio::sync::oneshot::Receiver<()>>) -> anyhow::Result<()> {
    config.validate()?;
    restrict_dir(&config.data_dir)?;
    let keypair = crate::identity::load_or_create(&config.data_dir)?;
    let id = vmcsnap_dht::membership::node_id_of_key(&keypair.public()).context("the node identity is not an ed25519 key")?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    let (trust, certificate) = crate::admission::admit(&config.data_dir, id, config.cluster_key.as_deref(), config.join.as_deref(), &store)?;
    let mut config = config;
    config.name = crate::admission::name(&certificate, &config.name)?;
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
        trust: trust.clone(),
        certificate: certificate.clone(),
    })
    .await?;
    let control = crate::control::bind(&config.control_socket())?;
    let metrics = match config.metrics {
        Some(addr) => Some(crate::exporter::bind(addr).await?),
        None => None,
    };
    let vms = Registry::new(store.clone(), config.vm_dir.clone());
    store.set_reserve(config.min_free);
    let signer = crate::admission::Signer::new(keypair.clone(), certificate);
    match crate::admission::sign_kept(&store, &signer) {
        Ok(0) => {}
        Ok(n) => tracing::info!(target: "vmcsnap::admission", records = n, "signed the commit records this node made before admission"),
        Err(e) => tracing::warn!(target: "vmcsnap::admission", error = %e, "cannot sign the records kept from before admission"),
    }
    let node = Arc::new(Node::new(store.clone(), config.clone(), vms, trust, signer, membership, DataClient::new(endpoint.clone(), keypair)));
    tracing::info!(target: "vmcsnap::node", node = %node.id, listen = %config.listen, dir = %config.data_dir.display(),
        pages = store.page_count(), "node started");
    println!("vmcsnap node {} listening on {} (control: {})", node.id, config.listen, config.control_socket().display());
    notify_service_manager("READY=1");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(resume_journaled(node.clone()));
    tasks.spawn(crate::engine::lazy::recover_journaled(node.clone()));
    tasks.spawn(watch_members(node.clone()));
    tasks.spawn(crate::server::accept_loop(node.clone(), endpoint.clone()));
    tasks.spawn(crate::control::accept_loop(node.clone(), control));
    tasks.spawn(sync_catalog(node.clone()));
    tasks.spawn(publish_state(node.clone()));
    tasks.spawn(crate::engine::gc::run(node.clone()));
    tasks.spawn(crate::engine::scrub::run(node.clone()));
    tasks.spawn(crate::engine::repair::run(node.clone()));
    if let Some(listener) = metrics {
        tasks.spawn(crate::exporter::serve(node.clone(), listener));
    }
    if let Some(every) = watchdog_interval() {
        tasks.spawn(watchdog(node.clone(), every));
    }

    match shutdown {
        Some(rx) => {
            let _ = rx.await;
        }
        None => wait_for_signal().await,
    }
    tracing::info!(target: "vmcsnap::node", "shutting down");
    notify_service_manager("STOPPING=1");
    // Cuts running here abort (their VMs resume, their settings come back); restores finish.
    node.drain.stop();
    if node.drain.active() > 0 {
        tracing::info!(target: "vmcsnap::node", running = node.drain.active(), limit_s = DRAIN_TIMEOUT.as_secs(), "waiting for snapshot parts and restores to wind down");
        let left = node.drain.idle(DRAIN_TIMEOUT).await;
        if left > 0 {
            tracing::warn!(target: "vmcsnap::node", running = left, "stopping with work still running: a VM left paused is resumed, and a lazy restore recovered, on the next start");
        }
    }
    tasks.abort_all();
    node.close_connections().await;
    endpoint.close(crate::net::CLOSE_SHUTDOWN.into(), b"shutdown");
    let _ = std::fs::remove_file(config.control_socket());
    if let Err(e) = store.sync() {
        tracing::warn!(target: "vmcsnap::node", error = %e, "final sync failed");
    }
    Ok(())
}

/// A node that died mid-snapshot may have left a VM paused: resume it.
async fn resume_journaled(node: Arc<Node>) {
    node.vms.resume_journaled().await;
}

/// Persists the member list whenever it changes; drops the connection of a member that went
/// down or restarted (a new incarnation: a connection to its old process would only time out).
async fn watch_members(node: Arc<Node>) {
    let mut rx = node.subscribe_members();
    let mut last: Vec<(NodeId, SocketAddr)> = vec![];
    let mut was_alive: std::collections::HashSet<NodeId> = Default::default();
    let mut runs: std::collections::HashMap<NodeId, u32> = Default::default();
    loop {
        let members = rx.borrow_and_update().clone();
        for m in &members {
            let restarted = runs.insert(m.id, m.incarnation).is_some_and(|r| r != 0 && r != m.incarnation);
            if (!m.alive && was_alive.remove(&m.id)) || restarted {
                node.forget_connection(&m.id).await;
            }
            if m.alive {
                was_alive.insert(m.id);
            }
            node.note_liveness(m);
        }
        let now: Vec<(NodeId, SocketAddr)> = members.iter().map(|m| (m.id, m.data_addr)).collect();
        if now != last {
            let s = node.store.clone();
            let _ = tokio::task::spawn_blocking(move || save_members(&s, &members)).await;
            last = now;
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
}

/// Every [`CATALOG_SYNC_INTERVAL`], one round of catalog sync with a few of the sync partners
/// ([`Node::sync_round`]): revocations, tombstones and commit records this node lacks. Then
/// the data-plane connections idle for [`crate::net::CONNECTION_IDLE`] are closed (so a node
/// holds connections to the peers it talked to lately, a number that does not grow with the
/// cluster).
async fn sync_catalog(node: Arc<Node>) {
    let mut tick = tokio::time::interval(CATALOG_SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let closed = node.close_idle_connections().await;
        if closed > 0 {
            tracing::debug!(target: "vmcsnap::net", closed, "closed idle data-plane connections");
        }
        let learned = node.sync_round().await;
        if learned.revocations > 0 {
            tracing::warn!(target: "vmcsnap::admission", added = learned.revocations, "learned member removals from peers");
        }
        if learned.tombstones > 0 {
            tracing::info!(target: "vmcsnap::catalog", added = learned.tombstones, "learned snapshot deletions from peers");
        }
        if learned.records > 0 {
            tracing::info!(target: "vmcsnap::catalog", added = learned.records, "learned snapshots from peers");
            // Some may have been placed while this node was away: its share moves here.
            node.wake_repair();
        }
    }
}

/// The data directory holds the node's key and every page it stores: owner-only.
fn restrict_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("cannot make {} owner-only", dir.display()))?;
    Ok(())
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
    Ok(saved.into_iter().map(|s| Member { id: s.id, data_addr: s.addr, alive: false, name: s.name, incarnation: 0 }).collect())
}

/// Tells systemd (a `Type=notify` unit: `$NOTIFY_SOCKET` set) how the node is doing: `READY=1`
/// once it serves, `STOPPING=1` when it begins to stop. Nothing without a service manager.
fn notify_service_manager(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| std::os::unix::net::UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!(target: "vmcsnap::node", error = %e, state, "cannot notify the service manager");
    }
}

/// Tells the cluster whether this node's disk is full and which VMs it runs
/// ([`Node::publish_state`]) every [`STATE_CHECK_INTERVAL`]; only changes are spread.
async fn publish_state(node: Arc<Node>) {
    let mut tick = tokio::time::interval(STATE_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || n.publish_state()).await;
    }
}

/// The watchdog interval the service manager asked for (`WatchdogSec=` in the unit:
/// `$WATCHDOG_USEC`, meant for this process when `$WATCHDOG_PID` is unset or ours).
fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Tells the service manager `WATCHDOG=1` every half interval while the node works: its
/// runtime runs this task, its store answers a read within the half interval, and its
/// membership task runs. A node that stops doing so is restarted by systemd
/// (`Restart=on-failure`).
async fn watchdog(node: Arc<Node>, every: std::time::Duration) {
    let half = every / 2;
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = node.store.clone();
        let store_ok = matches!(tokio::time::timeout(half, tokio::task::spawn_blocking(move || store.page_count())).await, Ok(Ok(_)));
        if store_ok && node.membership_running() {
            notify_service_manager("WATCHDOG=1");
        } else {
            tracing::error!(target: "vmcsnap::node", store_ok, membership = node.membership_running(), "not telling the watchdog: part of the node is stuck");
        }
    }
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

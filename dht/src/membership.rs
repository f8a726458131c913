//! Membership: which nodes are in the cluster, where their data planes listen, and which are
//! reachable now.
//!
//! A libp2p swarm (TCP + noise + yamux) carries three protocols: Kademlia to find members
//! through any address, identify to check a peer's admission when a connection opens, and
//! SWIM ([`crate::swim`], request-response messages) to tell which members are up. A node
//! does not keep a connection to every member: it opens one when it has something to send and
//! closes it after [`CONNECTION_IDLE`] of silence, and what it sends per second does not grow
//! with the cluster (one probe per [`crate::swim::PROBE_PERIOD`], a little gossip).
//!
//! Actor topology: one task owns the swarm and the SWIM state machine. It publishes the member
//! list through a `tokio::sync::watch` channel; readers never block it. It stops when the
//! [`Membership`] is dropped or [`Membership::shutdown`] is called (and then tells a few
//! members that it leaves).
//!
//! A member is a node whose certificate the cluster's [`Trust`] accepts: checked in identify
//! for every connection (a peer without one is disconnected, dropped from Kademlia and not
//! dialled again; a bounded set remembers refused peers) and in every SWIM message for its
//! sender and every member it mentions. A SWIM message must come from the peer the
//! connection authenticated. A revoked member ([`Membership::revoke`]) is dropped at once and
//! refused from then on. Members are otherwise not forgotten by this module (the node persists
//! them); `alive` says whether SWIM counts it up (alive or suspected).

use crate::admission::{Certificate, Trust};
use crate::state::{MemberState, States, STATE_REFRESH};
use crate::swim::{self, Swim, SwimId};
use foca::{AccumulatingRuntime, OwnedNotification, Timer};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::{ed25519, Keypair, PublicKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, kad, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use vmcsnap_protocol::NodeId;

/// identify protocol version; peers with another are not members.
pub const PROTOCOL_VERSION: &str = "/vmcsnap/1.0.0";
/// Kademlia protocol name (a private DHT, apart from the public IPFS one).
pub const KAD_PROTOCOL: &str = "/vmcsnap/kad/1.0.0";
/// SWIM's request-response protocol name.
pub const SWIM_PROTOCOL: &str = "/vmcsnap/swim/1.0.0";
/// libp2p protocol id of a node's state sent straight to a member that came up (it missed the
/// gossip of states that did not change since; [`crate::state`]).
pub const STATE_PROTOCOL: &str = "/vmcsnap/state/1.0.0";
/// How often the membership task checks whether it is alone (then it dials the bootstrap
/// addresses and the members it knows), whether SWIM has stopped its rounds (then it
/// announces itself to a few members, [`swim::reannounce`]) and whether a Kademlia refresh is
/// due.
pub const MAINTENANCE_INTERVAL: Duration = swim::REANNOUNCE_INTERVAL;
/// First wait before dialling again an address that led nowhere while the node is alone; it
/// doubles with each failed dial up to [`REDIAL_BACKOFF_MAX`].
pub const REDIAL_BACKOFF_MIN: Duration = Duration::from_secs(2);
/// Longest wait between two dials of a member that stays unreachable.
pub const REDIAL_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often a node refreshes Kademlia once it has found the cluster (a member that SWIM has
/// not told it about is found then). Kademlia's own periodic refresh is off: this is the only
/// one.
pub const KAD_REFRESH_STEADY: Duration = Duration::from_secs(300);
/// How often identify is repeated on a connection (it runs once when the connection opens,
/// which is when admission is checked).
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(300);
/// A connection that carried nothing for this long is closed (the next message opens one).
/// An idle connection costs no CPU here (no ping, no keep-alive) but a new one costs a
/// handshake: long enough that in a cluster of a hundred most probes find their connection
/// open (each pair of members meets every `members * PROBE_PERIOD`), short enough that a
/// node holds at most about `2 * IDLE / PROBE_PERIOD` (240) of them however large the cluster.
pub const CONNECTION_IDLE: Duration = Duration::from_secs(180);
/// How long one SWIM message may take to be delivered and acknowledged.
pub const SWIM_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping node waits for its goodbye messages to leave.
pub const LEAVE_GRACE: Duration = Duration::from_millis(1500);
/// Most members one node tracks.
pub const MEMBERS_MAX: usize = 4096;
/// Most refused peers remembered (so that they are not dialled again); the oldest is
/// forgotten first.
pub const REFUSED_MAX: usize = 1024;

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its identity.
    pub id: NodeId,
    /// Its QUIC data-plane address (also its libp2p TCP address: same IP and port).
    pub data_addr: SocketAddr,
    /// SWIM counts it up: alive or suspected, not yet declared down (always true for the
    /// local node).
    pub alive: bool,
    /// Its operator-given name (by default its hostname), as its certificate names it.
    pub name: String,
    /// Which run of its process SWIM knows (0 until heard of in this run). A new value
    /// means the process restarted: whatever was connected to the old one is stale.
    pub incarnation: u32,
}

/// What the membership layer needs to start.
pub struct MembershipConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// Address to listen on (TCP for libp2p; the data plane uses UDP on the same address).
    pub listen: SocketAddr,
    /// Addresses of any existing members to join through.
    pub bootstrap: Vec<SocketAddr>,
    /// Members remembered from an earlier run.
    pub known: Vec<Member>,
    /// This node's name, shown to operators (the one its certificate names).
    pub name: String,
    /// What this node trusts: the cluster key and the revocations it knows.
    pub trust: Arc<Trust>,
    /// This node's own admission, shown to every peer.
    pub certificate: Certificate,
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The identity is not ed25519.
    #[error("node identity must be an ed25519 key")]
    NotEd25519,
    /// The swarm could not be built.
    #[error("cannot start libp2p: {0}")]
    Swarm(String),
    /// Could not listen.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    swim: request_response::Behaviour<SwimWire>,
    state: request_response::Behaviour<SwimWire>,
}

/// SWIM messages on a libp2p stream: a request is a 4-byte big-endian length and the message;
/// the answer is one byte (SWIM's own answers travel as requests the other way).
#[derive(Clone, Default)]
struct SwimWire;

impl request_response::Codec for SwimWire {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > swim::MESSAGE_BYTES_MAX {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("SWIM message of {len} bytes")));
        }
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T: futures::AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<()> {
        let mut ack = [0u8; 1];
        io.read_exact(&mut ack).await
    }

    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, req: Vec<u8>) -> std::io::Result<()> {
        let len = u32::try_from(req.len()).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "SWIM message too large"))?;
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, _: ()) -> std::io::Result<()> {
        io.write_all(&[1]).await?;
        io.close().await
    }
}

/// The node id of an ed25519 libp2p public key.
pub fn node_id_of_key(key: &PublicKey) -> Option<NodeId> {
    key.clone().try_into_ed25519().ok().map(|k| NodeId(k.to_bytes()))
}

/// The node id behind a libp2p peer id (peer ids of ed25519 keys embed the key).
pub fn node_id_of_peer(peer: &PeerId) -> Option<NodeId> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None; // not an identity multihash: not an ed25519 key
    }
    let key = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    node_id_of_key(&key)
}

/// The libp2p peer id of a node id.
pub fn peer_of_node_id(id: &NodeId) -> Option<PeerId> {
    let key = ed25519::PublicKey::try_from_bytes(&id.0).ok()?;
    Some(PublicKey::from(key).to_peer_id())
}

fn tcp_multiaddr(addr: SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => Protocol::Ip4(v4),
        IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(addr.port()))
}

fn socket_of(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

/// A running membership layer.
pub struct Membership {
    local: NodeId,
    rx: watch::Receiver<Vec<Member>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    commands: mpsc::UnboundedSender<Command>,
    /// Every node's newest state, as SWIM spreads it.
    states: States,
}

/// What the membership task is told from outside.
enum Command {
    /// A member was removed from the cluster.
    Revoke(NodeId),
    /// What this node says about itself changed (or may have): spread it if so.
    Publish { full: bool, vms: Vec<String> },
}

impl Membership {
    /// Starts the swarm, listens, and begins joining through `bootstrap`.
    pub async fn start(cfg: MembershipConfig) -> Result<Self, MembershipError> {
        let local = node_id_of_key(&cfg.keypair.public()).ok_or(MembershipError::NotEd25519)?;
        let local_peer = cfg.keypair.public().to_peer_id();
        let data_addr = cfg.listen;
        let agent = format!("vmcsnap/{} data={} name={} cert={}", env!("CARGO_PKG_VERSION"), data_addr, cfg.name, cfg.certificate.to_token());
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| MembershipError::Swarm(e.to_string()))?
            .with_behaviour(|key| {
                let id = key.public().to_peer_id();
                let mut kcfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                kcfg.set_periodic_bootstrap_interval(None);
                let mut kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kcfg);
                // On loopback and LANs no external address gets confirmed; serve anyway.
                kad.set_mode(Some(kad::Mode::Server));
                let identify = identify::Behaviour::new(
                    identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                        .with_agent_version(agent.clone())
                        .with_interval(IDENTIFY_INTERVAL),
                );
                let swim = request_response::Behaviour::new(
                    [(StreamProtocol::new(SWIM_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(SWIM_SEND_TIMEOUT),
                );
                let state = request_response::Behaviour::new(
                    [(StreamProtocol::new(STATE_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(SWIM_SEND_TIMEOUT),
                );
                Behaviour { kad, identify, swim, state }
            })
            .map_err(|e| MembershipError::Swarm(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(CONNECTION_IDLE))
            .build();
        swarm.listen_on(tcp_multiaddr(cfg.listen)).map_err(|e| MembershipError::Listen {
            addr: cfg.listen,
            reason: e.to_string(),
        })?;
        // Wait for the listener to be up (or fail) so that callers see bind errors.
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { .. } => break,
                SwarmEvent::ListenerClosed { reason: Err(e), .. } | SwarmEvent::ListenerError { error: e, .. } => {
                    return Err(MembershipError::Listen { addr: cfg.listen, reason: e.to_string() });
                }
                _ => {}
            }
        }

        // Each start is a newer incarnation than the last (SWIM keeps the newer of two
        // identities with the same node id).
        let bump = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0);
        let me = SwimId { cert: cfg.certificate.clone(), data: data_addr, bump };
        let states: States = Default::default();
        let foca = swim::new_swim(me, rand::random(), cfg.trust.clone(), states.clone());
        let state_key = cfg.keypair.clone().try_into_ed25519().map_err(|_| MembershipError::NotEd25519)?;
        let mut state = State {
            local,
            local_peer,
            members: HashMap::new(),
            bootstrap: cfg.bootstrap.clone(),
            trust: cfg.trust.clone(),
            refused: VecDeque::new(),
            refused_set: HashSet::new(),
            redial: HashMap::new(),
            last_refresh: None,
            foca,
            rt: AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            swim_ids: HashMap::new(),
            in_flight: 0,
            swim_connected: false,
            rejoined: false,
            states: states.clone(),
            state_key,
            published: None,
            tell: Vec::new(),
        };
        state.members.insert(local, Member { id: local, data_addr, alive: true, name: cfg.name.clone(), incarnation: bump });
        for m in cfg.known {
            if m.id != local && state.members.len() < MEMBERS_MAX && !cfg.trust.is_revoked(&m.id) {
                if let Some(peer) = peer_of_node_id(&m.id) {
                    swarm.behaviour_mut().kad.add_address(&peer, tcp_multiaddr(m.data_addr));
                }
                state.members.insert(m.id, Member { alive: false, incarnation: 0, ..m });
            }
        }
        let (tx, rx) = watch::channel(state.snapshot());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(swarm, state, tx, stop_rx, cmd_rx));
        Ok(Self { local, rx, stop: Some(stop_tx), task: Some(task), commands: cmd_tx, states })
    }

    /// Drops `node` from the members and disconnects it; its certificate is refused from now
    /// on (the caller has recorded the revocation in the [`Trust`]).
    pub fn revoke(&self, node: NodeId) {
        let _ = self.commands.send(Command::Revoke(node));
    }

    /// Spreads what this node says about itself ([`crate::state`]) if it differs from what it
    /// last said (and again every [`STATE_REFRESH`] anyway). Cheap to call often.
    pub fn publish_state(&self, full: bool, mut vms: Vec<String>) {
        vms.sort();
        let _ = self.commands.send(Command::Publish { full, vms });
    }

    /// The newest state heard of each node (this one included, once published). A member
    /// missing here has not been heard of yet: ask it.
    pub fn states(&self) -> HashMap<NodeId, MemberState> {
        self.states.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The local node's id.
    pub fn local(&self) -> NodeId {
        self.local
    }

    /// Every known member, sorted by id, with liveness.
    pub fn members(&self) -> Vec<Member> {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every change of the member list.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.rx.clone()
    }

    /// Whether the membership task still runs (it ends only when told to, or by a bug).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the swarm and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct State {
    local: NodeId,
    local_peer: PeerId,
    members: HashMap<NodeId, Member>,
    bootstrap: Vec<SocketAddr>,
    trust: Arc<Trust>,
    /// Peers refused admission, oldest first (at most [`REFUSED_MAX`]).
    refused: VecDeque<PeerId>,
    refused_set: HashSet<PeerId>,
    /// While the node is alone: when each known member (or, under the local id, the bootstrap
    /// list) may be dialled next, and the wait after that dial.
    redial: HashMap<NodeId, (tokio::time::Instant, Duration)>,
    /// The last Kademlia refresh.
    last_refresh: Option<tokio::time::Instant>,
    /// The SWIM state machine and what it asked for (messages, timers, notifications).
    foca: Swim,
    rt: AccumulatingRuntime<SwimId>,
    /// SWIM's timers by due time (the sequence number keeps equal times apart).
    timers: BTreeMap<(tokio::time::Instant, u64), Timer<SwimId>>,
    timer_seq: u64,
    /// The SWIM identity (certificate, address, incarnation) of each member heard of.
    swim_ids: HashMap<NodeId, SwimId>,
    /// SWIM messages sent and not yet acknowledged or failed.
    in_flight: usize,
    /// Whether SWIM runs its probe and gossip rounds ([`swim::connected_after`]); while it
    /// does not, the node announces itself to a few members it knows ([`swim::reannounce`]).
    swim_connected: bool,
    /// SWIM just gave this node a new identity: announce it at once.
    rejoined: bool,
    /// Every node's newest state (shared with SWIM's handler and [`Membership::states`]).
    states: States,
    /// Signs this node's state.
    state_key: ed25519::Keypair,
    /// What this node last published: its state, seq, when, and the signed item.
    published: Option<Published>,
    /// Members that came up (or restarted) since the last drain: they get this node's state
    /// straight away.
    tell: Vec<SwimId>,
}

/// This node's last published state.
struct Published {
    full: bool,
    vms: Vec<String>,
    seq: u64,
    at: tokio::time::Instant,
    item: Vec<u8>,
}

impl State {
    /// Remembers a refused peer; true if it was not refused before.
    fn note_refused(&mut self, peer: PeerId) -> bool {
        if !self.refused_set.insert(peer) {
            return false;
        }
        self.refused.push_back(peer);
        if self.refused.len() > REFUSED_MAX {
            if let Some(old) = self.refused.pop_front() {
                self.refused_set.remove(&old);
            }
        }
        true
    }

    fn snapshot(&self) -> Vec<Member> {
        let mut v: Vec<Member> = self.members.values().cloned().collect();
        v.sort_by_key(|m| m.id);
        v
    }

    /// Whether SWIM counts `id` up.
    fn is_up(&self, id: &NodeId) -> bool {
        self.members.get(id).is_some_and(|m| m.alive)
    }

    /// Records what SWIM learned; returns whether the member list changed.
    fn learn(&mut self, n: OwnedNotification<SwimId>) -> bool {
        self.swim_connected = swim::connected_after(&n, self.swim_connected);
        if let OwnedNotification::MemberUp(sid) | OwnedNotification::Rename(_, sid) = &n {
            if sid.node() != self.local && self.tell.len() < MEMBERS_MAX {
                self.tell.push(sid.clone());
            }
        }
        match n {
            OwnedNotification::MemberUp(sid) => self.up(sid),
            OwnedNotification::MemberDown(sid) => {
                let id = sid.node();
                if self.swim_ids.get(&id).is_some_and(|s| s.bump > sid.bump) {
                    return false; // news of an older run
                }
                match self.members.get_mut(&id) {
                    Some(m) if id != self.local && m.alive => {
                        m.alive = false;
                        tracing::info!(target: "vmcsnap::membership", node = %id.short(), name = %m.name, "member down");
                        true
                    }
                    _ => false,
                }
            }
            OwnedNotification::Rename(_, sid) => {
                let id = sid.node();
                let alive = self.is_up(&id);
                self.swim_ids.insert(id, sid.clone());
                match self.members.get_mut(&id) {
                    Some(m) if m.data_addr != sid.data || m.name != sid.cert.name || m.incarnation != sid.bump => {
                        m.data_addr = sid.data;
                        m.name = sid.cert.name.clone();
                        m.alive = alive;
                        m.incarnation = sid.bump;
                        true
                    }
                    _ => false,
                }
            }
            OwnedNotification::Rejoin(sid) => {
                tracing::info!(target: "vmcsnap::membership", incarnation = sid.bump, "this node was declared down; rejoined as a newer incarnation");
                self.rejoined = true;
                false
            }
            OwnedNotification::Idle => {
                tracing::info!(target: "vmcsnap::membership", "no member is reachable");
                false
            }
            OwnedNotification::Active | OwnedNotification::Defunct => false,
        }
    }

    fn up(&mut self, sid: SwimId) -> bool {
        let id = sid.node();
        if id == self.local || self.trust.is_revoked(&id) {
            return false;
        }
        if self.swim_ids.get(&id).is_some_and(|s| s.bump > sid.bump) {
            return false;
        }
        self.swim_ids.insert(id, sid.clone());
        let new = Member { id, data_addr: sid.data, alive: true, name: sid.cert.name.clone(), incarnation: sid.bump };
        match self.members.get(&id) {
            Some(m) if *m == new => false,
            Some(m) => {
                if !m.alive {
                    tracing::info!(target: "vmcsnap::membership", node = %id.short(), name = %new.name, "member up");
                }
                self.members.insert(id, new);
                true
            }
            None if self.members.len() >= MEMBERS_MAX => {
                tracing::warn!(target: "vmcsnap::membership", "member limit {MEMBERS_MAX} reached; ignoring {id}");
                false
            }
            None => {
                tracing::info!(target: "vmcsnap::membership", node = %id.short(), data_addr = %sid.data, name = %new.name, "member joined");
                tracing::info!(target: "vmcsnap::membership", node = %id.short(), name = %new.name, "member up");
                self.members.insert(id, new);
                true
            }
        }
    }
}

/// Carries out what SWIM asked for: sends its messages, arms its timers, applies its news.
/// Returns whether the member list changed.
fn drain(swarm: &mut Swarm<Behaviour>, st: &mut State) -> bool {
    let mut changed = false;
    loop {
        while let Some((to, msg)) = st.rt.to_send() {
            let Some(peer) = peer_of_node_id(&to.node()) else { continue };
            if st.refused_set.contains(&peer) || peer == st.local_peer {
                continue;
            }
            swarm.behaviour_mut().swim.send_request_with_addresses(&peer, msg.to_vec(), vec![tcp_multiaddr(to.data)]);
            st.in_flight += 1;
        }
        let now = tokio::time::Instant::now();
        while let Some((after, timer)) = st.rt.to_schedule() {
            st.timer_seq += 1;
            st.timers.insert((now + after, st.timer_seq), timer);
        }
        while let Some(n) = st.rt.to_notify() {
            changed |= st.learn(n);
        }
        for sid in std::mem::take(&mut st.tell) {
            if let (Some(p), Some(peer)) = (&st.published, peer_of_node_id(&sid.node())) {
                swarm.behaviour_mut().state.send_request_with_addresses(&peer, p.item.clone(), vec![tcp_multiaddr(sid.data)]);
            }
        }
        if !std::mem::take(&mut st.rejoined) {
            return changed;
        }
        swim::reannounce(&mut st.foca, st.swim_ids.values(), &mut st.rt);
    }
}

/// Runs SWIM's due timers.
fn fire_timers(st: &mut State) {
    let now = tokio::time::Instant::now();
    while let Some(entry) = st.timers.first_entry() {
        if entry.key().0 > now {
            break;
        }
        let timer = entry.remove();
        if let Err(e) = st.foca.handle_timer(timer, &mut st.rt) {
            tracing::debug!(target: "vmcsnap::membership", error = %e, "SWIM timer");
        }
    }
}

fn parse_agent(agent: &str) -> Option<SocketAddr> {
    agent.split_whitespace().find_map(|w| w.strip_prefix("data=")).and_then(|a| a.parse().ok())
}

fn agent_cert(agent: &str) -> Option<&str> {
    agent.split_whitespace().find_map(|w| w.strip_prefix("cert="))
}

/// Disconnects a peer that is not (or no longer) admitted, forgets it as a member and as a
/// Kademlia contact, and remembers not to dial it. Returns whether the member list changed.
fn refuse(swarm: &mut Swarm<Behaviour>, st: &mut State, peer: PeerId, why: &str) -> bool {
    if st.note_refused(peer) {
        tracing::warn!(target: "vmcsnap::membership", %peer, reason = why, "refusing a peer that is not admitted");
    } else {
        tracing::debug!(target: "vmcsnap::membership", %peer, reason = why, "refusing a peer that is not admitted");
    }
    let _ = swarm.disconnect_peer_id(peer);
    swarm.behaviour_mut().kad.remove_peer(&peer);
    match node_id_of_peer(&peer) {
        Some(id) if id != st.local => {
            st.redial.remove(&id);
            if let Some(sid) = st.swim_ids.remove(&id) {
                // Tell SWIM (and through it the others) that it is gone.
                let _ = st.foca.apply_many(std::iter::once(foca::Member::down(sid)), true, &mut st.rt);
            }
            st.members.remove(&id).is_some()
        }
        _ => false,
    }
}

async fn run(
    mut swarm: Swarm<Behaviour>,
    mut st: State,
    tx: watch::Sender<Vec<Member>>,
    mut stop: oneshot::Receiver<()>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_timer = st.timers.first_key_value().map(|(k, _)| k.0);
        let timer_due = async {
            match next_timer {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let mut changed = tokio::select! {
            _ = &mut stop => break,
            Some(cmd) = commands.recv() => match cmd {
                Command::Revoke(id) => {
                    st.states.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    match peer_of_node_id(&id) {
                        Some(peer) if id != st.local => refuse(&mut swarm, &mut st, peer, "removed from the cluster"),
                        _ => false,
                    }
                }
                Command::Publish { full, vms } => {
                    if st.published.as_ref().is_none_or(|p| p.full != full || p.vms != vms) {
                        publish(&mut st, full, vms);
                    }
                    false
                }
            },
            _ = tick.tick() => { maintain(&mut swarm, &mut st); false }
            _ = timer_due => { fire_timers(&mut st); false }
            ev = swarm.select_next_some() => handle(&mut swarm, &mut st, ev),
        };
        changed |= drain(&mut swarm, &mut st);
        if changed {
            tx.send_replace(st.snapshot());
        }
    }
    leave(&mut swarm, &mut st).await;
    tracing::debug!(target: "vmcsnap::membership", "membership stopped");
}

/// Tells a few members that this node leaves (they spread it), and waits a moment for the
/// messages to go out.
async fn leave(swarm: &mut Swarm<Behaviour>, st: &mut State) {
    if st.foca.num_members() == 0 {
        return;
    }
    let _ = st.foca.leave_cluster(&mut st.rt);
    drain(swarm, st);
    let _ = tokio::time::timeout(LEAVE_GRACE, async {
        while st.in_flight > 0 {
            let ev = swarm.select_next_some().await;
            if let SwarmEvent::Behaviour(BehaviourEvent::Swim(e)) = ev {
                if matches!(e, request_response::Event::Message { message: request_response::Message::Response { .. }, .. } | request_response::Event::OutboundFailure { .. }) {
                    st.in_flight = st.in_flight.saturating_sub(1);
                }
            }
        }
    })
    .await;
}

/// Signs this node's state with a new seq and hands it to SWIM to spread.
fn publish(st: &mut State, full: bool, vms: Vec<String>) {
    // Newer than anything an earlier run of this node published (milliseconds since the
    // epoch), and growing within this run.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let seq = st.published.as_ref().map_or(now_ms, |p| now_ms.max(p.seq + 1));
    let state = MemberState { node: st.local, seq, full, vms: Some(vms.clone()) };
    let item = match crate::state::sign(&st.state_key, state) {
        Ok(item) => item,
        Err(e) => {
            tracing::warn!(target: "vmcsnap::membership", error = %e, "cannot sign this node's state");
            return;
        }
    };
    if let Err(e) = st.foca.add_broadcast(&item) {
        tracing::warn!(target: "vmcsnap::membership", error = %e, "cannot spread this node's state");
    }
    st.published = Some(Published { full, vms, seq, at: tokio::time::Instant::now(), item });
}

fn maintain(swarm: &mut Swarm<Behaviour>, st: &mut State) {
    let now = tokio::time::Instant::now();
    if let Some(p) = &st.published {
        if now >= p.at + STATE_REFRESH {
            let (full, vms) = (p.full, p.vms.clone());
            publish(st, full, vms);
        }
    }
    if !st.swim_connected {
        // SWIM sends nothing by itself now (alone, or just rejoined): tell a few members.
        swim::reannounce(&mut st.foca, st.swim_ids.values(), &mut st.rt);
    }
    if st.foca.num_members() > 0 {
        // In the cluster: SWIM keeps the view. Kademlia rarely looks for members SWIM has not
        // told this node of.
        st.redial.clear();
        if st.last_refresh.is_none_or(|t| now >= t + KAD_REFRESH_STEADY) {
            st.last_refresh = Some(now);
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }
        return;
    }
    // Alone (just started, or cut off): dial the members known from before and the bootstrap
    // addresses, each with its own backoff. A connection's identify leads to a SWIM announce.
    let due = |st: &mut State, id: NodeId| {
        let (next, wait) = st.redial.entry(id).or_insert((now, REDIAL_BACKOFF_MIN));
        if now < *next {
            return false;
        }
        *next = now + *wait;
        *wait = (*wait * 2).min(REDIAL_BACKOFF_MAX);
        true
    };
    let known: Vec<(NodeId, SocketAddr)> = st.members.values().filter(|m| m.id != st.local).map(|m| (m.id, m.data_addr)).collect();
    for (id, addr) in known {
        let Some(peer) = peer_of_node_id(&id) else { continue };
        if st.refused_set.contains(&peer) || !due(st, id) {
            continue;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(vec![tcp_multiaddr(addr)]).build();
        let _ = swarm.dial(opts);
    }
    let local = st.local;
    if !st.bootstrap.is_empty() && due(st, local) {
        for addr in st.bootstrap.clone() {
            let _ = swarm.dial(tcp_multiaddr(addr));
        }
    }
}

fn handle(swarm: &mut Swarm<Behaviour>, st: &mut State, ev: SwarmEvent<BehaviourEvent>) -> bool {
    match ev {
        SwarmEvent::Behaviour(BehaviourEvent::Swim(ev)) => {
            on_swim(swarm, st, ev);
            false
        }
        SwarmEvent::Behaviour(BehaviourEvent::State(request_response::Event::Message { peer, message: request_response::Message::Request { request, channel, .. }, .. })) => {
            let _ = swarm.behaviour_mut().state.send_response(channel, ());
            // A member's own state, kept and not spread again (the sender tells each member that
            // comes up itself).
            let sender = node_id_of_peer(&peer).filter(|id| st.members.contains_key(id) && !st.refused_set.contains(&peer));
            if let Some(id) = sender {
                if let Err(e) = crate::state::accept(&st.trust, &st.states, &request, |n| *n == id) {
                    tracing::debug!(target: "vmcsnap::membership", %peer, error = %e, "member state refused");
                }
            }
            false
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
            if info.protocol_version != PROTOCOL_VERSION {
                tracing::warn!(target: "vmcsnap::membership", %peer_id, version = %info.protocol_version, "peer is not a vmcsnap node; ignoring");
                return false;
            }
            let (Some(id), Some(data_addr)) = (node_id_of_key(&info.public_key), parse_agent(&info.agent_version)) else {
                tracing::warn!(target: "vmcsnap::membership", %peer_id, agent = %info.agent_version, "peer sent no usable identity or data address");
                return refuse(swarm, st, peer_id, "no usable identity or data address");
            };
            let admitted = match agent_cert(&info.agent_version) {
                None => Err("no certificate".to_string()),
                Some(tok) => Certificate::from_token(tok).and_then(|c| st.trust.check(&c, &id).map(|_| c)).map_err(|e| e.to_string()),
            };
            let cert = match admitted {
                Ok(c) => c,
                Err(why) => return refuse(swarm, st, peer_id, &why),
            };
            for a in &info.listen_addrs {
                if socket_of(a).is_some() {
                    swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                }
            }
            if !st.is_up(&id) {
                // A member SWIM does not count up: introduce ourselves (it answers with the
                // members it knows). Announces go to any incarnation of its node id.
                let _ = st.foca.announce(SwimId { cert, data: data_addr, bump: 0 }, &mut st.rt);
                if st.last_refresh.is_none() {
                    st.last_refresh = Some(tokio::time::Instant::now());
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
            }
            false
        }
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. })) => {
            if st.refused_set.contains(&peer) {
                swarm.behaviour_mut().kad.remove_peer(&peer);
            }
            false
        }
        _ => false,
    }
}

fn on_swim(swarm: &mut Swarm<Behaviour>, st: &mut State, ev: request_response::Event<Vec<u8>, ()>) {
    match ev {
        request_response::Event::Message { peer, message: request_response::Message::Request { request, channel, .. }, .. } => {
            let _ = swarm.behaviour_mut().swim.send_response(channel, ());
            if st.refused_set.contains(&peer) {
                return;
            }
            // The message must be the authenticated peer's own (its certificate is checked
            // while decoding).
            if swim::sender_of(&request) != node_id_of_peer(&peer) {
                tracing::debug!(target: "vmcsnap::membership", %peer, "SWIM message naming another sender; dropped");
                return;
            }
            if let Err(e) = st.foca.handle_data(&request, &mut st.rt) {
                tracing::debug!(target: "vmcsnap::membership", %peer, error = %e, "SWIM message refused");
            }
        }
        request_response::Event::Message { message: request_response::Message::Response { .. }, .. } => {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        request_response::Event::OutboundFailure { peer, error, .. } => {
            st.in_flight = st.in_flight.saturating_sub(1);
            tracing::debug!(target: "vmcsnap::membership", %peer, %error, "SWIM message not delivered");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_peer_ids() {
        let kp = Keypair::generate_ed25519();
        let id = node_id_of_key(&kp.public()).expect("ed25519");
        let peer = peer_of_node_id(&id).expect("valid key");
        assert_eq!(peer, kp.public().to_peer_id());
        assert_eq!(node_id_of_peer(&peer), Some(id));
    }

    #[test]
    fn agent_carries_the_data_address() {
        assert_eq!(parse_agent("vmcsnap/0.1.0 data=127.0.0.1:7000"), Some("127.0.0.1:7000".parse().expect("addr")));
        assert_eq!(parse_agent("rust-libp2p/0.1"), None);
        assert_eq!(agent_cert("vmcsnap/0.1.0 data=127.0.0.1:7000 name=kvm-07 cert=abcd"), Some("abcd"));
        assert_eq!(agent_cert("vmcsnap/0.1.0 data=127.0.0.1:7000"), None);
    }

    fn free_listen() -> SocketAddr {
        let p = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        format!("127.0.0.1:{p}").parse().expect("addr")
    }

    /// Starts a node admitted by `key` (or, with `None`, one with a certificate of another
    /// cluster), trusting `trust_key`'s cluster.
    async fn start(key: Option<&crate::ClusterKey>, trust_key: &crate::ClusterKey, name: &str, bootstrap: Vec<SocketAddr>) -> (Membership, Arc<Trust>) {
        let keypair = Keypair::generate_ed25519();
        let id = node_id_of_key(&keypair.public()).expect("ed25519");
        let certificate = match key {
            Some(k) => k.certify(id, name, 1).expect("certify"),
            None => crate::ClusterKey::generate().certify(id, name, 1).expect("certify"),
        };
        let trust = Arc::new(Trust::new(trust_key.id()).expect("trust"));
        let m = Membership::start(MembershipConfig { keypair, listen: free_listen(), bootstrap, known: vec![], name: name.into(), trust: trust.clone(), certificate })
            .await
            .expect("start");
        (m, trust)
    }

    async fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn three_nodes_find_each_other_through_one() {
        let key = crate::ClusterKey::generate();
        let (first, _) = start(Some(&key), &key, "a", vec![]).await;
        let boot = first.members()[0].data_addr;
        let mut nodes = vec![first];
        for name in ["b", "c"] {
            nodes.push(start(Some(&key), &key, name, vec![boot]).await.0);
        }
        wait("every node sees three alive members", || nodes.iter().all(|n| n.members().iter().filter(|m| m.alive).count() == 3)).await;
        // What each says about itself reaches the others by gossip, and so does a change.
        for (i, n) in nodes.iter().enumerate() {
            n.publish_state(false, vec![format!("vm{i}")]);
        }
        let says = |n: &Membership, of: &Membership, full: bool, vm: &str| n.states().get(&of.local()).is_some_and(|s| s.full == full && s.vms.as_deref() == Some(&[vm.to_string()][..]));
        wait("every node knows every node's VMs", || nodes.iter().all(|n| nodes.iter().enumerate().all(|(i, of)| says(n, of, false, &format!("vm{i}"))))).await;
        nodes[2].publish_state(true, vec!["vm2".into()]);
        wait("every node knows the third is full", || nodes.iter().all(|n| says(n, &nodes[2], true, "vm2"))).await;
        // Names are the ones the cluster key signed.
        let mut names: Vec<String> = nodes[0].members().into_iter().map(|m| m.name).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        // A node that joins later learns the states that no longer spread: each member sends
        // its own to a member that comes up.
        let late = start(Some(&key), &key, "d", vec![boot]).await.0;
        wait("the late node knows every state", || says(&late, &nodes[0], false, "vm0") && says(&late, &nodes[1], false, "vm1") && says(&late, &nodes[2], true, "vm2")).await;
        late.shutdown().await;
        // Stop one: the others see it go.
        let gone = nodes.pop().expect("node");
        let gone_id = gone.local();
        gone.shutdown().await;
        wait("the stopped node is seen down", || nodes.iter().all(|n| n.members().iter().any(|m| m.id == gone_id && !m.alive))).await;
    }

    #[tokio::test]
    async fn strangers_and_revoked_members_are_never_members() {
        let key = crate::ClusterKey::generate();
        let (a, trust_a) = start(Some(&key), &key, "a", vec![]).await;
        let boot = a.members()[0].data_addr;
        let (b, _) = start(Some(&key), &key, "b", vec![boot]).await;
        // A node with another cluster's certificate (it trusts our cluster, so it would take us).
        let (stranger, _) = start(None, &key, "x", vec![boot]).await;
        wait("a and b see each other", || a.members().iter().filter(|m| m.alive).count() == 2 && b.members().iter().filter(|m| m.alive).count() == 2).await;
        // Give the stranger time to dial and identify, again and again.
        tokio::time::sleep(MAINTENANCE_INTERVAL * 2).await;
        for n in [&a, &b] {
            assert!(!n.members().iter().any(|m| m.id == stranger.local()), "the stranger became a member");
        }
        assert_eq!(stranger.members().iter().filter(|m| m.alive).count(), 1, "nobody took the stranger in");
        // Revoked: dropped at once, and not taken back when it dials in again.
        assert_eq!(trust_a.revoke(&key.revoke(b.local())), Ok(true));
        a.revoke(b.local());
        wait("a drops b", || !a.members().iter().any(|m| m.id == b.local())).await;
        tokio::time::sleep(MAINTENANCE_INTERVAL * 2).await;
        assert!(!a.members().iter().any(|m| m.id == b.local()), "the revoked member came back");
        stranger.shutdown().await;
        b.shutdown().await;
        a.shutdown().await;
    }
}

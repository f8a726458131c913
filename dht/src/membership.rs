//! Membership: which nodes are in the cluster, where their data planes listen, and which are
//! reachable now.
//!
//! A libp2p swarm (TCP + noise + yamux) runs Kademlia for discovery, identify to learn each
//! peer's key and data-plane address, and ping to notice a dead peer within seconds. Every
//! node keeps a connection to every member it knows of (clusters are tens to hundreds of hosts;
//! placement needs the whole view anyway).
//!
//! Actor topology: one task owns the swarm. It publishes the member list through a
//! `tokio::sync::watch` channel; readers never block it. It stops when the [`Membership`] is
//! dropped or [`Membership::shutdown`] is called.
//!
//! A member is a peer that completed identify with protocol [`PROTOCOL_VERSION`] and presented
//! (in its agent string) a [`Certificate`] that the cluster's [`Trust`] accepts. Any other
//! peer is disconnected, dropped from Kademlia's routing table and not dialled again (a
//! bounded set of refused peers remembers them). A revoked member ([`Membership::revoke`]) is
//! dropped at once and refused from then on. Members are otherwise not forgotten by this
//! module (the node persists them); `alive` says whether a connection to it is up.

use crate::admission::{Certificate, Trust};
use futures::StreamExt;
use libp2p::identity::{ed25519, Keypair, PublicKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, kad, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use vmcsnap_protocol::NodeId;

/// identify protocol version; peers with another are not members.
pub const PROTOCOL_VERSION: &str = "/vmcsnap/1.0.0";
/// Kademlia protocol name (a private DHT, apart from the public IPFS one).
pub const KAD_PROTOCOL: &str = "/vmcsnap/kad/1.0.0";
/// How often the membership task looks for members to re-dial and for a Kademlia refresh due.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);
/// First wait before re-dialling a member whose connection went down; it doubles with each
/// failed dial up to [`REDIAL_BACKOFF_MAX`], so a member that is gone for good costs a dial a
/// minute, not one every [`MAINTENANCE_INTERVAL`].
pub const REDIAL_BACKOFF_MIN: Duration = Duration::from_secs(2);
/// Longest wait between two dials of a member that stays unreachable.
pub const REDIAL_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long after its start or its first connection a node refreshes Kademlia every
/// [`MAINTENANCE_INTERVAL`], to find every member quickly. Only the joining node does: the
/// members learn of it when it dials them. (Settling on every new member as well made every
/// node refresh every 2 s for as long as nodes kept joining; with 50 and more nodes starting
/// one after another on two cores that starved the nodes until healthy members were declared
/// down.)
pub const SETTLING: Duration = Duration::from_secs(30);
/// How often a node refreshes Kademlia when its membership has been quiet for [`SETTLING`]
/// (a member that joined while this node was cut off is found then, if it did not dial this
/// node itself). Kademlia's own periodic refresh is off: this is the only one.
pub const KAD_REFRESH_STEADY: Duration = Duration::from_secs(300);
/// Ping interval (per connected member: a node sends `members / PING_INTERVAL` pings a second).
pub const PING_INTERVAL: Duration = Duration::from_secs(3);
/// How often identify is repeated on a connection (it runs once when the connection opens,
/// which is when admission is checked; a repeat only refreshes what cannot change meanwhile).
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(300);
/// How long a ping may take.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// A connected peer that answered no ping for this long is disconnected and counted down: a
/// hung peer (SIGSTOP, a frozen host) whose connection stays open. One late or lost ping is
/// not a death (a healthy peer answers again within `2 * PING_INTERVAL + PING_TIMEOUT`); two in
/// a row are. A peer whose process ends is down at once (its connection closes).
pub const SILENCE_MAX: Duration = Duration::from_secs(12);
/// How often connected peers are checked against [`SILENCE_MAX`].
pub const SILENCE_CHECK: Duration = Duration::from_secs(1);
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
    /// A connection to it is up (always true for the local node).
    pub alive: bool,
    /// Its operator-given name (by default its hostname); empty until it has identified.
    pub name: String,
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
    ping: ping::Behaviour,
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
}

/// What the membership task is told from outside.
enum Command {
    /// A member was removed from the cluster.
    Revoke(NodeId),
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
                let ping = ping::Behaviour::new(
                    ping::Config::new().with_interval(PING_INTERVAL).with_timeout(PING_TIMEOUT),
                );
                Behaviour { kad, identify, ping }
            })
            .map_err(|e| MembershipError::Swarm(e.to_string()))?
            // Members stay connected; liveness comes from ping, not from idleness.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(365 * 24 * 3600)))
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

        let mut state = State {
            local,
            local_peer,
            members: HashMap::new(),
            connected: HashSet::new(),
            answered: HashMap::new(),
            bootstrap: cfg.bootstrap.clone(),
            trust: cfg.trust.clone(),
            refused: VecDeque::new(),
            refused_set: HashSet::new(),
            redial: HashMap::new(),
            settle_until: tokio::time::Instant::now() + SETTLING,
            last_refresh: None,
        };
        state.members.insert(local, Member { id: local, data_addr, alive: true, name: cfg.name.clone() });
        for m in cfg.known {
            if m.id != local && state.members.len() < MEMBERS_MAX && !cfg.trust.is_revoked(&m.id) {
                if let Some(peer) = peer_of_node_id(&m.id) {
                    swarm.behaviour_mut().kad.add_address(&peer, tcp_multiaddr(m.data_addr));
                }
                state.members.insert(m.id, Member { alive: false, ..m });
            }
        }
        let (tx, rx) = watch::channel(state.snapshot());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(swarm, state, tx, stop_rx, cmd_rx));
        Ok(Self { local, rx, stop: Some(stop_tx), task: Some(task), commands: cmd_tx })
    }

    /// Drops `node` from the members and disconnects it; its certificate is refused from now
    /// on (the caller has recorded the revocation in the [`Trust`]).
    pub fn revoke(&self, node: NodeId) {
        let _ = self.commands.send(Command::Revoke(node));
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
    connected: HashSet<PeerId>,
    /// When each connected peer last answered a ping (or connected).
    answered: HashMap<PeerId, tokio::time::Instant>,
    bootstrap: Vec<SocketAddr>,
    trust: Arc<Trust>,
    /// Peers refused admission, oldest first (at most [`REFUSED_MAX`]).
    refused: VecDeque<PeerId>,
    refused_set: HashSet<PeerId>,
    /// When each unconnected member may be dialled next, and the wait after that dial.
    redial: HashMap<NodeId, (tokio::time::Instant, Duration)>,
    /// Until when Kademlia is refreshed at every maintenance tick (see [`SETTLING`]).
    settle_until: tokio::time::Instant,
    /// The last Kademlia refresh.
    last_refresh: Option<tokio::time::Instant>,
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

    fn set_alive(&mut self, peer: &PeerId, alive: bool) -> bool {
        let Some(id) = node_id_of_peer(peer) else { return false };
        match self.members.get_mut(&id) {
            Some(m) if id != self.local && m.alive != alive => {
                m.alive = alive;
                if alive {
                    tracing::info!(target: "vmcsnap::membership", node = %id.short(), name = %m.name, "member up");
                } else {
                    tracing::info!(target: "vmcsnap::membership", node = %id.short(), name = %m.name, "member down");
                }
                true
            }
            _ => false,
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
    let mut silence = tokio::time::interval(SILENCE_CHECK);
    silence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            _ = &mut stop => break,
            Some(cmd) = commands.recv() => match cmd {
                Command::Revoke(id) => match peer_of_node_id(&id) {
                    Some(peer) if id != st.local => refuse(&mut swarm, &mut st, peer, "removed from the cluster"),
                    _ => false,
                },
            },
            _ = tick.tick() => { maintain(&mut swarm, &mut st); false }
            _ = silence.tick() => { drop_silent(&mut swarm, &mut st); false }
            ev = swarm.select_next_some() => handle(&mut swarm, &mut st, ev),
        };
        if changed {
            tx.send_replace(st.snapshot());
        }
    }
    tracing::debug!(target: "vmcsnap::membership", "membership stopped");
}

fn maintain(swarm: &mut Swarm<Behaviour>, st: &mut State) {
    let now = tokio::time::Instant::now();
    // Re-dial members we know but are not connected to (restarts, partitions that healed),
    // each with its own backoff.
    for m in st.members.values() {
        if m.id == st.local {
            continue;
        }
        let Some(peer) = peer_of_node_id(&m.id) else { continue };
        if st.connected.contains(&peer) {
            continue;
        }
        let (next, wait) = st.redial.entry(m.id).or_insert((now, REDIAL_BACKOFF_MIN));
        if now < *next {
            continue;
        }
        *next = now + *wait;
        *wait = (*wait * 2).min(REDIAL_BACKOFF_MAX);
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(vec![tcp_multiaddr(m.data_addr)]).build();
        let _ = swarm.dial(opts);
    }
    // Bootstrap addresses until at least one peer is connected.
    if st.connected.is_empty() {
        for addr in &st.bootstrap {
            let _ = swarm.dial(tcp_multiaddr(*addr));
        }
        return;
    }
    // Kademlia finds the members this node has not met: often while the cluster changes,
    // rarely once it is quiet.
    let due = match st.last_refresh {
        None => true,
        Some(_) if now < st.settle_until => true,
        Some(t) => now >= t + KAD_REFRESH_STEADY,
    };
    if due {
        st.last_refresh = Some(now);
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
}

/// Disconnects every connected peer that answered no ping for [`SILENCE_MAX`]: libp2p keeps
/// a connection whose pings fail, and a hung peer must count as down.
fn drop_silent(swarm: &mut Swarm<Behaviour>, st: &mut State) {
    let now = tokio::time::Instant::now();
    let silent: Vec<PeerId> = st.answered.iter().filter(|(_, t)| now.duration_since(**t) > SILENCE_MAX).map(|(p, _)| *p).collect();
    for peer in silent {
        tracing::warn!(target: "vmcsnap::membership", %peer, silent_s = SILENCE_MAX.as_secs(), "peer answered no ping; disconnecting it as down");
        st.answered.remove(&peer);
        let _ = swarm.disconnect_peer_id(peer);
    }
}

fn handle(swarm: &mut Swarm<Behaviour>, st: &mut State, ev: SwarmEvent<BehaviourEvent>) -> bool {
    match ev {
        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
            if st.connected.is_empty() {
                st.settle_until = tokio::time::Instant::now() + SETTLING;
            }
            st.connected.insert(peer_id);
            st.answered.insert(peer_id, tokio::time::Instant::now());
            if let Some(id) = node_id_of_peer(&peer_id) {
                st.redial.remove(&id);
            }
            st.set_alive(&peer_id, true)
        }
        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
            st.connected.remove(&peer_id);
            st.answered.remove(&peer_id);
            if let Some(id) = node_id_of_peer(&peer_id) {
                st.redial.insert(id, (tokio::time::Instant::now() + REDIAL_BACKOFF_MIN, REDIAL_BACKOFF_MIN));
            }
            st.set_alive(&peer_id, false)
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
            let alive = st.connected.contains(&peer_id);
            // The name is the one the cluster key signed.
            let new = Member { id, data_addr, alive, name: cert.name };
            match st.members.get(&id) {
                Some(m) if *m == new => false,
                Some(_) => {
                    st.members.insert(id, new);
                    true
                }
                None if st.members.len() >= MEMBERS_MAX => {
                    tracing::warn!(target: "vmcsnap::membership", "member limit {MEMBERS_MAX} reached; ignoring {id}");
                    false
                }
                None => {
                    tracing::info!(target: "vmcsnap::membership", node = %id.short(), %data_addr, "member joined");
                    st.members.insert(id, new);
                    true
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. })) => {
            if st.refused_set.contains(&peer) {
                swarm.behaviour_mut().kad.remove_peer(&peer);
            } else if peer != st.local_peer && !st.connected.contains(&peer) {
                let _ = swarm.dial(peer);
            }
            false
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Err(e), .. })) => {
            tracing::debug!(target: "vmcsnap::membership", %peer, error = %e, "ping failed");
            false
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(_), .. })) => {
            if st.connected.contains(&peer) {
                st.answered.insert(peer, tokio::time::Instant::now());
            }
            false
        }
        _ => false,
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
        // Names are the ones the cluster key signed.
        let mut names: Vec<String> = nodes[0].members().into_iter().map(|m| m.name).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
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

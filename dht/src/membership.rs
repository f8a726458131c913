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
//! A member is any peer that completed identify with protocol [`PROTOCOL_VERSION`]. Members
//! are never forgotten by this module (the node persists them); `alive` says whether a
//! connection to it is up.

use futures::StreamExt;
use libp2p::identity::{ed25519, Keypair, PublicKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, kad, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use vmcsnap_protocol::NodeId;

/// identify protocol version; peers with another are not members.
pub const PROTOCOL_VERSION: &str = "/vmcsnap/1.0.0";
/// Kademlia protocol name (a private DHT, apart from the public IPFS one).
pub const KAD_PROTOCOL: &str = "/vmcsnap/kad/1.0.0";
/// How often the membership task re-dials missing members and refreshes Kademlia.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);
/// Ping interval; a peer that misses a ping within the timeout is dropped as dead.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Most members one node tracks.
pub const MEMBERS_MAX: usize = 4096;

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
    /// This node's name, shown to operators.
    pub name: String,
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
}

impl Membership {
    /// Starts the swarm, listens, and begins joining through `bootstrap`.
    pub async fn start(cfg: MembershipConfig) -> Result<Self, MembershipError> {
        let local = node_id_of_key(&cfg.keypair.public()).ok_or(MembershipError::NotEd25519)?;
        let local_peer = cfg.keypair.public().to_peer_id();
        let data_addr = cfg.listen;
        let agent = format!("vmcsnap/{} data={} name={}", env!("CARGO_PKG_VERSION"), data_addr, cfg.name);
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| MembershipError::Swarm(e.to_string()))?
            .with_behaviour(|key| {
                let id = key.public().to_peer_id();
                let kcfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                let mut kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kcfg);
                // On loopback and LANs no external address gets confirmed; serve anyway.
                kad.set_mode(Some(kad::Mode::Server));
                let identify = identify::Behaviour::new(
                    identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                        .with_agent_version(agent.clone())
                        .with_interval(Duration::from_secs(30)),
                );
                let ping = ping::Behaviour::new(
                    ping::Config::new().with_interval(PING_INTERVAL).with_timeout(Duration::from_secs(3)),
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
            bootstrap: cfg.bootstrap.clone(),
        };
        state.members.insert(local, Member { id: local, data_addr, alive: true, name: cfg.name.clone() });
        for m in cfg.known {
            if m.id != local && state.members.len() < MEMBERS_MAX {
                if let Some(peer) = peer_of_node_id(&m.id) {
                    swarm.behaviour_mut().kad.add_address(&peer, tcp_multiaddr(m.data_addr));
                }
                state.members.insert(m.id, Member { alive: false, ..m });
            }
        }
        let (tx, rx) = watch::channel(state.snapshot());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(swarm, state, tx, stop_rx));
        Ok(Self { local, rx, stop: Some(stop_tx), task: Some(task) })
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
    bootstrap: Vec<SocketAddr>,
}

impl State {
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
                true
            }
            _ => false,
        }
    }
}

fn parse_agent(agent: &str) -> Option<SocketAddr> {
    agent.split_whitespace().find_map(|w| w.strip_prefix("data=")).and_then(|a| a.parse().ok())
}

fn agent_name(agent: &str) -> String {
    agent.split_whitespace().find_map(|w| w.strip_prefix("name=")).unwrap_or_default().to_string()
}

async fn run(
    mut swarm: Swarm<Behaviour>,
    mut st: State,
    tx: watch::Sender<Vec<Member>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => { maintain(&mut swarm, &st); false }
            ev = swarm.select_next_some() => handle(&mut swarm, &mut st, ev),
        };
        if changed {
            tx.send_replace(st.snapshot());
        }
    }
    tracing::debug!(target: "vmcsnap::membership", "membership stopped");
}

fn maintain(swarm: &mut Swarm<Behaviour>, st: &State) {
    // Re-dial members we know but are not connected to (restarts, partitions that healed).
    for m in st.members.values() {
        if m.id == st.local {
            continue;
        }
        if let Some(peer) = peer_of_node_id(&m.id) {
            if !st.connected.contains(&peer) {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(vec![tcp_multiaddr(m.data_addr)])
                    .build();
                let _ = swarm.dial(opts);
            }
        }
    }
    // Bootstrap addresses until at least one peer is connected.
    if st.connected.is_empty() {
        for addr in &st.bootstrap {
            let _ = swarm.dial(tcp_multiaddr(*addr));
        }
    }
    if !st.connected.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
}

fn handle(swarm: &mut Swarm<Behaviour>, st: &mut State, ev: SwarmEvent<BehaviourEvent>) -> bool {
    match ev {
        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
            st.connected.insert(peer_id);
            st.set_alive(&peer_id, true)
        }
        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
            st.connected.remove(&peer_id);
            st.set_alive(&peer_id, false)
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
            if info.protocol_version != PROTOCOL_VERSION {
                tracing::warn!(target: "vmcsnap::membership", %peer_id, version = %info.protocol_version, "peer is not a vmcsnap node; ignoring");
                return false;
            }
            let (Some(id), Some(data_addr)) = (node_id_of_key(&info.public_key), parse_agent(&info.agent_version)) else {
                tracing::warn!(target: "vmcsnap::membership", %peer_id, agent = %info.agent_version, "peer sent no usable identity or data address");
                return false;
            };
            for a in &info.listen_addrs {
                if socket_of(a).is_some() {
                    swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                }
            }
            let alive = st.connected.contains(&peer_id);
            let new = Member { id, data_addr, alive, name: agent_name(&info.agent_version) };
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
            if peer != st.local_peer && !st.connected.contains(&peer) {
                let _ = swarm.dial(peer);
            }
            false
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Err(e), .. })) => {
            tracing::debug!(target: "vmcsnap::membership", %peer, error = %e, "ping failed");
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
        assert_eq!(agent_name("vmcsnap/0.1.0 data=127.0.0.1:7000 name=kvm-07"), "kvm-07");
        assert_eq!(agent_name("vmcsnap/0.1.0 data=127.0.0.1:7000"), "");
    }

    #[tokio::test]
    async fn three_nodes_find_each_other_through_one() {
        let mut nodes = Vec::new();
        let first: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let _ = first;
        // Fixed free ports: bind-and-release to find them.
        let ports: Vec<u16> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port())
            .collect();
        for (i, p) in ports.iter().enumerate() {
            let listen: SocketAddr = format!("127.0.0.1:{p}").parse().expect("addr");
            let bootstrap = if i == 0 { vec![] } else { vec![format!("127.0.0.1:{}", ports[0]).parse().expect("addr")] };
            nodes.push(
                Membership::start(MembershipConfig { keypair: Keypair::generate_ed25519(), listen, bootstrap, known: vec![], name: "t".into() })
                    .await
                    .expect("start"),
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if nodes.iter().all(|n| n.members().iter().filter(|m| m.alive).count() == 3) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "members: {:?}", nodes.iter().map(|n| n.members()).collect::<Vec<_>>());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Stop one: the others see it go.
        let gone = nodes.pop().expect("node");
        let gone_id = gone.local();
        gone.shutdown().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if nodes.iter().all(|n| n.members().iter().any(|m| m.id == gone_id && !m.alive)) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "still alive");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

//! SWIM: failure detection by probes and dissemination by piggybacked gossip (the `foca`
//! crate), over the admitted membership.
//!
//! Each node probes one member per [`PROBE_PERIOD`] (round robin over a shuffled list), asks
//! [`INDIRECT_PROBES`] others to probe it when it does not answer within [`PROBE_RTT`], and
//! suspects it when nobody got an answer. A suspect that does not refute within
//! [`SUSPECT_TO_DOWN`] is declared down. Membership changes ride on probes and on a little
//! gossip ([`GOSSIP_INTERVAL`] to [`GOSSIP_FANOUT`] members), so what a node sends per second
//! does not grow with the cluster; the number of times one change is repeated grows with its
//! logarithm (foca's `max_transmissions`). `vmcsnap-testnet swim-sim` measures this at 1,000
//! and 10,000 hosts.
//!
//! A SWIM identity carries the member's certificate ([`SwimId`]), so any node checks any
//! member's admission by itself. [`AdmittedCodec`] refuses every message whose sender or any
//! mentioned member has no valid certificate of this cluster; the transport (the membership
//! module) also checks that the sender is the peer the connection authenticated.

use crate::admission::{AdmissionError, Certificate, Trust};
use bytes::{Buf, BufMut};
use foca::{Codec, Foca, Header, Identity, Member, OwnedNotification, PostcardCodec, Runtime};
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmcsnap_protocol::NodeId;

/// How often a node probes one member.
pub const PROBE_PERIOD: Duration = Duration::from_millis(1500);
/// How long a direct probe may take before others are asked to probe indirectly (a first
/// message to a member may have to open a connection).
pub const PROBE_RTT: Duration = Duration::from_millis(700);
/// How many members are asked to probe a member that did not answer.
pub const INDIRECT_PROBES: usize = 3;
/// How long a suspect has to refute before it is declared down.
pub const SUSPECT_TO_DOWN: Duration = Duration::from_secs(5);
/// How often a node sends pending updates to [`GOSSIP_FANOUT`] random members (besides the
/// updates every probe carries).
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(1);
/// How many members one gossip round goes to.
pub const GOSSIP_FANOUT: usize = 2;
/// How often a node announces itself to one random member (heals a split view).
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(30);
/// How often a node announces itself to one member it believes down (finds members again
/// after a partition).
pub const ANNOUNCE_DOWN_INTERVAL: Duration = Duration::from_secs(10);
/// How long a down member's identity is remembered (so that stale news of it is ignored).
pub const REMOVE_DOWN_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Largest SWIM message (the transport is a stream, not UDP; this bounds what one message may
/// carry and what a peer may make us read).
pub const MESSAGE_BYTES_MAX: usize = 16 * 1024;
/// The cluster size the number of repetitions of an update is sized for.
pub const SIZED_FOR: u32 = 1024;

/// How many members a node that SWIM counts disconnected announces itself to per
/// [`REANNOUNCE_INTERVAL`] (see [`reannounce`]).
pub const REANNOUNCE_FANOUT: usize = 3;
/// How often a node that SWIM counts disconnected announces itself again.
pub const REANNOUNCE_INTERVAL: Duration = Duration::from_secs(2);

/// The SWIM state machine as every node runs it.
pub type Swim = Foca<SwimId, AdmittedCodec, rand10::rngs::SmallRng, crate::state::StateHandler>;

/// A SWIM state machine for `me`, checking admissions against `trust` and keeping the member
/// states it hears of in `states`.
pub fn new_swim(me: SwimId, seed: u64, trust: Arc<Trust>, states: crate::state::States) -> Swim {
    use rand10::SeedableRng;
    let certified: Certified = Default::default();
    let handler = crate::state::StateHandler::new(trust.clone(), states, me.node(), certified.clone());
    Foca::with_custom_broadcast(me, config(), rand10::rngs::SmallRng::seed_from_u64(seed), AdmittedCodec::with_certified(trust, certified), handler)
}

/// Whether SWIM runs its probe and gossip rounds after notification `n`, given whether it did
/// before. foca stops every round when it has no active member (`Idle`), when it is declared
/// down and takes a new identity (`Rejoin`), and when it leaves (`Defunct`); only a message
/// addressed to its current identity starts them again (`Active`).
pub fn connected_after(n: &OwnedNotification<SwimId>, was: bool) -> bool {
    match n {
        OwnedNotification::Active => true,
        OwnedNotification::Idle | OwnedNotification::Rejoin(_) | OwnedNotification::Defunct => false,
        _ => was,
    }
}

/// Announces this node to up to [`REANNOUNCE_FANOUT`] members of `known`, chosen at random.
/// The driver calls it at once when the node rejoins and then every [`REANNOUNCE_INTERVAL`]
/// until SWIM is connected again ([`connected_after`]).
///
/// Why it is needed: after a partition heals, each side tells the other that it was declared
/// down, and both sides take new identities at the same moment. foca then sends nothing more
/// by itself (its rounds stopped, see [`connected_after`]), and the messages it sent on the
/// way out name the other side's old identities, which the other side no longer answers to.
/// An announce is accepted by any identity of its node id; its answer names the new one and
/// starts the rounds again.
pub fn reannounce<'a>(swim: &mut Swim, known: impl Iterator<Item = &'a SwimId>, mut rt: impl Runtime<SwimId>) {
    let me = swim.identity().node();
    let known: Vec<&SwimId> = known.filter(|s| s.node() != me).collect();
    for s in known.choose_multiple(&mut rand::rng(), REANNOUNCE_FANOUT) {
        let _ = swim.announce(SwimId { bump: 0, ..(*s).clone() }, &mut rt);
    }
}

/// The SWIM parameters every node uses (and the simulation).
pub fn config() -> foca::Config {
    let mut c = foca::Config::new_lan(NonZeroU32::new(SIZED_FOR).unwrap_or(NonZeroU32::MIN));
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_RTT;
    c.num_indirect_probes = NonZeroUsize::new(INDIRECT_PROBES).unwrap_or(NonZeroUsize::MIN);
    c.suspect_to_down_after = SUSPECT_TO_DOWN;
    c.remove_down_after = Some(REMOVE_DOWN_AFTER);
    c.max_packet_size = NonZeroUsize::new(MESSAGE_BYTES_MAX).unwrap_or(NonZeroUsize::MIN);
    c.notify_down_members = true;
    c.periodic_gossip = Some(foca::PeriodicParams { frequency: GOSSIP_INTERVAL, num_members: NonZeroUsize::new(GOSSIP_FANOUT).unwrap_or(NonZeroUsize::MIN) });
    c.periodic_announce = Some(foca::PeriodicParams { frequency: ANNOUNCE_INTERVAL, num_members: NonZeroUsize::MIN });
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams { frequency: ANNOUNCE_DOWN_INTERVAL, num_members: NonZeroUsize::MIN });
    c
}

/// A member as SWIM knows it: its admission, where its data plane listens, and which run of it
/// this is (`bump` grows on every start and whenever the node was declared down and rejoins,
/// so the newer identity wins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwimId {
    /// Its certificate (names its node id and its name).
    pub cert: Certificate,
    /// Its data-plane (and libp2p) address.
    pub data: SocketAddr,
    /// Which incarnation of the process.
    pub bump: u32,
}

impl SwimId {
    /// The member's node id.
    pub fn node(&self) -> NodeId {
        self.cert.node
    }
}

impl Identity for SwimId {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Self { bump: self.bump.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> NodeId {
        self.cert.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// Why a SWIM message was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwimCodecError {
    /// Not a SWIM message.
    #[error("undecodable SWIM message: {0}")]
    Decode(#[from] postcard::Error),
    /// A sender or member without a valid admission.
    #[error("not admitted: {0}")]
    NotAdmitted(#[from] AdmissionError),
}

/// Most verified certificates remembered (beyond it the memory starts again).
const VERIFIED_MAX: usize = 8192;

/// The nodes whose certificate of this cluster a codec has checked, each with the signature
/// it checked (shared with the state handler: it keeps states only of such nodes).
pub type Certified = Arc<Mutex<HashMap<NodeId, Vec<u8>>>>;

/// foca's postcard encoding, refusing members this cluster did not admit.
pub struct AdmittedCodec {
    trust: Arc<Trust>,
    /// Signature of each node's certificate already checked.
    verified: Certified,
}

impl AdmittedCodec {
    /// A codec checking against `trust`.
    pub fn new(trust: Arc<Trust>) -> Self {
        Self::with_certified(trust, Default::default())
    }

    /// A codec checking against `trust` that records what it checked in `certified`.
    pub fn with_certified(trust: Arc<Trust>, certified: Certified) -> Self {
        Self { trust, verified: certified }
    }

    /// Checks a certificate (cached by signature). A revoked member may be mentioned (news of
    /// it is ignored above this layer) but may not speak.
    fn admit(&mut self, cert: &Certificate, speaker: bool) -> Result<(), AdmissionError> {
        if speaker && self.trust.is_revoked(&cert.node) {
            return Err(AdmissionError::Revoked(cert.node.short()));
        }
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&cert.node) == Some(&cert.signature) {
            return Ok(());
        }
        match self.trust.check(cert, &cert.node) {
            Ok(()) => {}
            Err(AdmissionError::Revoked(_)) if !speaker => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(cert.node, cert.signature.clone());
        Ok(())
    }
}

impl Codec<SwimId> for AdmittedCodec {
    type Error = SwimCodecError;

    fn encode_header(&mut self, header: &Header<SwimId>, buf: impl BufMut) -> Result<(), Self::Error> {
        Ok(PostcardCodec.encode_header(header, buf)?)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<SwimId>, Self::Error> {
        let h: Header<SwimId> = PostcardCodec.decode_header(buf)?;
        self.admit(&h.src.cert, true)?;
        Ok(h)
    }

    fn encode_member(&mut self, member: &Member<SwimId>, buf: impl BufMut) -> Result<(), Self::Error> {
        Ok(PostcardCodec.encode_member(member, buf)?)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<SwimId>, Self::Error> {
        let m: Member<SwimId> = PostcardCodec.decode_member(buf)?;
        self.admit(&m.id().cert, false)?;
        Ok(m)
    }
}

/// The sender a SWIM message names (before anything else is decoded), to compare with the
/// peer the connection authenticated.
pub fn sender_of(message: &[u8]) -> Option<NodeId> {
    let h: Header<SwimId> = PostcardCodec.decode_header(message).ok()?;
    Some(h.src.node())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterKey;
    use foca::{AccumulatingRuntime, Foca};
    use rand10::SeedableRng;

    /// Node `n`'s key: its node id is the public key, whose first byte is not `n`; the sim
    /// finds nodes by [`id`]'s address port instead.
    fn node_key(n: u8) -> libp2p::identity::ed25519::Keypair {
        libp2p::identity::ed25519::Keypair::from(libp2p::identity::ed25519::SecretKey::try_from_bytes([n; 32]).expect("key"))
    }

    fn id(key: &ClusterKey, n: u8, bump: u32) -> SwimId {
        let node = NodeId(node_key(n).public().to_bytes());
        SwimId { cert: key.certify(node, &format!("n{n}"), 1).expect("certify"), data: format!("127.0.0.1:{}", 7000 + u16::from(n)).parse().expect("addr"), bump }
    }

    #[test]
    fn a_newer_run_wins() {
        let key = ClusterKey::generate();
        let a = id(&key, 1, 5);
        let b = a.renew().expect("renews");
        assert_eq!(a.addr(), b.addr());
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
    }

    #[test]
    fn messages_from_strangers_and_revoked_members_are_refused() {
        let key = ClusterKey::generate();
        let trust = Arc::new(Trust::new(key.id()).expect("trust"));
        let mut a = Foca::new(id(&key, 1, 0), config(), rand10::rngs::SmallRng::seed_from_u64(1), AdmittedCodec::new(trust.clone()));
        let mut rt = AccumulatingRuntime::new();
        // A member announces itself: accepted.
        let mut b = Foca::new(id(&key, 2, 0), config(), rand10::rngs::SmallRng::seed_from_u64(2), AdmittedCodec::new(trust.clone()));
        let mut brt = AccumulatingRuntime::new();
        b.announce(id(&key, 1, 0), &mut brt).expect("announce");
        let (to, msg) = brt.to_send().expect("a message");
        assert_eq!(to.node(), id(&key, 1, 0).node());
        assert_eq!(sender_of(&msg), Some(id(&key, 2, 0).node()));
        a.handle_data(&msg, &mut rt).expect("accepted");
        assert_eq!(a.num_members(), 1);
        // Another cluster's node: refused.
        let other = ClusterKey::generate();
        let mut x = Foca::new(id(&other, 3, 0), config(), rand10::rngs::SmallRng::seed_from_u64(3), AdmittedCodec::new(trust.clone()));
        let mut xrt = AccumulatingRuntime::new();
        x.announce(id(&key, 1, 0), &mut xrt).expect("announce");
        let (_, msg) = xrt.to_send().expect("a message");
        assert!(a.handle_data(&msg, &mut rt).is_err(), "a stranger's message was accepted");
        assert_eq!(a.num_members(), 1);
        // b revoked: its messages are refused from now on.
        assert_eq!(trust.revoke(&key.revoke(id(&key, 2, 0).node())), Ok(true));
        b.announce(id(&key, 1, 0), &mut brt).expect("announce");
        let (_, msg) = brt.to_send().expect("a message");
        assert!(a.handle_data(&msg, &mut rt).is_err(), "a revoked member's message was accepted");
    }

    enum Ev {
        Deliver(usize, usize, Vec<u8>),
        Timer(usize, foca::Timer<SwimId>),
        Tick(usize),
    }

    /// Four SWIM nodes in memory on a virtual clock (microseconds), messages taking 1 ms.
    struct Sim {
        nodes: Vec<Swim>,
        /// Per node: whether SWIM runs its rounds ([`connected_after`]) and whom it knows.
        connected: Vec<bool>,
        known: Vec<HashMap<NodeId, SwimId>>,
        queue: std::collections::BTreeMap<(u64, u64), Ev>,
        seq: u64,
        rt: AccumulatingRuntime<SwimId>,
    }

    impl Sim {
        fn push(&mut self, at: u64, ev: Ev) {
            self.seq += 1;
            self.queue.insert((at, self.seq), ev);
        }

        /// Takes what node `h`'s last call asked for.
        fn drain(&mut self, h: usize, now: u64) {
            while let Some((to, data)) = self.rt.to_send() {
                self.push(now + 1_000, Ev::Deliver(usize::from(to.data.port() - 7001), h, data.to_vec()));
            }
            while let Some((after, t)) = self.rt.to_schedule() {
                self.push(now + after.as_micros() as u64, Ev::Timer(h, t));
            }
            while let Some(n) = self.rt.to_notify() {
                self.connected[h] = connected_after(&n, self.connected[h]);
                if let OwnedNotification::MemberUp(s) = &n {
                    self.known[h].insert(s.node(), s.clone());
                }
            }
        }

        /// Whether every node counts the other three up under their current identities.
        fn all_up(&self) -> bool {
            self.nodes.iter().enumerate().all(|(h, n)| {
                let up: Vec<&SwimId> = n.iter_members().map(|m| m.id()).collect();
                up.len() == 3 && (0..4).filter(|&o| o != h).all(|o| up.contains(&self.nodes[o].identity()))
            })
        }
    }

    /// Four nodes, {1, 2} cut off from {3, 4} (messages dropped) until each side holds the
    /// other down, then healed. `reannounce_on`: whether the nodes do what the driver does
    /// while SWIM is not connected. Returns the virtual seconds from the heal until every
    /// node counts the other three up under their current identities, if within `limit_s`.
    fn heal_after_partition(reannounce_on: bool, limit_s: u64) -> Option<f64> {
        let key = ClusterKey::generate();
        let trust = Arc::new(Trust::new(key.id()).expect("trust"));
        let keys: Vec<_> = (1..=4u8).map(node_key).collect();
        let states: Vec<crate::state::States> = (0..4).map(|_| Default::default()).collect();
        let nodes = (1..=4u8).map(|n| new_swim(id(&key, n, 10), u64::from(n), trust.clone(), states[usize::from(n) - 1].clone())).collect();
        let mut sim = Sim { nodes, connected: vec![false; 4], known: vec![HashMap::new(); 4], queue: Default::default(), seq: 0, rt: AccumulatingRuntime::new() };
        for h in 0..4 {
            sim.push(2_000_000 + h as u64, Ev::Tick(h));
        }
        for (h, k) in keys.iter().enumerate() {
            let state = crate::state::MemberState { node: sim.nodes[h].identity().node(), seq: 1, full: h == 2, vms: Some(vec![format!("vm{h}")]) };
            sim.nodes[h].add_broadcast(&crate::state::sign(k, state).expect("sign")).expect("broadcast");
        }
        for h in 1..4 {
            sim.nodes[h].announce(id(&key, 1, 0), &mut sim.rt).expect("announce");
            sim.drain(h, 0);
        }
        let side = |h: usize| h < 2;
        let mut partitioned = false;
        let mut healed_at: Option<u64> = None;
        // Messages across the cut wait in the connections' TCP buffers (a blackhole drops
        // packets, TCP sends them again) and arrive together when the cut heals.
        let mut held: Vec<Ev> = Vec::new();
        while let Some(((now, _), ev)) = sim.queue.pop_first() {
            if now > 20_000_000 && !partitioned && healed_at.is_none() {
                assert!(sim.all_up(), "the four nodes did not find each other");
                // Each node's state (published before it joined) reached every node.
                for st in &states {
                    let st = st.lock().expect("lock");
                    assert_eq!(st.len(), 4, "states known: {st:?}");
                }
                partitioned = true;
            }
            if partitioned && sim.nodes.iter().all(|n| n.num_members() == 1) {
                partitioned = false;
                healed_at = Some(now);
                for ev in held.drain(..) {
                    sim.push(now + 1_000, ev);
                }
            }
            if let Some(t0) = healed_at {
                if sim.all_up() {
                    return Some((now - t0) as f64 / 1e6);
                }
                if now > t0 + limit_s * 1_000_000 {
                    return None;
                }
            }
            assert!(now < 600_000_000, "the partition never took hold");
            let h = match ev {
                Ev::Deliver(to, from, data) => {
                    if partitioned && side(to) != side(from) {
                        held.push(Ev::Deliver(to, from, data));
                        continue;
                    }
                    let _ = sim.nodes[to].handle_data(&data, &mut sim.rt);
                    to
                }
                Ev::Timer(h, t) => {
                    let _ = sim.nodes[h].handle_timer(t, &mut sim.rt);
                    h
                }
                Ev::Tick(h) => {
                    sim.push(now + REANNOUNCE_INTERVAL.as_micros() as u64, Ev::Tick(h));
                    if !reannounce_on || sim.connected[h] {
                        continue;
                    }
                    let known: Vec<SwimId> = sim.known[h].values().cloned().collect();
                    reannounce(&mut sim.nodes[h], known.iter(), &mut sim.rt);
                    h
                }
            };
            sim.drain(h, now);
        }
        None
    }

    #[test]
    fn both_sides_of_a_healed_partition_find_each_other_again() {
        // What foca does by itself: both sides are declared down to each other, take new
        // identities, and wait for a message that never comes.
        assert_eq!(heal_after_partition(false, 120), None, "foca healed by itself: the reannounce may not be needed");
        // With the driver's reannounce: seconds.
        let s = heal_after_partition(true, 30).expect("the sides did not find each other within 30 s");
        eprintln!("healed {s:.3} virtual seconds after the cut healed");
        assert!(s <= 2.0 * REANNOUNCE_INTERVAL.as_secs_f64() + 1.0, "healed only after {s} s");
    }
}

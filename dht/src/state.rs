//! Member state: what each node says about itself that a snapshot needs before it starts
//! (whether its disk has room for pages, which VMs it runs), spread by SWIM's gossip instead of
//! asked of every member at every snapshot.
//!
//! Each node signs its own [`MemberState`] with its node key and hands it to SWIM as a custom
//! broadcast ([`StateHandler`]); SWIM repeats a new item a few times on its messages, and every
//! node that learns something new repeats it in turn (so a change reaches all N members in
//! O(log N) rounds, and each node sends each change O(log N) times). A node publishes when its
//! state changes and again every [`STATE_REFRESH`] (so that members that joined since learn
//! it). A member whose state a node has not heard yet is *unknown*: callers then ask it
//! directly, as before this module existed.
//!
//! An item is accepted only if its node is admitted (a certificate of this cluster for it has
//! been checked, and it is not revoked), its signature verifies against that node's key, and
//! its `seq` is newer than the last one heard from that node: a member relays others' states
//! but cannot forge them, cannot fill the table with states of keys it made up, and old news
//! never replaces new.

use crate::admission::Trust;
use crate::swim::{Certified, SwimId};
use foca::{BroadcastHandler, Invalidates};
use libp2p::identity::ed25519;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmcsnap_protocol::NodeId;

/// How often a node publishes its state even if nothing changed.
pub const STATE_REFRESH: Duration = Duration::from_secs(600);
/// Largest encoded item; a VM list that does not fit is left out (`vms: None`, so callers ask
/// that host for its VMs).
pub const STATE_BYTES_MAX: usize = 4096;

/// Most nodes whose state is kept (as many as there may be members).
pub const STATES_MAX: usize = crate::membership::MEMBERS_MAX;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The node.
    pub node: NodeId,
    /// Grows with every state the node publishes (a newer one replaces an older one).
    pub seq: u64,
    /// Its disk has less free space than its `--min-free`: snapshots place pages around it.
    pub full: bool,
    /// The ids of the VMs registered with it, sorted; `None` if the list was too long to
    /// spread.
    pub vms: Option<Vec<String>>,
}

/// A [`MemberState`] and its node's signature over its encoding.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Signed {
    state: Vec<u8>,
    signature: Vec<u8>,
}

/// Why a state item was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a state item.
    #[error("undecodable member state: {0}")]
    Decode(#[from] postcard::Error),
    /// The node is not (or no longer) admitted, or its key is not an ed25519 key.
    #[error("member state of a node that is not admitted: {0}")]
    NotAdmitted(String),
    /// The signature does not verify.
    #[error("member state of {0} with a bad signature")]
    BadSignature(String),
    /// The state is too large to spread even without its VM list (only when publishing).
    #[error("member state exceeds {0} bytes")]
    TooLarge(usize),
}

/// The newest state heard of each node, shared between SWIM's handler and readers.
pub type States = Arc<Mutex<HashMap<NodeId, MemberState>>>;

/// Encodes and signs `state` with the node's key (which must be `state.node`'s). Leaves the
/// VM list out if the item would exceed [`STATE_BYTES_MAX`].
pub fn sign(key: &ed25519::Keypair, mut state: MemberState) -> Result<Vec<u8>, StateError> {
    loop {
        let item = encode(&state).and_then(|bytes| encode(&Signed { signature: key.sign(&bytes), state: bytes }));
        match item {
            Err(postcard::Error::SerializeBufferFull) if state.vms.is_some() => state.vms = None,
            Err(postcard::Error::SerializeBufferFull) => return Err(StateError::TooLarge(STATE_BYTES_MAX)),
            other => return Ok(other?),
        }
    }
}

/// postcard's encoding of `v`, if it fits in [`STATE_BYTES_MAX`].
fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    let mut buf = vec![0u8; STATE_BYTES_MAX];
    let n = postcard::to_slice(v, &mut buf)?.len();
    buf.truncate(n);
    Ok(buf)
}

/// Decodes an item and checks its signature and its node's admission.
pub fn verify(trust: &Trust, item: &[u8]) -> Result<MemberState, StateError> {
    let signed: Signed = postcard::from_bytes(item)?;
    let state: MemberState = postcard::from_bytes(&signed.state)?;
    if trust.is_revoked(&state.node) {
        return Err(StateError::NotAdmitted(state.node.short()));
    }
    let key = ed25519::PublicKey::try_from_bytes(&state.node.0).map_err(|_| StateError::NotAdmitted(state.node.short()))?;
    if !key.verify(&signed.state, &signed.signature) {
        return Err(StateError::BadSignature(state.node.short()));
    }
    Ok(state)
}

/// Keeps the state in `item` if it is valid ([`verify`]), of a node `allowed` says may speak
/// here, and newer than the one held for its node; returns its key then (to spread it), `None`
/// if it was not new.
pub fn accept(trust: &Trust, states: &States, item: &[u8], allowed: impl Fn(&NodeId) -> bool) -> Result<Option<StateKey>, StateError> {
    // Cheap check first: most items a node receives are repeats of what it has.
    let newer = |states: &HashMap<NodeId, MemberState>, node: &NodeId, seq: u64| states.get(node).is_none_or(|s| s.seq < seq);
    let signed: Signed = postcard::from_bytes(item)?;
    let peek: MemberState = postcard::from_bytes(&signed.state)?;
    if !allowed(&peek.node) {
        return Err(StateError::NotAdmitted(peek.node.short()));
    }
    if !newer(&states.lock().unwrap_or_else(|e| e.into_inner()), &peek.node, peek.seq) {
        return Ok(None);
    }
    let state = verify(trust, item)?;
    let mut states = states.lock().unwrap_or_else(|e| e.into_inner());
    if !newer(&states, &state.node, state.seq) || (states.len() >= STATES_MAX && !states.contains_key(&state.node)) {
        return Ok(None);
    }
    let key = StateKey { node: state.node, seq: state.seq };
    states.insert(state.node, state);
    Ok(Some(key))
}

/// Which item a broadcast is: a newer `seq` of one node replaces an older one in SWIM's
/// backlog.
pub struct StateKey {
    node: NodeId,
    seq: u64,
}

impl Invalidates for StateKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.seq >= other.seq
    }
}

/// SWIM's handler of state items: keeps the newest state of each node in [`States`] and tells
/// SWIM to spread only what is new.
pub struct StateHandler {
    trust: Arc<Trust>,
    states: States,
    /// This node (its own items pass through the handler too).
    local: NodeId,
    /// The nodes whose certificate SWIM's codec has checked: an item of any other node is
    /// refused (SWIM decodes a message's sender and members before its items, so a member's
    /// certificate is checked before its state arrives; a state refused early comes again
    /// straight from its node when SWIM reports it up).
    certified: Certified,
}

impl StateHandler {
    /// A handler for node `local` checking against `trust`, keeping states in `states`, and
    /// taking states only of `local` and of the nodes in `certified`.
    pub fn new(trust: Arc<Trust>, states: States, local: NodeId, certified: Certified) -> Self {
        Self { trust, states, local, certified }
    }
}

impl BroadcastHandler<SwimId> for StateHandler {
    type Key = StateKey;
    type Error = StateError;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&SwimId>) -> Result<Option<StateKey>, StateError> {
        let certified = &self.certified;
        accept(&self.trust, &self.states, data, |n| *n == self.local || certified.lock().unwrap_or_else(|e| e.into_inner()).contains_key(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterKey;

    fn keypair(n: u8) -> (ed25519::Keypair, NodeId) {
        let k = ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([n; 32]).expect("key"));
        let id = NodeId(k.public().to_bytes());
        (k, id)
    }

    #[test]
    fn only_signed_newer_states_of_admitted_nodes_are_kept() {
        let cluster = ClusterKey::generate();
        let trust = Arc::new(Trust::new(cluster.id()).expect("trust"));
        let states: States = Default::default();
        let certified: Certified = Default::default();
        let (k0, n0) = keypair(9);
        let mut h = StateHandler::new(trust.clone(), states.clone(), n0, certified.clone());
        let (k1, n1) = keypair(1);
        let (k2, _) = keypair(2);
        let s = |seq, full| MemberState { node: n1, seq, full, vms: Some(vec!["vm0".into()]) };
        // A node whose certificate SWIM has not checked (a key someone made up): refused,
        // nothing kept. This node's own state needs none.
        assert!(matches!(h.receive_item(&sign(&k1, s(1, true)).expect("sign"), None), Err(StateError::NotAdmitted(_))));
        assert!(states.lock().expect("lock").is_empty());
        let own = MemberState { node: n0, seq: 1, full: false, vms: Some(vec![]) };
        assert!(h.receive_item(&sign(&k0, own).expect("sign"), None).expect("own state").is_some());
        // Once its certificate is checked, n1's states are taken.
        certified.lock().expect("lock").insert(n1, vec![]);
        assert!(h.receive_item(&sign(&k1, s(2, true)).expect("sign"), None).expect("accepted").is_some());
        assert_eq!(states.lock().expect("lock").get(&n1).map(|s| (s.seq, s.full)), Some((2, true)));
        // A repeat and an older state: not spread again, nothing changes.
        assert!(h.receive_item(&sign(&k1, s(2, true)).expect("sign"), None).expect("ok").is_none());
        assert!(h.receive_item(&sign(&k1, s(1, false)).expect("sign"), None).expect("ok").is_none());
        // Another node's key signing n1's state: refused.
        assert!(matches!(h.receive_item(&sign(&k2, s(3, false)).expect("sign"), None), Err(StateError::BadSignature(_))));
        // Garbage: refused.
        assert!(h.receive_item(b"\x05hello", None).is_err());
        // Revoked: refused.
        assert_eq!(trust.revoke(&cluster.revoke(n1)), Ok(true));
        assert!(matches!(h.receive_item(&sign(&k1, s(4, false)).expect("sign"), None), Err(StateError::NotAdmitted(_))));
        assert_eq!(states.lock().expect("lock").get(&n1).map(|s| (s.seq, s.full)), Some((2, true)));
    }

    #[test]
    fn a_vm_list_too_long_to_spread_is_left_out() {
        let (k, n) = keypair(1);
        let vms: Vec<String> = (0..1000).map(|i| format!("a-rather-long-vm-name-{i:04}")).collect();
        let item = sign(&k, MemberState { node: n, seq: 1, full: false, vms: Some(vms) }).expect("sign");
        assert!(item.len() <= STATE_BYTES_MAX);
        let trust = Trust::new(ClusterKey::generate().id()).expect("trust");
        let s = verify(&trust, &item).expect("verifies");
        assert_eq!(s.vms, None);
    }
}

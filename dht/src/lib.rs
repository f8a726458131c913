//! Who owns which page, and who is in the cluster.
//!
//! - [`placement`]: one pure function from a page hash and a membership view to the
//!   `replicas` distinct hosts that own it (rendezvous hashing). No IO, no routing round trip:
//!   a batch of 10,000 hashes is placed locally (a one-hop DHT, as in Dynamo or Garage).
//! - [`admission`]: who may be a member: certificates and revocations signed by the
//!   operator's cluster key, checked by every node.
//! - [`membership`]: the libp2p swarm (Kademlia + identify + SWIM) that discovers members and
//!   tracks which are reachable, without a connection to every member.
//! - [`state`]: what each member says about itself (disk full, VMs), signed and spread by
//!   SWIM's gossip.
//! - [`swim`]: the SWIM parameters, the member identity SWIM spreads (with its certificate) and
//!   the codec that refuses members this cluster did not admit.
//!
//! **Architecture Invariant:** placement does no IO and depends only on its arguments.

pub mod admission;
pub mod membership;
pub mod placement;
pub mod state;
pub mod swim;

pub use admission::{Certificate, ClusterKey, Revocation, Trust};
pub use membership::{Member, Membership, MembershipConfig, MembershipError};
pub use placement::{owners, primary_shares, View};

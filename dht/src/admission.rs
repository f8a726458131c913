//! Who may be a member: signed membership.
//!
//! # Goals
//! - The operator decides who is a member. The trust root is a **cluster key** (ed25519) that
//!   the operator keeps off the hosts; nodes hold only its public half. Reading a host's disk
//!   therefore does not let anyone admit a new member.
//! - A node is admitted by a [`Certificate`]: the cluster key's signature over the node's id,
//!   its name and a serial. Every node checks a peer's certificate before counting it as a
//!   member ([`Trust::check`]), on the membership plane; the data plane serves members only.
//! - A member is removed by a [`Revocation`], also signed by the cluster key; nodes keep every
//!   revocation they learn and pass it on, so a member that was down learns it later.
//!
//! # Non-goals
//! - Roles within the cluster: every admitted member may do what any member may.
//! - Expiry: a certificate is valid until revoked.
//!
//! Both documents travel as text tokens: `hex(magic | be16 version | bincode body)`, with
//! magic `VMCT` (certificate) and `VMRV` (revocation), version 1.

use libp2p::identity::ed25519;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::RwLock;
use vmcsnap_protocol::codec;
use vmcsnap_protocol::manifest::{validate_name, CommitRecord, SignedRecord, SignedTombstone, Tombstone};
use vmcsnap_protocol::NodeId;

const CERT_MAGIC: [u8; 4] = *b"VMCT";
const REVOCATION_MAGIC: [u8; 4] = *b"VMRV";
const TOKEN_VERSION: u16 = 1;
/// Longest token accepted, in hex characters (a certificate is about 300).
pub const TOKEN_CHARS_MAX: usize = vmcsnap_protocol::manifest::CERTIFICATE_CHARS_MAX;
/// Most revocations one node keeps (far beyond any cluster's churn; a bound all the same).
pub const REVOCATIONS_MAX: usize = 65_536;

/// The public half of a cluster key: what identifies a cluster.
pub type ClusterId = NodeId;

/// Why a certificate, revocation or key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    /// The document does not decode.
    #[error("not a valid {what}: {reason}")]
    Malformed {
        /// Certificate, revocation or key.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Signed by another cluster's key.
    #[error("signed for cluster {found}, not this cluster ({expected})")]
    OtherCluster {
        /// This node's cluster.
        expected: String,
        /// The document's.
        found: String,
    },
    /// The certificate names another node than the one presenting it.
    #[error("the certificate is for node {cert}, not {node}")]
    OtherNode {
        /// The node named in the certificate.
        cert: String,
        /// The node presenting it.
        node: String,
    },
    /// The signature does not verify.
    #[error("the {0}'s signature does not verify")]
    BadSignature(&'static str),
    /// The node was removed from the cluster.
    #[error("node {0} was removed from the cluster")]
    Revoked(String),
    /// A commit record without a signature (kept from before admission).
    #[error("commit record {0} is not signed")]
    Unsigned(String),
}

fn malformed(what: &'static str, reason: impl ToString) -> AdmissionError {
    AdmissionError::Malformed { what, reason: reason.to_string() }
}

/// A node's admission: the cluster key's signature over its id, name and serial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The cluster (its key's public half).
    pub cluster: ClusterId,
    /// The admitted node.
    pub node: NodeId,
    /// Its name in the cluster.
    pub name: String,
    /// The operator's serial for this admission.
    pub serial: u64,
    /// Ed25519 signature by the cluster key over [`Certificate::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A member's removal, signed by the cluster key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The cluster.
    pub cluster: ClusterId,
    /// The removed node.
    pub node: NodeId,
    /// Ed25519 signature by the cluster key over [`Revocation::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Certificate {
    /// What the cluster key signs (domain-separated from revocations).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = b"vmcsnap certificate 1\0".to_vec();
        m.extend_from_slice(&self.cluster.0);
        m.extend_from_slice(&self.node.0);
        m.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        m.extend_from_slice(self.name.as_bytes());
        m.extend_from_slice(&self.serial.to_be_bytes());
        m
    }

    /// The certificate as a text token.
    pub fn to_token(&self) -> String {
        token(CERT_MAGIC, self)
    }

    /// Parses a token made by [`Certificate::to_token`] (its signature is checked by
    /// [`Trust::check`], not here).
    pub fn from_token(s: &str) -> Result<Self, AdmissionError> {
        let c: Self = from_token(CERT_MAGIC, "certificate", s)?;
        validate_name("node name", &c.name).map_err(|e| malformed("certificate", e))?;
        Ok(c)
    }
}

impl Revocation {
    /// What the cluster key signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = b"vmcsnap revocation 1\0".to_vec();
        m.extend_from_slice(&self.cluster.0);
        m.extend_from_slice(&self.node.0);
        m
    }

    /// The revocation as a text token.
    pub fn to_token(&self) -> String {
        token(REVOCATION_MAGIC, self)
    }

    /// Parses a token made by [`Revocation::to_token`].
    pub fn from_token(s: &str) -> Result<Self, AdmissionError> {
        from_token(REVOCATION_MAGIC, "revocation", s)
    }
}

fn token<T: Serialize>(magic: [u8; 4], v: &T) -> String {
    // Encoding a small struct of bytes and strings cannot fail.
    hex::encode(codec::encode_record(magic, TOKEN_VERSION, v).unwrap_or_default())
}

fn from_token<T: serde::de::DeserializeOwned>(magic: [u8; 4], what: &'static str, s: &str) -> Result<T, AdmissionError> {
    let s = s.trim();
    if s.len() > TOKEN_CHARS_MAX {
        return Err(malformed(what, format!("{} characters (at most {TOKEN_CHARS_MAX})", s.len())));
    }
    let bytes = hex::decode(s).map_err(|e| malformed(what, e))?;
    codec::decode_record(magic, what, TOKEN_VERSION, &bytes).map_err(|e| malformed(what, e))
}

/// The cluster key: held by the operator, never by a node.
pub struct ClusterKey(ed25519::Keypair);

impl ClusterKey {
    /// A new, random cluster key.
    pub fn generate() -> Self {
        Self(ed25519::Keypair::generate())
    }

    /// The cluster's id (the key's public half).
    pub fn id(&self) -> ClusterId {
        NodeId(self.0.public().to_bytes())
    }

    /// Admits `node` as `name`.
    pub fn certify(&self, node: NodeId, name: &str, serial: u64) -> Result<Certificate, AdmissionError> {
        validate_name("node name", name).map_err(|e| malformed("certificate", e))?;
        let mut c = Certificate { cluster: self.id(), node, name: name.to_string(), serial, signature: vec![] };
        c.signature = self.0.sign(&c.signed_bytes());
        Ok(c)
    }

    /// Removes `node`.
    pub fn revoke(&self, node: NodeId) -> Revocation {
        let mut r = Revocation { cluster: self.id(), node, signature: vec![] };
        r.signature = self.0.sign(&r.signed_bytes());
        r
    }

    /// The key as text (for its file, kept by the operator).
    pub fn to_text(&self) -> String {
        format!("vmcsnap-cluster-key {}\n", hex::encode(self.0.to_bytes()))
    }

    /// Parses [`ClusterKey::to_text`].
    pub fn from_text(s: &str) -> Result<Self, AdmissionError> {
        let hexkey = s.trim().strip_prefix("vmcsnap-cluster-key ").ok_or_else(|| malformed("cluster key", "missing the vmcsnap-cluster-key header"))?;
        let mut bytes = hex::decode(hexkey.trim()).map_err(|e| malformed("cluster key", e))?;
        let kp = ed25519::Keypair::try_from_bytes(&mut bytes).map_err(|e| malformed("cluster key", e))?;
        Ok(Self(kp))
    }
}

/// Signs `record` as this node (`key`, admitted by `cert`): the record's initiator must be
/// the node the certificate names.
pub fn sign_record(key: &libp2p::identity::Keypair, cert: &Certificate, record: CommitRecord) -> Result<SignedRecord, AdmissionError> {
    if record.initiator != cert.node {
        return Err(AdmissionError::OtherNode { cert: cert.node.short(), node: record.initiator.short() });
    }
    let msg = SignedRecord::signed_bytes(&record).map_err(|e| malformed("commit record", e))?;
    let signature = key.sign(&msg).map_err(|e| malformed("commit record", e))?;
    Ok(SignedRecord { record, certificate: cert.to_token(), signature })
}

/// Signs a tombstone with the deleting member's key; `cert` must be that member's.
pub fn sign_tombstone(key: &libp2p::identity::Keypair, cert: &Certificate, tombstone: Tombstone) -> Result<SignedTombstone, AdmissionError> {
    if tombstone.deleted_by != cert.node {
        return Err(AdmissionError::OtherNode { cert: cert.node.short(), node: tombstone.deleted_by.short() });
    }
    let msg = SignedTombstone::signed_bytes(&tombstone).map_err(|e| malformed("tombstone", e))?;
    let signature = key.sign(&msg).map_err(|e| malformed("tombstone", e))?;
    Ok(SignedTombstone { tombstone, certificate: cert.to_token(), signature })
}

/// Parses a cluster id (64 hex characters).
pub fn parse_cluster_id(s: &str) -> Result<ClusterId, AdmissionError> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut b).map_err(|e| malformed("cluster id", e))?;
    ed25519::PublicKey::try_from_bytes(&b).map_err(|e| malformed("cluster id", e))?;
    Ok(NodeId(b))
}

/// What a node trusts: its cluster's public key, and the revocations it knows.
pub struct Trust {
    cluster: ClusterId,
    key: ed25519::PublicKey,
    revoked: RwLock<HashSet<NodeId>>,
}

impl Trust {
    /// Trust in cluster `cluster`.
    pub fn new(cluster: ClusterId) -> Result<Self, AdmissionError> {
        let key = ed25519::PublicKey::try_from_bytes(&cluster.0).map_err(|e| malformed("cluster id", e))?;
        Ok(Self { cluster, key, revoked: RwLock::new(HashSet::new()) })
    }

    /// The cluster.
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    fn same_cluster(&self, found: &ClusterId) -> Result<(), AdmissionError> {
        if *found != self.cluster {
            return Err(AdmissionError::OtherCluster { expected: self.cluster.short(), found: found.short() });
        }
        Ok(())
    }

    /// Whether `cert`, presented by `node`, admits it now.
    pub fn check(&self, cert: &Certificate, node: &NodeId) -> Result<(), AdmissionError> {
        self.same_cluster(&cert.cluster)?;
        if cert.node != *node {
            return Err(AdmissionError::OtherNode { cert: cert.node.short(), node: node.short() });
        }
        if !self.key.verify(&cert.signed_bytes(), &cert.signature) {
            return Err(AdmissionError::BadSignature("certificate"));
        }
        if self.is_revoked(node) {
            return Err(AdmissionError::Revoked(node.short()));
        }
        Ok(())
    }

    /// Checks a revocation's cluster and signature.
    pub fn check_revocation(&self, r: &Revocation) -> Result<(), AdmissionError> {
        self.same_cluster(&r.cluster)?;
        if !self.key.verify(&r.signed_bytes(), &r.signature) {
            return Err(AdmissionError::BadSignature("revocation"));
        }
        Ok(())
    }

    /// Applies a checked revocation; true if it is new here.
    pub fn revoke(&self, r: &Revocation) -> Result<bool, AdmissionError> {
        self.check_revocation(r)?;
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        if set.len() >= REVOCATIONS_MAX && !set.contains(&r.node) {
            return Err(malformed("revocation", format!("more than {REVOCATIONS_MAX} revocations")));
        }
        Ok(set.insert(r.node))
    }

    /// Whether `r` was committed by an admitted member of this cluster: its certificate is
    /// the cluster key's, for the record's initiator, and the initiator's signature verifies.
    ///
    /// A later removal of the initiator does not unsign what it committed while admitted (its
    /// snapshots stay restorable); a removed member cannot reach any member to plant more.
    pub fn check_record(&self, r: &SignedRecord) -> Result<(), AdmissionError> {
        let name = &r.record.name;
        if !r.is_signed() {
            return Err(AdmissionError::Unsigned(name.clone()));
        }
        let cert = Certificate::from_token(&r.certificate)?;
        self.same_cluster(&cert.cluster)?;
        if cert.node != r.record.initiator {
            return Err(AdmissionError::OtherNode { cert: cert.node.short(), node: r.record.initiator.short() });
        }
        if !self.key.verify(&cert.signed_bytes(), &cert.signature) {
            return Err(AdmissionError::BadSignature("certificate"));
        }
        let signer = ed25519::PublicKey::try_from_bytes(&r.record.initiator.0).map_err(|e| malformed("commit record", e))?;
        let msg = SignedRecord::signed_bytes(&r.record).map_err(|e| malformed("commit record", e))?;
        if !signer.verify(&msg, &r.signature) {
            return Err(AdmissionError::BadSignature("commit record"));
        }
        Ok(())
    }

    /// Checks that a tombstone was signed by a member this cluster admitted and did not
    /// remove (a removed member's deletions are not taken from then on).
    pub fn check_tombstone(&self, t: &SignedTombstone) -> Result<(), AdmissionError> {
        let by = t.tombstone.deleted_by;
        let cert = Certificate::from_token(&t.certificate)?;
        self.same_cluster(&cert.cluster)?;
        if cert.node != by {
            return Err(AdmissionError::OtherNode { cert: cert.node.short(), node: by.short() });
        }
        if !self.key.verify(&cert.signed_bytes(), &cert.signature) {
            return Err(AdmissionError::BadSignature("certificate"));
        }
        if self.is_revoked(&by) {
            return Err(AdmissionError::Revoked(by.short()));
        }
        let signer = ed25519::PublicKey::try_from_bytes(&by.0).map_err(|e| malformed("tombstone", e))?;
        let msg = SignedTombstone::signed_bytes(&t.tombstone).map_err(|e| malformed("tombstone", e))?;
        if !signer.verify(&msg, &t.signature) {
            return Err(AdmissionError::BadSignature("tombstone"));
        }
        Ok(())
    }

    /// Whether `node` was removed.
    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u8) -> NodeId {
        NodeId(ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([i; 32]).expect("secret")).public().to_bytes())
    }

    #[test]
    fn certificates_admit_their_node_of_their_cluster_only() {
        let key = ClusterKey::generate();
        let trust = Trust::new(key.id()).expect("trust");
        let cert = key.certify(node(1), "kvm-01", 1).expect("certify");
        let back = Certificate::from_token(&cert.to_token()).expect("token");
        assert_eq!(back, cert);
        assert_eq!(trust.check(&back, &node(1)), Ok(()));
        // Presented by another node.
        assert!(matches!(trust.check(&cert, &node(2)), Err(AdmissionError::OtherNode { .. })));
        // Of another cluster.
        let other = ClusterKey::generate().certify(node(1), "kvm-01", 1).expect("certify");
        assert!(matches!(trust.check(&other, &node(1)), Err(AdmissionError::OtherCluster { .. })));
        // Forged: a changed name, or a signature over something else.
        let mut forged = cert.clone();
        forged.name = "kvm-99".into();
        assert_eq!(trust.check(&forged, &node(1)), Err(AdmissionError::BadSignature("certificate")));
        let mut forged = cert.clone();
        forged.cluster = other.cluster;
        forged.signature = other.signature.clone();
        assert!(trust.check(&forged, &node(1)).is_err());
    }

    #[test]
    fn revocations_are_signed_and_stick() {
        let key = ClusterKey::generate();
        let trust = Trust::new(key.id()).expect("trust");
        let cert = key.certify(node(3), "kvm-03", 7).expect("certify");
        let r = Revocation::from_token(&key.revoke(node(3)).to_token()).expect("token");
        assert_eq!(trust.revoke(&r), Ok(true));
        assert_eq!(trust.revoke(&r), Ok(false));
        assert!(matches!(trust.check(&cert, &node(3)), Err(AdmissionError::Revoked(_))));
        // A revocation signed by someone else changes nothing.
        let stranger = ClusterKey::generate();
        let mut fake = stranger.revoke(node(1));
        fake.cluster = key.id();
        assert_eq!(trust.revoke(&fake), Err(AdmissionError::BadSignature("revocation")));
        assert!(!trust.is_revoked(&node(1)));
    }

    fn record(initiator: NodeId, name: &str) -> CommitRecord {
        CommitRecord::minimal(initiator, name)
    }

    #[test]
    fn commit_records_verify_only_when_signed_by_their_admitted_initiator() {
        let key = ClusterKey::generate();
        let trust = Trust::new(key.id()).expect("trust");
        let me = libp2p::identity::Keypair::ed25519_from_bytes([1; 32]).expect("key");
        let my_id = node(1);
        let cert = key.certify(my_id, "kvm-01", 1).expect("certify");
        let signed = sign_record(&me, &cert, record(my_id, "s1")).expect("sign");
        assert_eq!(trust.check_record(&signed), Ok(()));
        let back = SignedRecord::decode(&signed.encode().expect("encode")).expect("decode");
        assert_eq!(trust.check_record(&back), Ok(()));
        // Changed after signing.
        let mut forged = signed.clone();
        forged.record.replicas = 1;
        forged.record.name = "s2".into();
        assert_eq!(trust.check_record(&forged), Err(AdmissionError::BadSignature("commit record")));
        // Unsigned.
        let mut bare = signed.clone();
        bare.signature.clear();
        assert!(matches!(trust.check_record(&bare), Err(AdmissionError::Unsigned(_))));
        // Signed by another member in the initiator's name (with the initiator's certificate).
        let other = libp2p::identity::Keypair::ed25519_from_bytes([2; 32]).expect("key");
        let mut stolen = signed.clone();
        stolen.signature = other.sign(&SignedRecord::signed_bytes(&signed.record).expect("bytes")).expect("sign");
        assert_eq!(trust.check_record(&stolen), Err(AdmissionError::BadSignature("commit record")));
        // Signed by its initiator, but the initiator was never admitted here.
        let outsider = ClusterKey::generate().certify(my_id, "kvm-01", 1).expect("certify");
        let foreign = sign_record(&me, &outsider, record(my_id, "s1")).expect("sign");
        assert!(matches!(trust.check_record(&foreign), Err(AdmissionError::OtherCluster { .. })));
        // A member cannot sign a record naming another initiator.
        assert!(sign_record(&me, &cert, record(node(2), "s1")).is_err());
    }

    #[test]
    fn tombstones_verify_only_when_signed_by_an_admitted_unrevoked_member() {
        let key = ClusterKey::generate();
        let trust = Trust::new(key.id()).expect("trust");
        let me = libp2p::identity::Keypair::ed25519_from_bytes([1; 32]).expect("key");
        let cert = key.certify(node(1), "kvm-01", 1).expect("certify");
        let t = Tombstone { name: "s1".into(), record: vmcsnap_protocol::PageHash([7; 32]), deleted_by: node(1), deleted_unix_ms: 5 };
        let signed = sign_tombstone(&me, &cert, t.clone()).expect("sign");
        assert_eq!(trust.check_tombstone(&signed), Ok(()));
        let back = SignedTombstone::decode(&signed.encode().expect("encode")).expect("decode");
        assert_eq!(trust.check_tombstone(&back), Ok(()));
        let mut forged = signed.clone();
        forged.tombstone.record = vmcsnap_protocol::PageHash([8; 32]);
        assert_eq!(trust.check_tombstone(&forged), Err(AdmissionError::BadSignature("tombstone")));
        let foreign = sign_tombstone(&me, &ClusterKey::generate().certify(node(1), "kvm-01", 1).expect("certify"), t.clone()).expect("sign");
        assert!(matches!(trust.check_tombstone(&foreign), Err(AdmissionError::OtherCluster { .. })));
        assert!(sign_tombstone(&me, &cert, Tombstone { deleted_by: node(2), ..t }).is_err());
        trust.revoke(&key.revoke(node(1))).expect("revoke");
        assert!(matches!(trust.check_tombstone(&signed), Err(AdmissionError::Revoked(_))));
    }

    #[test]
    fn tokens_and_keys_refuse_garbage() {
        assert!(Certificate::from_token("zz").is_err());
        assert!(Certificate::from_token(&"00".repeat(TOKEN_CHARS_MAX)).is_err());
        let key = ClusterKey::generate();
        // A revocation is not a certificate.
        assert!(Certificate::from_token(&key.revoke(node(1)).to_token()).is_err());
        let back = ClusterKey::from_text(&key.to_text()).expect("key");
        assert_eq!(back.id(), key.id());
        assert!(ClusterKey::from_text("nope").is_err());
        assert_eq!(parse_cluster_id(&key.id().to_string()), Ok(key.id()));
        assert!(parse_cluster_id("12").is_err());
    }
}

//! This node's admission to its cluster, and the revocations it knows.
//!
//! On its first start a node is given the cluster's id (`--cluster-key`, the public half of
//! the operator's cluster key) and its certificate (`--join TOKEN`, from `vmcsnap cluster
//! admit`); both are kept in the data directory (`cluster.id`, `certificate`), so later starts
//! need neither. The node refuses to start with a certificate for another node or cluster, or
//! one whose signature does not verify. Revocations are kept in the store's metadata
//! (`revoked:NODE_ID`) and loaded into the [`Trust`] at start.
//!
//! A node signs each commit record it makes with its node key ([`Signer`]); records it made
//! before admission existed are signed at its first start with admission ([`sign_kept`]).

use crate::store::{Store, StoreError};
use std::path::Path;
use std::sync::Arc;
use vmcsnap_dht::admission::{parse_cluster_id, sign_record, AdmissionError, Certificate, ClusterId, Revocation, Trust};
use vmcsnap_protocol::manifest::{CommitRecord, SignedRecord, SignedTombstone, Tombstone};
use vmcsnap_protocol::{NodeId, PageHash};

/// File holding the cluster's id in the data directory.
pub const CLUSTER_FILE: &str = "cluster.id";
/// File holding this node's certificate in the data directory.
pub const CERTIFICATE_FILE: &str = "certificate";
const REVOKED_PREFIX: &[u8] = b"revoked:";

/// Why this node cannot take part in its cluster.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// No cluster id given or kept.
    #[error("this node does not know its cluster: start it once with --cluster-key CLUSTER_ID (printed by `vmcsnap cluster init`)")]
    NoCluster,
    /// No certificate given or kept.
    #[error("this node is not admitted: give `node run` --join TOKEN, the output of `vmcsnap cluster admit {0} --name NAME` on the operator's machine")]
    NoCertificate(NodeId),
    /// A given value disagrees with the kept one.
    #[error("{what} differs from the one this data directory already holds ({path}); remove that file to change it")]
    Changed {
        /// What.
        what: &'static str,
        /// The file.
        path: String,
    },
    /// The certificate or cluster id is refused.
    #[error("{0}")]
    Refused(#[from] AdmissionError),
    /// The certificate names this node otherwise than `--name`.
    #[error("the certificate names this node {cert:?}, not {given:?}; run with --name {cert} or without --name")]
    Name {
        /// The certificate's name.
        cert: String,
        /// The `--name` given.
        given: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads `DIR/file`, or stores `given` there on the first start; refuses a `given` that
/// differs from what is kept.
fn kept_or_given(dir: &Path, file: &str, what: &'static str, given: Option<&str>) -> Result<Option<String>, AdmitError> {
    let path = dir.join(file);
    let io = |e: std::io::Error| AdmitError::Io { path: path.display().to_string(), reason: e.to_string() };
    let kept = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    match (kept, given) {
        (Some(k), Some(g)) if k != g.trim() => Err(AdmitError::Changed { what, path: path.display().to_string() }),
        (Some(k), _) => Ok(Some(k)),
        (None, Some(g)) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let tmp = dir.join(format!("{file}.tmp"));
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
            f.write_all(format!("{}\n", g.trim()).as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(Some(g.trim().to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// This node's trust and certificate: from the data directory, or from `cluster` and `join`
/// on the first start. Checks the certificate against the node's own id and cluster, and
/// loads every revocation the store holds.
pub fn admit(dir: &Path, id: NodeId, cluster: Option<&str>, join: Option<&str>, store: &Store) -> Result<(Arc<Trust>, Certificate), AdmitError> {
    if let Some(c) = cluster {
        parse_cluster_id(c)?;
    }
    let cluster: ClusterId = match kept_or_given(dir, CLUSTER_FILE, "--cluster-key", cluster)? {
        Some(c) => parse_cluster_id(&c)?,
        None => return Err(AdmitError::NoCluster),
    };
    let trust = Arc::new(Trust::new(cluster)?);
    for r in revocations(store)? {
        trust.revoke(&r)?;
    }
    if let Some(j) = join {
        // Checked before it is kept.
        trust.check(&Certificate::from_token(j)?, &id)?;
    }
    let cert = match kept_or_given(dir, CERTIFICATE_FILE, "--join", join)? {
        Some(t) => Certificate::from_token(&t)?,
        None => return Err(AdmitError::NoCertificate(id)),
    };
    trust.check(&cert, &id)?;
    Ok((trust, cert))
}

/// The name this node goes by: its certificate's; `--name`, when given, must agree.
pub fn name(cert: &Certificate, given: &str) -> Result<String, AdmitError> {
    if !given.is_empty() && given != cert.name {
        return Err(AdmitError::Name { cert: cert.name.clone(), given: given.to_string() });
    }
    Ok(cert.name.clone())
}

/// Applies and keeps a revocation; true if it is new here.
pub fn revoke(store: &Store, trust: &Trust, r: &Revocation) -> Result<bool, AdmitError> {
    let new = trust.revoke(r)?;
    if new {
        let key = [REVOKED_PREFIX, r.node.to_string().as_bytes()].concat();
        store.meta_put(&key, r.to_token().as_bytes())?;
    }
    Ok(new)
}

/// Every revocation this node keeps.
pub fn revocations(store: &Store) -> Result<Vec<Revocation>, AdmitError> {
    let mut out = Vec::new();
    for (_, v) in store.meta_prefix(REVOKED_PREFIX)? {
        match Revocation::from_token(&String::from_utf8_lossy(&v)) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(target: "vmcsnap::admission", error = %e, "ignoring a corrupt stored revocation"),
        }
    }
    Ok(out)
}

/// Signs this node's commit records: its node key and its certificate.
pub struct Signer {
    key: libp2p::identity::Keypair,
    cert: Certificate,
}

impl Signer {
    /// The signer of node `key`, admitted by `cert`.
    pub fn new(key: libp2p::identity::Keypair, cert: Certificate) -> Self {
        Self { key, cert }
    }

    /// Signs a record this node committed.
    pub fn sign(&self, record: CommitRecord) -> Result<SignedRecord, AdmitError> {
        Ok(sign_record(&self.key, &self.cert, record)?)
    }

    /// Signs the deletion of a record by this node.
    pub fn sign_tombstone(&self, name: &str, record: PageHash, deleted_unix_ms: u64) -> Result<SignedTombstone, AdmitError> {
        let t = Tombstone { name: name.to_string(), record, deleted_by: self.cert.node, deleted_unix_ms };
        Ok(vmcsnap_dht::admission::sign_tombstone(&self.key, &self.cert, t)?)
    }
}

/// Signs the unsigned records this node committed before admission existed (records other
/// nodes committed stay unsigned here until their own signed copy arrives by catalog sync).
/// Returns how many were signed.
pub fn sign_kept(store: &Store, signer: &Signer) -> Result<usize, AdmitError> {
    let mut signed = 0;
    for r in store.catalog_all()? {
        if !r.is_signed() && r.record.initiator == signer.cert.node {
            store.catalog_put(&signer.sign(r.record)?)?;
            signed += 1;
        }
    }
    Ok(signed)
}

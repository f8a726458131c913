//! The node's persistent ed25519 identity (`DIR/identity.key`). The libp2p peer id and the
//! data plane's TLS certificate are both derived from it, so a node that restarts on the same
//! directory is the same member, owning the same slice of the hash space.

use libp2p::identity::Keypair;
use std::io::Write;
use std::path::Path;

/// File name of the identity inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads the identity from `dir`, creating it (mode 0600) on first start.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Keypair> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let kp = Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| anyhow::anyhow!("identity file {} is corrupt: {e}", path.display()))?;
            if kp.clone().try_into_ed25519().is_err() {
                anyhow::bail!("identity file {} holds a non-ed25519 key", path.display());
            }
            Ok(kp)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp.to_protobuf_encoding().map_err(|e| anyhow::anyhow!("cannot encode identity: {e}"))?;
            let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
            {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            Ok(kp)
        }
        Err(e) => Err(anyhow::anyhow!("cannot read identity file {}: {e}", path.display())),
    }
}

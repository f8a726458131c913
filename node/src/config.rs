//! The node's configuration, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default replicas of every page.
pub const DEFAULT_REPLICAS: u8 = 2;
/// Most replicas a snapshot may ask for.
pub const REPLICAS_MAX: u8 = 8;

/// Validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Data directory (identity, RocksDB, control socket).
    pub data_dir: PathBuf,
    /// Address for libp2p (TCP) and the data plane (UDP).
    pub listen: SocketAddr,
    /// Existing members to join through.
    pub peers: Vec<SocketAddr>,
    /// Replicas of every page for snapshots this node takes.
    pub replicas: u8,
    /// This node's name, shown to operators and used by `restore --on`. Empty: the name its
    /// certificate gives; otherwise it must be that name.
    pub name: String,
    /// A directory of QMP sockets (`ID.qmp`) of this host's VMs, registered as they appear.
    pub vm_dir: Option<PathBuf>,
    /// The cluster's id (`--cluster-key`), needed on the first start only.
    pub cluster_key: Option<String>,
    /// This node's certificate (`--join TOKEN`), needed on the first start only.
    pub join: Option<String>,
    /// Where this host's `qemu-system-*` binaries are (restores launch only those).
    pub qemu_dir: PathBuf,
    /// Directories besides the data directory and `vm_dir` where a launched QEMU's sockets
    /// and files may be.
    pub launch_dirs: Vec<PathBuf>,
}

impl NodeConfig {
    /// Checks the values an operator can get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_replicas(self.replicas).map_err(|e| anyhow::anyhow!(e))?;
        if self.listen.port() == 0 {
            anyhow::bail!("--listen needs an explicit port: peers reach this node there");
        }
        if !self.name.is_empty() {
            vmcsnap_protocol::manifest::validate_name("--name", &self.name).map_err(|e| anyhow::anyhow!(e))?;
        }
        for (flag, d) in self.vm_dir.iter().map(|d| ("--vm-dir", d)).chain(self.launch_dirs.iter().map(|d| ("--launch-dir", d))).chain([("--qemu-dir", &self.qemu_dir)]) {
            if !d.is_absolute() {
                anyhow::bail!("{flag} must be an absolute path, not {}", d.display());
            }
        }
        if self.listen.ip().is_unspecified() {
            anyhow::bail!("--listen needs the address peers should use, not {}", self.listen.ip());
        }
        Ok(())
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }
}

/// Checks a replica count (the node's default or a snapshot's).
pub fn check_replicas(replicas: u8) -> Result<(), String> {
    if replicas == 0 || replicas > REPLICAS_MAX {
        return Err(format!("--replicas must be 1 to {REPLICAS_MAX}, not {replicas}"));
    }
    Ok(())
}

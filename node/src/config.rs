//! The node's configuration, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default longest time a snapshot may take before it is given up (`--snapshot-deadline`).
pub const DEFAULT_SNAPSHOT_DEADLINE: Duration = Duration::from_secs(6 * 3600);
/// Default time between garbage-collection cycles (`--gc-interval`).
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(3600);
/// Default time between scrub passes (`--scrub-interval`).
pub const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default most bytes a second a scrub pass reads (`--scrub-rate`, in MiB/s).
pub const DEFAULT_SCRUB_RATE: u64 = 32 << 20;
/// Default bytes kept free on the store's file system (`--min-free`).
pub const DEFAULT_MIN_FREE: u64 = 1 << 30;
/// Default time between repair cycles (`--repair-interval`).
pub const DEFAULT_REPAIR_INTERVAL: Duration = Duration::from_secs(600);
/// Default time a member may be down before its pages are repaired (`--repair-after`).
pub const DEFAULT_REPAIR_AFTER: Duration = Duration::from_secs(3600);
/// Default most bytes a second repair and rebalance fetch (`--repair-rate`, in MiB/s).
pub const DEFAULT_REPAIR_RATE: u64 = 64 << 20;
/// How often a node pulls the revocations, tombstones and commit records it lacks.
pub const CATALOG_SYNC_INTERVAL: Duration = Duration::from_secs(5);

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
    /// Directories besides the data directory, `vm_dir` and the disk directory where a
    /// launched QEMU's sockets, files and disks may be.
    pub launch_dirs: Vec<PathBuf>,
    /// Whether a launched QEMU runs in QEMU's seccomp sandbox (it is killed if it starts a
    /// program; see [`crate::qemu::launch::sandbox_value`]).
    pub launch_sandbox: bool,
    /// Longest a snapshot this node takes may run: it is not committed later. Garbage
    /// collection relies on it (see [`NodeConfig::gc_grace`]); set it alike on every node.
    pub snapshot_deadline: Duration,
    /// Time between garbage-collection cycles (a deletion starts one at once).
    pub gc_interval: Duration,
    /// Time between scrub passes (each reads back and checks every stored page).
    pub scrub_interval: Duration,
    /// Most bytes a second a scrub pass reads.
    pub scrub_rate: u64,
    /// Bytes the store's file system must keep free: new pages that would eat into them are
    /// refused, and snapshots place around a node that is that full.
    pub min_free: u64,
    /// Time between repair cycles (a removal starts one at once).
    pub repair_interval: Duration,
    /// How long a member may be down before its pages are copied to other owners.
    pub repair_after: Duration,
    /// Most bytes a second this node fetches to repair and rebalance.
    pub repair_rate: u64,
    /// Most bytes a second a lazy restore pushes in the background (0: no cap). Pages the
    /// guest asks for are never held back.
    pub lazy_push_rate: u64,
    /// Where restores write the disks of the VMs they launch here (`None`: `DATA/disks`).
    pub disk_dir: Option<PathBuf>,
    /// Where the Prometheus endpoint listens (`None`: off).
    pub metrics: Option<SocketAddr>,
}

impl NodeConfig {
    /// A configuration with every option at its default (as `node run` has them, except
    /// `--min-free`, 0 here): fill in admission and peers with struct update syntax.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            peers: vec![],
            replicas: DEFAULT_REPLICAS,
            name: String::new(),
            vm_dir: None,
            cluster_key: None,
            join: None,
            qemu_dir: "/usr/bin".into(),
            launch_dirs: vec![],
            launch_sandbox: true,
            snapshot_deadline: DEFAULT_SNAPSHOT_DEADLINE,
            gc_interval: DEFAULT_GC_INTERVAL,
            scrub_interval: DEFAULT_SCRUB_INTERVAL,
            scrub_rate: DEFAULT_SCRUB_RATE,
            min_free: 0,
            repair_interval: DEFAULT_REPAIR_INTERVAL,
            repair_after: DEFAULT_REPAIR_AFTER,
            repair_rate: DEFAULT_REPAIR_RATE,
            lazy_push_rate: 0,
            disk_dir: None,
            metrics: None,
        }
    }

    /// Where restores write disks: `--disk-dir`, else `DATA/disks`.
    pub fn disk_dir(&self) -> PathBuf {
        self.disk_dir.clone().unwrap_or_else(|| self.data_dir.join("disks"))
    }

    /// Checks the values an operator can get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_replicas(self.replicas).map_err(|e| anyhow::anyhow!(e))?;
        if self.listen.port() == 0 {
            anyhow::bail!("--listen needs an explicit port: peers reach this node there");
        }
        if !self.name.is_empty() {
            vmcsnap_protocol::manifest::validate_name("--name", &self.name).map_err(|e| anyhow::anyhow!(e))?;
        }
        for (flag, d) in self.vm_dir.iter().map(|d| ("--vm-dir", d)).chain(self.launch_dirs.iter().map(|d| ("--launch-dir", d))).chain([("--qemu-dir", &self.qemu_dir)]).chain(self.disk_dir.iter().map(|d| ("--disk-dir", d))) {
            if !d.is_absolute() {
                anyhow::bail!("{flag} must be an absolute path, not {}", d.display());
            }
        }
        if self.snapshot_deadline < Duration::from_secs(1) {
            anyhow::bail!("--snapshot-deadline must be at least 1 s");
        }
        if self.gc_interval < Duration::from_secs(1) {
            anyhow::bail!("--gc-interval must be at least 1 s");
        }
        if self.scrub_interval < Duration::from_secs(1) {
            anyhow::bail!("--scrub-interval must be at least 1 s");
        }
        if self.scrub_rate < 1 << 20 {
            anyhow::bail!("--scrub-rate must be at least 1 MiB/s");
        }
        if self.repair_rate < 1 << 20 {
            anyhow::bail!("--repair-rate must be at least 1 MiB/s");
        }
        if self.listen.ip().is_unspecified() {
            anyhow::bail!("--listen needs the address peers should use, not {}", self.listen.ip());
        }
        Ok(())
    }

    /// How long garbage collection waits between marking a page unreferenced and deleting
    /// it: the snapshot deadline plus two catalog syncs, so that any snapshot that relied on
    /// the page before the collector started watching has committed, with its record here, or
    /// given up.
    pub fn gc_grace(&self) -> Duration {
        self.snapshot_deadline + 2 * CATALOG_SYNC_INTERVAL
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

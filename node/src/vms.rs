//! The VMs of this host: registered ones (`vmcsnap vm add`, or launched here by a restore),
//! kept in the store's metadata, and those whose QMP socket (`ID.qmp`) sits in `--vm-dir`,
//! found by reading the directory whenever the list is asked for (so it is never stale).
//!
//! Also the pause journal: before a capture changes a VM's migration settings or pauses it, it
//! notes here what undoes that ([`Touched`]), and removes the note once the VM runs again with
//! its settings back. A node that died in between finds the note when it starts and undoes it,
//! so a crash mid-snapshot never leaves a guest paused, or its QEMU throttled, for good.

use crate::qemu::capture::Touched;
use crate::qemu::qmp::Qmp;
use crate::store::{Store, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vmcsnap_protocol::manifest::validate_name;

const VM_PREFIX: &[u8] = b"vm:";
const PAUSED_PREFIX: &[u8] = b"paused:";
/// Journal prefix of VMs whose QEMU may hold a capture's disk views ([`crate::qemu::disks`]).
const FLEECE_PREFIX: &[u8] = b"fleece:";
/// Time a status question to one VM's monitor may take (a capture holding it answers "busy").
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

/// Where a VM's registration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `vmcsnap vm add`, or launched here by a restore.
    Added,
    /// A socket in `--vm-dir`.
    Dir,
}

impl Origin {
    /// As shown by `vm list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Added => "added",
            Origin::Dir => "dir",
        }
    }
}

/// Why a VM could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A bad id or path.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// This host's VMs.
pub struct Registry {
    store: Arc<Store>,
    dir: Option<PathBuf>,
}

impl Registry {
    /// The registry kept in `store`, plus the sockets in `dir`.
    pub fn new(store: Arc<Store>, dir: Option<PathBuf>) -> Self {
        Self { store, dir }
    }

    /// Registers (or re-points) VM `id` at QMP socket `qmp`.
    pub fn add(&self, id: &str, qmp: &Path) -> Result<(), VmError> {
        validate_name("VM id", id).map_err(VmError::Invalid)?;
        if !qmp.is_absolute() {
            return Err(VmError::Invalid(format!("the QMP socket must be an absolute path, not {}", qmp.display())));
        }
        let key = [VM_PREFIX, id.as_bytes()].concat();
        Ok(self.store.meta_put(&key, qmp.display().to_string().as_bytes())?)
    }

    /// Forgets VM `id`; false if it was not registered (a `--vm-dir` socket cannot be forgotten).
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let key = [VM_PREFIX, id.as_bytes()].concat();
        let had = self.store.meta_get(&key)?.is_some();
        if had {
            self.store.meta_delete(&key)?;
        }
        Ok(had)
    }

    /// Every VM of this host: registered ones, then `--vm-dir` sockets not registered by id.
    pub fn list(&self) -> Result<Vec<(String, PathBuf, Origin)>, StoreError> {
        let mut out: Vec<(String, PathBuf, Origin)> = self
            .store
            .meta_prefix(VM_PREFIX)?
            .into_iter()
            .map(|(k, v)| {
                let id = String::from_utf8_lossy(&k[VM_PREFIX.len()..]).into_owned();
                (id, PathBuf::from(String::from_utf8_lossy(&v).into_owned()), Origin::Added)
            })
            .collect();
        if let Some(dir) = &self.dir {
            for (id, path) in scan_dir(dir) {
                if !out.iter().any(|(i, _, _)| *i == id) {
                    out.push((id, path, Origin::Dir));
                }
            }
        }
        Ok(out)
    }

    /// The QMP socket of VM `id`, if it is one of this host's.
    pub fn lookup(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        Ok(self.list()?.into_iter().find(|(i, _, _)| i == id).map(|(_, p, _)| p))
    }

    /// Notes what a capture is about to change in VM `id`'s QEMU.
    pub fn note_touched(&self, id: &str, touched: &Touched) {
        let key = [PAUSED_PREFIX, id.as_bytes()].concat();
        let put = serde_json::to_vec(touched).map_err(|e| e.to_string()).and_then(|v| self.store.meta_put(&key, &v).map_err(|e| e.to_string()));
        if let Err(e) = put {
            tracing::warn!(target: "vmcsnap::vms", vm = id, error = %e, "cannot journal the pause");
        }
    }

    /// Removes the note of [`Registry::note_touched`]: the VM runs again (if it ran) with its
    /// settings back.
    pub fn note_restored(&self, id: &str) {
        let key = [PAUSED_PREFIX, id.as_bytes()].concat();
        let _ = self.store.meta_delete(&key);
    }

    /// Resumes every VM a capture paused and never resumed, and removes the disk views a
    /// capture left in a VM's QEMU (the node died mid-snapshot).
    pub async fn resume_journaled(&self) {
        self.remove_fleeces().await;
        let Ok(entries) = self.store.meta_prefix(PAUSED_PREFIX) else { return };
        for (k, v) in entries {
            let id = String::from_utf8_lossy(&k[PAUSED_PREFIX.len()..]).into_owned();
            let touched = journaled(&v);
            if !touched.qmp.exists() {
                self.note_restored(&id); // the VM is gone
                continue;
            }
            match crate::qemu::capture::undo(&touched).await {
                Ok(Some(was)) => tracing::warn!(target: "vmcsnap::vms", vm = %id, state = %was,
                    "resumed a VM that a snapshot interrupted by a node crash had left paused"),
                Ok(None) => {}
                Err(e) => {
                    // Kept: the next start tries again (a VM that is gone is dropped then too).
                    tracing::warn!(target: "vmcsnap::vms", vm = %id, error = %e, "cannot resume a VM a crashed snapshot may have left paused");
                    continue;
                }
            }
            self.note_restored(&id);
        }
    }
}

/// A journal entry: what [`Registry::note_touched`] wrote, or (from before the settings were
/// journaled) the QMP socket alone, of a VM that ran.
fn journaled(v: &[u8]) -> Touched {
    serde_json::from_slice(v).unwrap_or_else(|_| Touched { qmp: PathBuf::from(String::from_utf8_lossy(v).into_owned()), resume: true, ..Default::default() })
}

impl Registry {
    async fn remove_fleeces(&self) {
        let Ok(entries) = self.store.meta_prefix(FLEECE_PREFIX) else { return };
        for (k, v) in entries {
            let id = String::from_utf8_lossy(&k[FLEECE_PREFIX.len()..]).into_owned();
            let qmp = PathBuf::from(String::from_utf8_lossy(&v).into_owned());
            if qmp.exists() {
                let removed = async { crate::qemu::disks::remove_leftovers(&mut Qmp::connect(&qmp).await?).await };
                match removed.await {
                    Ok(n) if n > 0 => tracing::warn!(target: "vmcsnap::vms", vm = %id, removed = n, "removed disk views a snapshot interrupted by a node crash had left in QEMU"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(target: "vmcsnap::vms", vm = %id, error = %e, "cannot remove disk views a crashed snapshot may have left");
                        continue;
                    }
                }
            }
            let _ = self.store.meta_delete(&k);
        }
    }
}

impl crate::qemu::capture::PauseJournal for Registry {
    fn touched(&self, vm: &str, touched: &Touched) {
        self.note_touched(vm, touched);
    }

    fn restored(&self, vm: &str) {
        self.note_restored(vm);
    }

    fn fleeced(&self, vm: &str, qmp: &Path) {
        let key = [FLEECE_PREFIX, vm.as_bytes()].concat();
        if let Err(e) = self.store.meta_put(&key, qmp.display().to_string().as_bytes()) {
            tracing::warn!(target: "vmcsnap::vms", vm, error = %e, "cannot journal the disk views");
        }
    }

    fn unfleeced(&self, vm: &str) {
        let _ = self.store.meta_delete(&[FLEECE_PREFIX, vm.as_bytes()].concat());
    }
}

/// `ID.qmp` sockets in `dir`, by id.
fn scan_dir(dir: &Path) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_socket()).unwrap_or(false))
        .filter_map(|e| {
            let p = e.path();
            let id = p.file_name()?.to_str()?.strip_suffix(".qmp")?.to_string();
            validate_name("VM id", &id).ok()?;
            Some((id, p))
        })
        .collect();
    out.sort();
    out
}

/// QEMU's run state of the VM behind `qmp`: `running`, `paused`, ..., `busy` when another
/// client holds its monitor (a capture), or `unreachable`.
pub async fn status(qmp: &Path) -> String {
    let ask = async {
        let mut q = Qmp::connect(qmp).await.map_err(|_| "unreachable".to_string())?;
        q.status().await.map_err(|_| "unreachable".to_string())
    };
    match tokio::time::timeout(STATUS_TIMEOUT, ask).await {
        Ok(Ok(s)) => s,
        Ok(Err(s)) => s,
        Err(_) => "busy".into(),
    }
}

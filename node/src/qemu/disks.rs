//! A VM's disks at the instant of a cut, with stock QEMU 7.2 and no copy of the image: image
//! fleecing, the pull-mode backup libvirt uses.
//!
//! 1. **Prepare** (before the pause): each captured disk gets a temporary target, a sparse
//!    file of its size in the node's directory, added as a block node and unlinked at once
//!    (QEMU holds it open; nothing is left on disk whatever happens).
//! 2. **Freeze** (while the VM is paused at the cut, so disk and memory agree): one QMP
//!    `transaction` of `blockdev-backup sync=none` jobs, one per disk, each inserting a
//!    copy-before-write filter above the disk: from then on, a guest write first copies the
//!    old data of its cluster into the target. The VM runs on its own disk, unchanged.
//! 3. **Export**: a `snapshot-access` node over each filter (it reads the target where the
//!    guest wrote since the freeze and the disk elsewhere: the disk as it was), exported by
//!    QEMU's NBD server on a unix socket in the node's directory.
//! 4. **Read** over NBD ([`super::nbd`]), in 4 KiB blocks, by the capture.
//! 5. **Remove** everything, in reverse order: exports, the server, the access nodes, the jobs
//!    (which takes the filters out), the targets. [`remove_leftovers`] does the same for
//!    whatever a node that died mid-snapshot left in a QEMU (all names start with `vmcsnap-`).
//!
//! **Incremental**: the freeze's transaction also adds a dirty bitmap to each disk,
//! `vmcsnap-since-SNAPSHOT` (persistent in a qcow2 image, in memory only for raw), which from
//! that instant records every block the guest writes. The next capture, given the block
//! hashes the snapshot of a bitmap recorded ([`Fleece::set_base`]; the engine checks that
//! snapshot is committed and placed as this one is), exports that bitmap beside the view and
//! reads only the blocks it marks: a bitmap that still records while it is read marks more,
//! never less, so the blocks taken from the base are exactly as they were. Without a usable
//! bitmap (a new QEMU, a raw image after a restart, a base snapshot deleted) it reads the
//! whole disk. Each capture keeps its own bitmap and the one it used, and removes older ones;
//! a failed capture removes its own.
//!
//! Which disks: every writable one the cut's [`DiskChoice`] wants. Read-only drives (CD-ROMs,
//! shared base images) are left out: a restore uses them as recorded. A disk must be given as
//! `-drive file=...` (so that a restore can point the VM at its copy); others are refused
//! with a clear error, and `--no-disks` takes memory only.

use super::qmp::{Qmp, QmpError};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmcsnap_protocol::wire::DiskChoice;

/// Prefix of every block node, job, export and dirty bitmap vmcsnap adds to a QEMU.
pub const NAME_PREFIX: &str = "vmcsnap-";
/// Prefix of the dirty bitmap a snapshot leaves on each disk: `vmcsnap-since-SNAPSHOT@VM`.
pub const BITMAP_PREFIX: &str = "vmcsnap-since-";

/// The name of the dirty bitmap snapshot `snapshot` leaves on the disks of VM `vm` (snapshot
/// names and VM ids have no `@`).
pub fn bitmap_name(snapshot: &str, vm: &str) -> String {
    format!("{BITMAP_PREFIX}{snapshot}@{vm}")
}
/// Time QEMU has to drop a cancelled job or a deleted export.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A writable disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// QEMU's device name (`virtio0`, or the drive's `id`).
    pub device: String,
    /// Its top block node.
    pub node: String,
    /// Its image file.
    pub file: String,
    /// Virtual size, bytes.
    pub size: u64,
    /// Index of the command-line argument that names the image (`file=` of its `-drive`).
    pub arg: usize,
    /// Whether its image can keep a persistent dirty bitmap (qcow2).
    pub qcow2: bool,
    /// The snapshots whose bitmaps it has, recording and consistent (oldest first as QEMU
    /// lists them).
    pub since: Vec<String>,
}

/// The writable disks of VM `vm` that `choice` wants; `cmdline` is its QEMU command line.
pub async fn list(q: &mut Qmp, vm: &str, cmdline: &[String], choice: &DiskChoice) -> Result<Vec<Disk>, String> {
    if *choice == DiskChoice::None {
        return Ok(vec![]);
    }
    let blocks = q.execute("query-block", json!({})).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let device = match b["device"].as_str() {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => b["qdev"].as_str().unwrap_or("").to_string(),
        };
        seen.push(device.clone());
        let Some(ins) = b.get("inserted") else { continue }; // an empty drive
        if ins["ro"].as_bool() == Some(true) || !choice.wants(&device) {
            continue;
        }
        let file = ins["file"].as_str().unwrap_or("").to_string();
        let node = ins["node-name"].as_str().unwrap_or("").to_string();
        let size = ins["image"]["virtual-size"].as_u64().unwrap_or(0);
        if node.is_empty() || size == 0 {
            return Err(format!("QEMU does not tell disk {device}'s block node or size"));
        }
        let arg = drive_arg(cmdline, &file).ok_or_else(|| {
            format!("disk {device} ({file}) is not given as `-drive file=...` on the VM's command line, so a restore could not point the VM at a copy of it; take the snapshot with --no-disks (memory only) or choose disks with --disk")
        })?;
        let bitmaps = ins.get("dirty-bitmaps").or_else(|| b.get("dirty-bitmaps"));
        let since = bitmaps
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m["recording"].as_bool() == Some(true) && m["inconsistent"].as_bool() != Some(true))
            .filter_map(|m| {
                let (snapshot, of) = m["name"].as_str()?.strip_prefix(BITMAP_PREFIX)?.split_once('@')?;
                (of == vm).then(|| snapshot.to_string())
            })
            .collect();
        let qcow2 = ins["drv"].as_str() == Some("qcow2");
        out.push(Disk { device, node, file, size, arg, qcow2, since });
    }
    if let DiskChoice::Only(ids) = choice {
        if let Some(missing) = ids.iter().find(|i| !out.iter().any(|d| &&d.device == i)) {
            return Err(format!("the VM has no writable disk {missing:?} (its drives: {})", seen.join(", ")));
        }
    }
    Ok(out)
}

/// The index of the `-drive` value whose `file=` is `file`.
pub fn drive_arg(cmdline: &[String], file: &str) -> Option<usize> {
    (1..cmdline.len()).find(|&i| cmdline[i - 1] == "-drive" && drive_options(&cmdline[i]).iter().any(|(k, v)| k == "file" && v == file))
}

/// The image (`file=`) of the `-drive` value at index `arg`.
pub fn drive_file(cmdline: &[String], arg: usize) -> Option<String> {
    if arg == 0 || cmdline.get(arg - 1).map(String::as_str) != Some("-drive") {
        return None;
    }
    drive_options(cmdline.get(arg)?).into_iter().find(|(k, _)| k == "file").map(|(_, v)| v)
}

/// A QEMU option value's `key=value` parts, in order (`,,` is a literal comma; a part
/// without `=` comes back with an empty value).
pub fn drive_options(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p, String::new())),
        }
    }
    out
}

/// The command line with the `-drive` at index `arg` pointing at the raw image `image`.
pub fn point_drive_at(cmdline: &[String], arg: usize, image: &Path) -> Result<Vec<String>, String> {
    if arg == 0 || arg >= cmdline.len() || cmdline.get(arg - 1).map(String::as_str) != Some("-drive") {
        return Err(format!("the recorded command line has no -drive at argument {arg}"));
    }
    let mut opts: Vec<(String, String)> =
        drive_options(&cmdline[arg]).into_iter().filter(|(k, _)| !k.starts_with("file.") && k != "backing" && !k.starts_with("backing.")).collect();
    let path = image.display().to_string().replace(',', ",,");
    let mut has_format = false;
    for (k, v) in opts.iter_mut() {
        match k.as_str() {
            "file" => *v = path.clone(),
            "format" => {
                *v = "raw".into();
                has_format = true;
            }
            _ => {}
        }
    }
    if !has_format {
        opts.push(("format".into(), "raw".into()));
    }
    let value = opts.iter().map(|(k, v)| if v.is_empty() && k != "file" { k.clone() } else { format!("{k}={}", if k == "file" { v.clone() } else { v.replace(',', ",,") }) }).collect::<Vec<_>>().join(",");
    let mut out = cmdline.to_vec();
    out[arg] = value;
    Ok(out)
}

/// The point-in-time views of a VM's disks, from [`Fleece::prepare`] to [`Fleece::remove`].
pub struct Fleece {
    disks: Vec<Disk>,
    /// Per disk: the snapshot whose bitmap is read, and that snapshot's hashes of the disk.
    bases: Vec<Option<(String, Vec<vmcsnap_protocol::PageHash>)>>,
    /// The snapshot being taken and the VM (name its bitmaps).
    snapshot: String,
    vm: String,
    bitmaps_added: bool,
    tag: String,
    /// The NBD server's socket.
    pub sock: PathBuf,
    targets: usize,
    /// A paused VM's disks, read as they are (it stays paused): no views, no bitmaps.
    direct: bool,
    frozen: bool,
    accessed: usize,
    server: bool,
    exported: usize,
}

impl Fleece {
    /// Step 1: a temporary target for each disk of VM `vm` (`tag`, unique, keeps concurrent
    /// captures apart) of a capture for snapshot `snapshot`.
    pub async fn prepare(q: &mut Qmp, vm: &str, disks: Vec<Disk>, work_dir: &Path, tag: &str, snapshot: &str) -> Result<Self, QmpError> {
        let mut f = Fleece { direct: false, ..Self::direct(disks, work_dir, tag, snapshot, vm) };
        // A bitmap of an earlier snapshot of this name (one that failed, or was deleted):
        // this snapshot's starts now.
        for d in &f.disks {
            if d.since.iter().any(|s| s == snapshot) {
                let _ = q.execute("block-dirty-bitmap-remove", json!({ "node": d.node, "name": bitmap_name(snapshot, vm) })).await;
            }
        }
        for k in 0..f.disks.len() {
            let path = work_dir.join(format!("fleece-{tag}-{k}"));
            let _ = std::fs::remove_file(&path);
            let file = std::fs::OpenOptions::new().create_new(true).write(true).open(&path).and_then(|file| file.set_len(f.disks[k].size));
            if let Err(e) = file {
                let _ = std::fs::remove_file(&path);
                f.remove(q, false).await;
                return Err(QmpError::Protocol(format!("cannot create the temporary disk view {}: {e}", path.display())));
            }
            let added = q.execute("blockdev-add", json!({ "node-name": f.name("tmp", k), "driver": "file", "filename": path.display().to_string() })).await;
            // QEMU holds it open from here: unlinked, it goes with the node, or with QEMU.
            let _ = std::fs::remove_file(&path);
            if let Err(e) = added {
                f.remove(q, false).await;
                return Err(e);
            }
            f.targets += 1;
        }
        Ok(f)
    }

    /// For a VM that is paused and stays paused through the capture: its disks are exported
    /// and read as they are, without views or bitmaps (QEMU 7.2 deactivates the disks at the
    /// end of the stop-copy migration; an inactive disk still exports read-only, and `cont`
    /// reactivates it). The capture checks the VM was not resumed meanwhile.
    pub fn direct(disks: Vec<Disk>, work_dir: &Path, tag: &str, snapshot: &str, vm: &str) -> Self {
        let bases = disks.iter().map(|_| None).collect();
        Fleece {
            disks,
            bases,
            snapshot: snapshot.to_string(),
            vm: vm.to_string(),
            bitmaps_added: false,
            tag: tag.to_string(),
            sock: work_dir.join(format!("nbd-{tag}.sock")),
            targets: 0,
            direct: true,
            frozen: false,
            accessed: 0,
            server: false,
            exported: 0,
        }
    }

    /// Whether the disks are read as they are ([`Fleece::direct`]).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn name(&self, what: &str, k: usize) -> String {
        format!("{NAME_PREFIX}{what}-{}-{k}", self.tag)
    }

    /// The disks, in order.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Disk `k` is read incrementally: only the blocks written since snapshot `since` (one of
    /// its [`Disk::since`]), whose hashes of the disk `hashes` are (one per 4 KiB block).
    pub fn set_base(&mut self, k: usize, since: String, hashes: Vec<vmcsnap_protocol::PageHash>) {
        self.bases[k] = Some((since, hashes));
    }

    /// The snapshot being taken.
    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// The name of this VM's dirty bitmap of snapshot `since`.
    pub fn bitmap(&self, since: &str) -> String {
        bitmap_name(since, &self.vm)
    }

    /// Disk `k`'s base (see [`Fleece::set_base`]), if any.
    pub fn base(&self, k: usize) -> Option<&(String, Vec<vmcsnap_protocol::PageHash>)> {
        self.bases.get(k).and_then(Option::as_ref)
    }

    /// Step 2, with the VM paused: every disk's view starts now, in one transaction.
    pub async fn freeze(&mut self, q: &mut Qmp) -> Result<(), QmpError> {
        if self.direct {
            return Ok(());
        }
        let actions: Vec<Value> = (0..self.disks.len())
            .map(|k| {
                json!({ "type": "blockdev-backup", "data": {
                    "job-id": self.name("job", k), "device": self.disks[k].node, "target": self.name("tmp", k),
                    "sync": "none", "filter-node-name": self.name("cbw", k), "auto-dismiss": true,
                }})
            })
            .chain(self.disks.iter().map(|d| {
                json!({ "type": "block-dirty-bitmap-add", "data": {
                    "node": d.node, "name": self.bitmap(&self.snapshot), "persistent": d.qcow2,
                }})
            }))
            .collect();
        q.execute("transaction", json!({ "actions": actions })).await?;
        self.frozen = true;
        self.bitmaps_added = true;
        Ok(())
    }

    /// Step 3: the views, exported over NBD (export name: the device name).
    pub async fn export(&mut self, q: &mut Qmp) -> Result<(), QmpError> {
        for k in 0..self.disks.len() {
            if self.direct {
                break;
            }
            q.execute("blockdev-add", json!({ "node-name": self.name("acc", k), "driver": "snapshot-access", "file": self.name("cbw", k) })).await?;
            self.accessed += 1;
        }
        let _ = std::fs::remove_file(&self.sock);
        q.execute("nbd-server-start", json!({ "addr": { "type": "unix", "data": { "path": self.sock.display().to_string() } } }))
            .await
            .map_err(|e| QmpError::Protocol(format!("cannot start QEMU's NBD server for the disk views (is another backup running?): {e}")))?;
        self.server = true;
        for k in 0..self.disks.len() {
            let node = if self.direct { self.disks[k].node.clone() } else { self.name("acc", k) };
            let mut export = json!({ "type": "nbd", "id": self.name("exp", k), "node-name": node, "name": self.disks[k].device, "writable": false });
            if let Some((since, _)) = self.base(k) {
                export["bitmaps"] = json!([{ "node": self.disks[k].node, "name": self.bitmap(since) }]);
            }
            q.execute("block-export-add", export).await?;
            self.exported += 1;
        }
        Ok(())
    }

    /// Step 5: whatever steps 1 to 3 added, removed (best effort: each failure is logged).
    /// After a capture that succeeded (`captured`), this snapshot's bitmaps stay, with the
    /// ones it read, and older ones go; after one that failed, its own bitmaps go.
    pub async fn remove(self, q: &mut Qmp, captured: bool) {
        for k in 0..self.exported {
            let _ = q.execute("block-export-del", json!({ "id": self.name("exp", k), "mode": "hard" })).await;
        }
        if self.exported > 0 {
            wait_gone(q, "query-block-exports", "id", &format!("{NAME_PREFIX}exp-{}-", self.tag)).await;
        }
        if self.server {
            let _ = q.execute("nbd-server-stop", json!({})).await;
            let _ = std::fs::remove_file(&self.sock);
        }
        for k in 0..self.accessed {
            log_failure(q.execute("blockdev-del", json!({ "node-name": self.name("acc", k) })).await, "remove a disk view");
        }
        if self.frozen {
            for k in 0..self.disks.len() {
                log_failure(q.execute("block-job-cancel", json!({ "device": self.name("job", k), "force": true })).await, "cancel a disk view's job");
            }
            wait_gone(q, "query-block-jobs", "device", &format!("{NAME_PREFIX}job-{}-", self.tag)).await;
        }
        for k in 0..self.targets {
            log_failure(q.execute("blockdev-del", json!({ "node-name": self.name("tmp", k) })).await, "remove a disk view's target");
        }
        if !self.bitmaps_added {
            return;
        }
        for (k, d) in self.disks.iter().enumerate() {
            let base = self.base(k).map(|(s, _)| s.as_str());
            let gone: Vec<&str> = if captured {
                d.since.iter().map(String::as_str).filter(|s| Some(*s) != base && *s != self.snapshot).collect()
            } else {
                vec![self.snapshot.as_str()]
            };
            for s in gone {
                log_failure(q.execute("block-dirty-bitmap-remove", json!({ "node": d.node, "name": self.bitmap(s) })).await, "remove a dirty bitmap");
            }
        }
    }
}

fn log_failure(r: Result<Value, QmpError>, what: &str) {
    if let Err(e) = r {
        tracing::warn!(target: "vmcsnap::snapshot", error = %e, "cannot {what}");
    }
}

/// Waits until no entry of `query` has a `key` starting with `prefix`.
async fn wait_gone(q: &mut Qmp, query: &str, key: &str, prefix: &str) {
    let t0 = Instant::now();
    while t0.elapsed() < REMOVE_TIMEOUT {
        match q.execute(query, json!({})).await {
            Ok(v) if !v.as_array().into_iter().flatten().any(|e| e[key].as_str().is_some_and(|s| s.starts_with(prefix))) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => return,
        }
    }
    tracing::warn!(target: "vmcsnap::snapshot", query, prefix, "QEMU still lists what vmcsnap removed");
}

/// Removes every export, job and block node of vmcsnap's from the QEMU behind `q` (left by a
/// node that died during a snapshot). Returns how many things were removed.
pub async fn remove_leftovers(q: &mut Qmp) -> Result<usize, QmpError> {
    let ours = |v: &Value, key: &str| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|e| e[key].as_str()).filter(|s| s.starts_with(NAME_PREFIX)).map(str::to_string).collect()
    };
    let mut removed = 0;
    let exports = ours(&q.execute("query-block-exports", json!({})).await?, "id");
    for id in &exports {
        let _ = q.execute("block-export-del", json!({ "id": id, "mode": "hard" })).await;
        removed += 1;
    }
    if !exports.is_empty() {
        wait_gone(q, "query-block-exports", "id", NAME_PREFIX).await;
        // The server was ours if nothing else is exported through it.
        if q.execute("query-block-exports", json!({})).await?.as_array().is_none_or(|a| a.is_empty()) {
            let _ = q.execute("nbd-server-stop", json!({})).await;
        }
    }
    let nodes = ours(&q.execute("query-named-block-nodes", json!({ "flat": true })).await?, "node-name");
    for n in nodes.iter().filter(|n| n.starts_with(&format!("{NAME_PREFIX}acc-"))) {
        let _ = q.execute("blockdev-del", json!({ "node-name": n })).await;
        removed += 1;
    }
    let jobs = ours(&q.execute("query-block-jobs", json!({})).await?, "device");
    for j in &jobs {
        let _ = q.execute("block-job-cancel", json!({ "device": j, "force": true })).await;
        removed += 1;
    }
    if !jobs.is_empty() {
        wait_gone(q, "query-block-jobs", "device", NAME_PREFIX).await;
    }
    for n in nodes.iter().filter(|n| n.starts_with(&format!("{NAME_PREFIX}tmp-"))) {
        let _ = q.execute("blockdev-del", json!({ "node-name": n })).await;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_and_repoints_a_drive() {
        let c = argv(&["qemu-system-x86_64", "-m", "256", "-drive", "file=/vm/a,,b.qcow2,if=virtio,format=qcow2,file.locking=off", "-drive", "file=/vm/c.raw,if=virtio"]);
        assert_eq!(drive_arg(&c, "/vm/a,b.qcow2"), Some(4));
        assert_eq!(drive_arg(&c, "/vm/c.raw"), Some(6));
        assert_eq!(drive_arg(&c, "/vm/x"), None);
        let r = point_drive_at(&c, 4, Path::new("/restored/d,1.raw")).expect("drive 4");
        assert_eq!(r[4], "file=/restored/d,,1.raw,if=virtio,format=raw");
        assert_eq!(drive_arg(&r, "/restored/d,1.raw"), Some(4));
        let r = point_drive_at(&c, 6, Path::new("/restored/e.raw")).expect("drive 6");
        assert_eq!(r[6], "file=/restored/e.raw,if=virtio,format=raw");
        assert!(point_drive_at(&c, 2, Path::new("/x")).is_err());
    }
}

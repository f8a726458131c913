//! Restoring one VM of a snapshot, on any node.
//!
//! States, each with its own failure:
//! 1. **Find**: the commit record, from this node's catalog or its peers'.
//! 2. **Manifest**: walk the manifest tree down to the page hashes, fetching chunk pages like
//!    any page.
//! 3. **Fetch and write**: window by window, fetch every distinct page once (from this node's
//!    store if it holds it, else from its first reachable owner, else the next replica),
//!    verify it against its hash, and write it at every offset that holds it. Zero pages are
//!    not written: the target starts as a sparse file of zeros.
//! 4. **Finish**: fsync the partial file and rename it onto the target; until then the
//!    target path is untouched.
//!
//! Into QEMU (`--to qemu:unix:PATH`, or `--launch --eager`), step 3 writes a migration stream
//! instead: the recorded head and RAM block list, each non-zero page once, then the device
//! state; with the target's QMP socket the accelerator is checked first, and the guest is
//! resumed afterwards if it was running when captured. A `--launch --eager` restore reads
//! the manifest, the device state and the stream's first windows while its QEMU starts.
//!
//! With `--launch` (not `--eager`) the restore is lazy where QEMU can do it ([`super::lazy`]):
//! the guest runs once its device state is loaded and its memory follows. Where it cannot (a
//! VM paused when captured, RAM that is a shared file mapping, QEMU refusing postcopy, or a
//! lazy load failing before the guest ran), the restore is eager and says why.

use super::error::RestoreError;
use super::fetch::{check_target, expand_manifest, fetch_blob, forget_elsewhere, Fetcher};
use super::lazy::LazyError;
use super::{Progress, RESTORE_WINDOWS_IN_FLIGHT, RESTORE_WINDOW_PAGES};
use crate::node::Node;
use crate::qemu::qmp::Qmp;
use crate::qemu::stream::Rebuilder;
use crate::source::Target;
use futures::{stream, StreamExt};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmcsnap_dht::Member;
use vmcsnap_protocol::control::RestoreSummary;
use vmcsnap_protocol::manifest::{CommitRecord, QemuState, VmEntry};
use vmcsnap_protocol::wire::{DataRequest, DataResponse};
use vmcsnap_protocol::{PageHash, PAGE_SIZE};

/// Time a remote host has to restore one VM.
pub const REMOTE_RESTORE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Restores `vms` of snapshot `name` (all of its VMs when empty): into the target `opts`
/// names (one VM, on this host), or with `opts.launch` on the hosts `on` chooses — `HOST` for
/// every VM or `VM=HOST` — else on the host that captured each VM if it is up, else here.
/// Hosts work in parallel; a VM launched on a host is registered there and forgotten elsewhere.
pub async fn restore_many(
    node: Arc<Node>,
    name: String,
    vms: Vec<String>,
    on: Vec<String>,
    opts: RestoreOptions,
    progress: Progress,
) -> Result<Vec<RestoreSummary>, RestoreError> {
    if !opts.launch {
        let [vm] = vms.as_slice() else {
            return Err(RestoreError::Target("--to restores one VM: name it with --vm (or use --launch for several)".into()));
        };
        if !on.is_empty() {
            return Err(RestoreError::Target("--on goes with --launch; --to writes on this host".into()));
        }
        return Ok(vec![restore(node, name, vm.clone(), opts, progress).await?]);
    }
    let record = node.find_record(&name).await?;
    let plan = plan_hosts(&node, &record, vms, &on)?;
    let results = futures::future::join_all(plan.iter().map(|(vm, host)| launch_on(&node, &name, vm, host, (opts.eager, opts.in_place), progress.clone()))).await;
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for ((vm, host), r) in plan.iter().zip(results) {
        match r {
            Ok(s) => {
                forget_elsewhere(&node, vm, host).await;
                out.push(s);
            }
            Err(e) => {
                let e = if e.contains(&format!("VM {vm}")) { e } else { format!("VM {vm}: {e}") };
                failed.push(format!("host {}: {e}", node.host_name(&host.id)));
            }
        }
    }
    if !failed.is_empty() {
        return Err(RestoreError::Hosts {
            failed: failed.join("; "),
            restored: out.iter().map(|s| format!("{} on {}", s.vm, s.host)).collect::<Vec<_>>().join(", "),
        });
    }
    Ok(out)
}

/// The host each VM is launched on: `on`'s `VM=HOST`, else its `HOST`, else the host that
/// captured the VM if it is up, else this node.
fn plan_hosts(node: &Node, record: &CommitRecord, vms: Vec<String>, on: &[String]) -> Result<Vec<(String, Member)>, RestoreError> {
    let vms: Vec<String> = if vms.is_empty() { record.vms.iter().map(|v| v.id.clone()).collect() } else { vms };
    let mut all_host = None;
    let mut per_vm = HashMap::new();
    for o in on {
        match o.split_once('=') {
            Some((vm, host)) => {
                per_vm.insert(vm.to_string(), node.find_host(host).map_err(RestoreError::Target)?);
            }
            None => all_host = Some(node.find_host(o).map_err(RestoreError::Target)?),
        }
    }
    let mut plan: Vec<(String, Member)> = Vec::new();
    for vm in &vms {
        let entry = record.vm(vm).ok_or_else(|| RestoreError::UnknownVm {
            name: record.name.clone(),
            vm: vm.clone(),
            have: record.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", "),
        })?;
        let host = match (per_vm.get(vm), &all_host) {
            (Some(h), _) | (None, Some(h)) => h.clone(),
            (None, None) => match node.member(&entry.host) {
                Some(m) if m.alive => m,
                _ => node.member(&node.id).ok_or_else(|| RestoreError::Internal("this node is not a member".into()))?,
            },
        };
        if !host.alive {
            return Err(RestoreError::Target(format!("host {} is down; choose another with --on", node.host_name(&host.id))));
        }
        plan.push((vm.clone(), host));
    }
    for vm in per_vm.keys() {
        if !vms.contains(vm) {
            return Err(RestoreError::Target(format!("--on {vm}=...: VM {vm} is not being restored")));
        }
    }
    Ok(plan)
}

/// Restores and launches `vm` on `host` (here, or by asking it once).
async fn launch_on(node: &Arc<Node>, name: &str, vm: &str, host: &Member, (eager, in_place): (bool, bool), progress: Progress) -> Result<RestoreSummary, String> {
    if host.id == node.id {
        let opts = RestoreOptions { launch: true, eager, in_place, ..Default::default() };
        return restore(node.clone(), name.to_string(), vm.to_string(), opts, progress).await.map_err(|e| e.to_string());
    }
    let req = DataRequest::RestoreVm { name: name.to_string(), vm: vm.to_string(), eager, in_place };
    match node.call_within(host, req, REMOTE_RESTORE_TIMEOUT).await {
        Ok(DataResponse::Restored(s)) => Ok(s),
        Ok(_) => Err("answered with the wrong message".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn partial_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.vmcsnap-partial"))
}

/// Where and how to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// `file:PATH` or `qemu:unix:PATH`; `None` with `launch`.
    pub target: Option<String>,
    /// Replace an existing file target.
    pub force: bool,
    /// Start the recorded QEMU command line here and restore into it.
    pub launch: bool,
    /// QMP socket of a `qemu:unix:` target.
    pub qmp: Option<String>,
    /// With `launch`: load all memory before the guest runs (else the guest runs at once and
    /// its memory follows, where QEMU supports postcopy).
    pub eager: bool,
    /// With a file target: this disk of the VM (device name) instead of its memory.
    pub disk: Option<String>,
    /// With `launch`: write the VM's disks over the images its command line names.
    pub in_place: bool,
}

enum Dest {
    File(PathBuf),
    Qemu { incoming: PathBuf, qmp: Option<PathBuf>, launched: Option<crate::qemu::launch::Launched> },
}

/// Restores VM `vm` of snapshot `name` as `opts` say.
pub async fn restore(node: Arc<Node>, name: String, vm: String, opts: RestoreOptions, mut progress: Progress) -> Result<RestoreSummary, RestoreError> {
    let t0 = Instant::now();
    // A lazy restore's guest runs on memory this node serves: the node waits for it to stop.
    let Some(_running) = node.drain.enter() else {
        return Err(RestoreError::Conflict(format!("host {} is shutting down; restore elsewhere or after it restarts", node.config.name)));
    };
    let target = match (&opts.target, opts.launch) {
        (Some(_), true) => return Err(RestoreError::Target("give either --to or --launch, not both".into())),
        (None, false) => return Err(RestoreError::Target("say where: --to file:PATH, --to qemu:unix:PATH, or --launch".into())),
        (None, true) => None,
        (Some(t), false) => Some(Target::parse(t).map_err(RestoreError::Target)?),
    };
    let record = node.find_record(&name).await?;
    let entry = record.vm(&vm).ok_or_else(|| RestoreError::UnknownVm {
        name: name.clone(),
        vm: vm.clone(),
        have: record.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", "),
    })?;
    let qemu_state = || {
        entry.qemu.as_ref().ok_or_else(|| {
            RestoreError::Target(format!("VM {vm} was captured from {}, not a running QEMU; restore it with --to file:PATH", entry.source))
        })
    };
    let mut disks = Vec::new();
    let mut launch_state = None;
    let (mut prefetched, mut keeper, mut eager_start) = (None, None, None);
    let dest = match target {
        Some(Target::File(path)) => file_dest(path, opts.force)?,
        Some(Target::QemuIncoming(_)) if opts.disk.is_some() => return Err(RestoreError::Target("--disk writes a disk to a file: use --to file:PATH".into())),
        Some(Target::QemuIncoming(incoming)) => {
            qemu_state()?;
            if !entry.disks().is_empty() && !opts.force {
                return Err(RestoreError::Target(format!(
                    "VM {vm}'s snapshot holds its disks, and --to qemu: restores only its memory, onto whatever disks that QEMU has (a guest whose memory and disks disagree can corrupt its file systems); use --launch, which restores both, or pass --force to restore the memory alone"
                )));
            }
            Dest::Qemu { incoming, qmp: opts.qmp.as_ref().map(PathBuf::from), launched: None }
        }
        None if opts.disk.is_some() => return Err(RestoreError::Target("--disk goes with --to file:PATH (--launch restores every disk)".into())),
        None => {
            let launch = prepare_launch(&node, &record, entry, qemu_state()?, &opts, &mut progress).await?;
            disks = launch.disks;
            launch_state = Some(launch.state);
            prefetched = launch.prefetched;
            keeper = launch.keeper;
            eager_start = launch.eager;
            let l = launch.launched;
            Dest::Qemu { incoming: l.incoming.clone(), qmp: Some(l.qmp.clone()), launched: Some(l) }
        }
    };
    tracing::debug!(target: "vmcsnap::restore", ms = t0.elapsed().as_secs_f64() * 1e3, "target ready");
    let kill = |l: &crate::qemu::launch::Launched| {
        // A QEMU we started for a restore that failed would only wait forever (killed: one
        // blocked loading a stream never gets to act on SIGTERM).
        let _ = std::process::Command::new("kill").args(["-KILL", &l.pid.to_string()]).status();
    };
    let mut note = None;
    let mut lazy = None;
    let mut dest = dest;
    if let (Dest::Qemu { launched: Some(l), .. }, false) = (&dest, opts.eager) {
        match restore_lazy(&node, (&name, &record, entry), l, (prefetched.take(), keeper.take()), t0, &mut progress).await {
            Ok(done) => lazy = Some(done),
            Err(LazyError::Refused(why)) => {
                tracing::info!(target: "vmcsnap::restore", vm = %vm, reason = %why, "no lazy restore: restoring eagerly");
                note = Some(format!("restored eagerly: {why}"));
            }
            Err(LazyError::Failed(e)) => {
                // Before the guest ran: nothing is lost by starting over, eagerly, in a fresh
                // QEMU (one that failed a postcopy load does not take another stream).
                kill(l);
                let log = crate::qemu::launch::log_tail(&l.log);
                tracing::warn!(target: "vmcsnap::restore", vm = %vm, error = %e, qemu_log = %log, "lazy restore failed before the guest ran; restoring eagerly");
                note = Some(format!("restored eagerly: the lazy restore failed before the guest ran ({}{})", e, if log.is_empty() { String::new() } else { format!("; QEMU said: {log}") }));
                let state = launch_state.as_ref().map_or_else(qemu_state, Ok)?;
                wait_gone(l.pid).await;
                let l = launch_here(&node, &vm, state).await?;
                dest = Dest::Qemu { incoming: l.incoming.clone(), qmp: Some(l.qmp.clone()), launched: Some(l) };
            }
            Err(LazyError::Paused(e)) => {
                let _ = node.vms.add(&vm, &l.qmp);
                node.publish_state();
                return Err(e);
            }
        }
    }
    let (pages_needed, fetcher_stats, vm_status, running_ms, requested) = match lazy {
        Some((distinct, served)) => {
            let s = served.stats;
            note = served.resumed;
            (distinct, s.fetched, Some("running".to_string()), Some(served.running_ms), Some(s.requested))
        }
        None => {
            let r = restore_into(&node, &record, entry, &dest, opts.disk.as_deref(), eager_start.take(), &mut progress).await;
            if r.is_err() {
                if let Dest::Qemu { launched: Some(l), .. } = &dest {
                    kill(l);
                    if !opts.in_place {
                        remove_disks(&disks); // new images; in place, the old ones are gone already
                    }
                }
            }
            let (pages_needed, stats, status) = r?;
            let running = (status.as_deref() == Some("running")).then(|| t0.elapsed().as_millis() as u64);
            (pages_needed, stats, status, running, None)
        }
    };
    if let Dest::Qemu { launched: Some(l), .. } = &dest {
        // The VM runs on this host now.
        if let Err(e) = node.vms.add(&vm, &l.qmp) {
            tracing::warn!(target: "vmcsnap::restore", vm = %vm, error = %e, "cannot register the restored VM");
        }
        node.publish_state();
    }
    Ok(RestoreSummary {
        name,
        host: node.config.name.clone(),
        vm,
        target: match &dest {
            Dest::File(p) => format!("file:{}", p.display()),
            Dest::Qemu { incoming, .. } => format!("qemu:unix:{}", incoming.display()),
        },
        raw_bytes: entry.ram_pages() * PAGE_SIZE as u64,
        pages_needed,
        pages_local: fetcher_stats.pages_local,
        pages_shared: fetcher_stats.pages_shared,
        bytes_fetched: fetcher_stats.bytes_fetched,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        launched_pid: match &dest {
            Dest::Qemu { launched: Some(l), .. } => Some(l.pid),
            _ => None,
        },
        vm_status,
        lazy: requested.is_some(),
        running_ms,
        pages_requested: requested,
        note,
        disks: disks.iter().map(|(d, p)| format!("{d}={}", p.display())).collect(),
    })
}

/// A file target: refused if it exists (unless `force`) or its directory does not.
fn file_dest(path: PathBuf, force: bool) -> Result<Dest, RestoreError> {
    if path.symlink_metadata().is_ok() && !force {
        return Err(RestoreError::Target(format!("{} exists; pass --force to replace it", path.display())));
    }
    match path.parent() {
        Some(d) if d.is_dir() => Ok(Dest::File(path)),
        _ => Err(RestoreError::Target(format!("the directory of {} does not exist", path.display()))),
    }
}

/// A `--launch` restore up to a QEMU waiting for its memory.
struct Launch {
    launched: crate::qemu::launch::Launched,
    /// The command line it was started with (its drives on the restored disks).
    state: QemuState,
    /// Each restored disk's device and image.
    disks: Vec<(String, PathBuf)>,
    /// For a lazy restore: the page manifest and the device state, read while QEMU started.
    prefetched: Option<super::lazy::Prepared>,
    /// For a lazy restore: the monitor keeper, started beside QEMU.
    keeper: Option<crate::qemu::keeper::Keeper>,
    /// For an eager restore: its start, read while QEMU started.
    eager: Option<EagerStart>,
}

/// What an eager restore into a QEMU it launches reads while that QEMU starts (tens of ms
/// for one QEMU here, a couple of hundred with several starting at once): the page hashes,
/// the device state and the stream's first windows.
struct EagerStart {
    /// Every page of the VM, its memory first.
    hashes: Vec<PageHash>,
    /// The recorded device state.
    tail: Vec<u8>,
    /// The first windows of its memory, in order.
    windows: Vec<Window>,
    /// Where their pages came from.
    stats: super::fetch::FetchStats,
}

/// Windows an eager restore fetches while its QEMU starts: as many as it keeps in flight
/// afterwards, so that it holds no more memory than it would anyway.
const EAGER_START_WINDOWS: usize = RESTORE_WINDOWS_IN_FLIGHT;

/// Reads an [`EagerStart`] of `entry`.
async fn eager_start(node: &Arc<Node>, record: &CommitRecord, entry: &VmEntry) -> Result<EagerStart, RestoreError> {
    let state = entry.qemu.as_ref().ok_or_else(|| RestoreError::Internal("no QEMU state".into()))?;
    let fetcher = Fetcher::new(node, record);
    let (hashes, tail) = tokio::join!(expand_manifest(&fetcher, entry, |_, _| {}), fetch_blob(&fetcher, &state.device_state));
    let (hashes, tail) = (hashes?, tail?);
    let ram = &hashes[..(entry.ram_pages() as usize).min(hashes.len())];
    let mut fetches = Vec::new();
    for (w, window) in ram.chunks(RESTORE_WINDOW_PAGES).take(EAGER_START_WINDOWS).enumerate() {
        let base = (w * RESTORE_WINDOW_PAGES) as u64;
        fetches.push(fetch_window(&fetcher, window, base, None));
    }
    let windows = futures::future::try_join_all(fetches).await?;
    Ok(EagerStart { stats: fetcher.stats(), hashes, tail, windows })
}

/// One window of pages at page `base`, fetched (with `first`, see [`window_need`]).
async fn fetch_window(fetcher: &Fetcher<'_>, window: &[PageHash], base: u64, first: Option<&HashMap<PageHash, u64>>) -> Result<Window, RestoreError> {
    let pages = fetcher.fetch(window_need(window, base, first)).await?;
    Ok((base, window.to_vec(), pages))
}

/// Restores `entry`'s disks, then starts its QEMU here and reads meanwhile what the restore
/// starts with: a lazy one its manifest, device state and early pages, an eager one its
/// [`EagerStart`] (best effort: what fails here is read again afterwards). A failed start
/// removes new disk images.
async fn prepare_launch(
    node: &Arc<Node>,
    record: &CommitRecord,
    entry: &VmEntry,
    recorded: &QemuState,
    opts: &RestoreOptions,
    progress: &mut Progress,
) -> Result<Launch, RestoreError> {
    // Its disks first, into new images the VM is then pointed at.
    let (state, disks) = restore_disks(node, record, entry, recorded, opts.in_place, progress).await?;
    let lazy = !opts.eager && lazy_refusal(recorded).is_none();
    let ksock = crate::qemu::keeper::socket_of(&node.config.data_dir, &entry.id);
    let launch = launch_here_with(node, &entry.id, &state, move |qmp| lazy.then(|| crate::qemu::keeper::Keeper::spawn(qmp, &ksock).ok()).flatten());
    let read = async {
        if lazy {
            return (super::lazy::prepare(node, record, entry, |_, _| {}).await.ok(), None);
        }
        match eager_start(node, record, entry).await {
            Ok(s) => (None, Some(s)),
            Err(e) => {
                tracing::debug!(target: "vmcsnap::restore", vm = %entry.id, error = %e, "nothing read while QEMU started");
                (None, None)
            }
        }
    };
    let (launched, (prefetched, eager)) = tokio::join!(launch, read);
    match launched {
        Ok((launched, keeper)) => Ok(Launch { launched, state, disks, prefetched, keeper, eager }),
        Err(e) => {
            if !opts.in_place {
                remove_disks(&disks); // new images; in place, the old ones are gone already
            }
            Err(e)
        }
    }
}

/// Writes each disk of `entry` into a new sparse raw image in this host's disk directory
/// (`DISK_DIR/VM/SNAPSHOT-DEVICE-TIME.raw`). Returns `state` with the VM's drives pointed at
/// them, and each disk's device and image. The VM's original disks are never touched —
/// unless `in_place`: then each is written beside the image its command line names and, once
/// all are, renamed over it (an image outside the host's launch and disk directories is
/// refused).
async fn restore_disks(
    node: &Arc<Node>,
    record: &CommitRecord,
    entry: &VmEntry,
    state: &QemuState,
    in_place: bool,
    progress: &mut Progress,
) -> Result<(QemuState, Vec<(String, PathBuf)>), RestoreError> {
    let disks = entry.disks();
    if disks.is_empty() {
        return Ok((state.clone(), vec![]));
    }
    let dir = node.config.disk_dir().join(&entry.id);
    let policy = node.launch_policy();
    // In place: where each disk goes in the end (checked before anything is written).
    let mut finals: Vec<Option<PathBuf>> = Vec::new();
    for (d, _, _) in &disks {
        if !in_place {
            finals.push(None);
            continue;
        }
        let file = crate::qemu::disks::drive_file(&state.cmdline, d.arg)
            .ok_or_else(|| RestoreError::Target(format!("disk {}: the recorded command line names no image for it", d.device)))?;
        let p = PathBuf::from(&file);
        if let Err(why) = policy.may_write(&p) {
            return Err(RestoreError::Target(format!("--in-place: disk {}: {why}; or restore into new images (without --in-place)", d.device)));
        }
        if !p.parent().is_some_and(Path::is_dir) {
            return Err(RestoreError::Target(format!("--in-place: disk {}'s image {file} has no directory on this host; restore into new images (without --in-place)", d.device)));
        }
        finals.push(Some(p));
    }
    if !in_place {
        std::fs::create_dir_all(&dir).map_err(|e| RestoreError::Write { path: dir.clone(), reason: e.to_string() })?;
    }
    let fetcher = Fetcher::new(node, record);
    progress.phase("manifest", entry.manifest.depth as u64);
    let hashes = expand_manifest(&fetcher, entry, |done, _| progress.set(done as u64)).await?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let mut state = state.clone();
    let mut done: Vec<(String, PathBuf)> = Vec::new();
    for ((d, first, pages), fin) in disks.into_iter().zip(&finals) {
        let path = match fin {
            Some(f) => f.with_file_name(format!(".{}.vmcsnap-restored-{stamp}", f.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())),
            None => dir.join(format!("{}-{}-{stamp}.raw", record.name, d.device)),
        };
        let r = async {
            if path.symlink_metadata().is_ok() {
                return Err(RestoreError::Target(format!("{} exists", path.display())));
            }
            state.cmdline = crate::qemu::disks::point_drive_at(&state.cmdline, d.arg, fin.as_ref().unwrap_or(&path)).map_err(RestoreError::Target)?;
            restore_file(&fetcher, &hashes[first as usize..(first + pages) as usize], &path, Some(d.size), progress).await
        };
        if let Err(e) = r.await {
            remove_disks(&done);
            return Err(e);
        }
        done.push((d.device, path));
    }
    // In place: every disk is written; now they replace the images, one rename each.
    for k in 0..done.len() {
        if let Some(f) = &finals[k] {
            if let Err(e) = std::fs::rename(&done[k].1, f) {
                // The images renamed so far are the snapshot's; the others stay as they were.
                remove_disks(&done[k..]);
                return Err(RestoreError::Write { path: f.clone(), reason: e.to_string() });
            }
            done[k].1 = f.clone();
        }
    }
    for (device, path) in &done {
        tracing::info!(target: "vmcsnap::restore", vm = %entry.id, device = %device, image = %path.display(), in_place, "disk restored");
    }
    Ok((state, done))
}

/// Removes the images [`restore_disks`] wrote (the restore that wanted them failed).
fn remove_disks(disks: &[(String, PathBuf)]) {
    for (_, p) in disks {
        let _ = std::fs::remove_file(p);
    }
}

/// Starts the VM's recorded QEMU command line on this host, waiting for its stream.
async fn launch_here(node: &Arc<Node>, vm: &str, state: &QemuState) -> Result<crate::qemu::launch::Launched, RestoreError> {
    Ok(launch_here_with(node, vm, state, |_| ()).await?.0)
}

/// [`launch_here`], with `beside` run as soon as QEMU is started (given its monitor's path).
async fn launch_here_with<T: Send + 'static>(
    node: &Arc<Node>,
    vm: &str,
    state: &QemuState,
    beside: impl FnOnce(&Path) -> T + Send + 'static,
) -> Result<(crate::qemu::launch::Launched, T), RestoreError> {
    let dir = node.config.data_dir.clone();
    let (vm2, st, policy) = (vm.to_string(), state.clone(), node.launch_policy());
    let l = tokio::task::spawn_blocking(move || crate::qemu::launch::launch(&dir, &vm2, &st, &policy, beside))
        .await
        .map_err(|e| RestoreError::Internal(e.to_string()))?
        .map_err(|e| match e {
            crate::qemu::launch::LaunchError::Refused(m) => RestoreError::Target(m),
            crate::qemu::launch::LaunchError::Failed(m) => RestoreError::Qemu(m),
        })?;
    tracing::info!(target: "vmcsnap::restore", vm, pid = l.0.pid, log = %l.0.log.display(), "launched QEMU for the restore");
    Ok(l)
}

/// Waits (a few seconds at most) until process `pid` is gone, so that its sockets are free.
async fn wait_gone(pid: u32) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    for _ in 0..500 {
        // A zombie keeps its /proc entry until reaped; its state is `Z`.
        match std::fs::read_to_string(proc.join("stat")) {
            Ok(s) if s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
}

/// Why a VM captured as `state` is not restored lazily, if it is not.
fn lazy_refusal(state: &QemuState) -> Option<String> {
    if !state.was_running {
        return Some("the VM was paused when captured, and a postcopy restore runs it".into());
    }
    lazy_unsupported(&state.cmdline)
}

/// Why QEMU cannot restore a VM lazily, read from its command line: RAM that is a shared
/// mapping of a file (userfaultfd cannot fill missing pages of a regular file).
fn lazy_unsupported(cmdline: &[String]) -> Option<String> {
    cmdline
        .windows(2)
        .any(|w| w[0] == "-object" && is_shared_file_backend(&w[1]))
        .then(|| "its RAM is a shared mapping of a file, which QEMU cannot fill lazily".to_string())
}

/// Is an `-object` value a memory backend that maps a file shared: `memory-backend-file,...,
/// share=on`, or libvirt's JSON form `{"qom-type":"memory-backend-file",...,"share":true}`?
fn is_shared_file_backend(value: &str) -> bool {
    if value.trim_start().starts_with('{') {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(value) else { return false };
        return v["qom-type"] == "memory-backend-file" && (v["share"] == true || v["share"] == "on");
    }
    let opts = crate::qemu::disks::drive_options(value);
    let file = opts.iter().enumerate().any(|(i, (k, v))| (i == 0 && k == "memory-backend-file" && v.is_empty()) || (k == "qom-type" && v == "memory-backend-file"));
    file && opts.iter().any(|(k, v)| k == "share" && matches!(v.as_str(), "on" | "true" | "yes"))
}

/// A lazy restore into the QEMU launched as `l`: the manifest and device state first (unless
/// `prefetched` while QEMU started), then [`super::lazy::restore`]. Returns the distinct
/// non-zero pages and how it went.
async fn restore_lazy(
    node: &Arc<Node>,
    (name, record, entry): (&str, &CommitRecord, &VmEntry),
    l: &crate::qemu::launch::Launched,
    (prefetched, keeper): (Option<super::lazy::Prepared>, Option<crate::qemu::keeper::Keeper>),
    t0: Instant,
    progress: &mut Progress,
) -> Result<(u64, super::lazy::Served), LazyError> {
    let state = entry.qemu.as_ref().ok_or_else(|| RestoreError::Internal("no QEMU state".into()))?;
    if let Some(why) = lazy_refusal(state) {
        return Err(LazyError::Refused(why));
    }
    let mut prepared = match prefetched {
        Some(p) => p,
        None => {
            progress.phase("manifest", entry.manifest.depth as u64);
            super::lazy::prepare(node, record, entry, |done, _| progress.set(done as u64)).await?
        }
    };
    prepared.hashes.truncate(entry.ram_pages() as usize); // its disks were restored before the launch
    // Counted beside the restore, not on its way to running.
    let hashes = prepared.hashes.clone();
    let distinct = tokio::task::spawn_blocking(move || hashes.iter().filter(|h| !h.is_zero()).collect::<std::collections::HashSet<_>>().len() as u64);
    let served = super::lazy::restore(node, name, record, &entry.id, prepared, l, keeper, t0, progress.clone()).await?;
    let distinct = distinct.await.map_err(|e| RestoreError::Internal(e.to_string()))?;
    Ok((distinct, served))
}

/// A restore's distinct non-zero pages, where they came from, and the target QEMU's run state.
type Restored = (u64, super::fetch::FetchStats, Option<String>);

/// Restores into `dest`; `start` (an eager launch's, [`EagerStart`]) is what was read already.
async fn restore_into(
    node: &Arc<Node>,
    record: &CommitRecord,
    entry: &VmEntry,
    dest: &Dest,
    disk: Option<&str>,
    start: Option<EagerStart>,
    progress: &mut Progress,
) -> Result<Restored, RestoreError> {
    let t0 = Instant::now();
    // Which pages: the memory's, or one disk's (and its exact size).
    let (range, len) = match disk {
        None => (0..entry.ram_pages(), None),
        Some(dev) => {
            let disks = entry.disks();
            let (d, first, pages) = disks.iter().find(|(d, _, _)| d.device == dev).ok_or_else(|| {
                let have: Vec<&str> = disks.iter().map(|(d, _, _)| d.device.as_str()).collect();
                RestoreError::Target(format!("VM {} has no disk {dev:?} in this snapshot (it has: {})", entry.id, if have.is_empty() { "none".into() } else { have.join(", ") }))
            })?;
            (*first..first + pages, Some(d.size))
        }
    };
    // 2. Manifest.
    let fetcher = Fetcher::new(node, record);
    let start = start.filter(|_| disk.is_none() && matches!(dest, Dest::Qemu { .. }));
    let (all, tail, ready, read) = match start {
        Some(s) => (s.hashes, Some(s.tail), s.windows, s.stats),
        None => {
            progress.phase("manifest", entry.manifest.depth as u64);
            (expand_manifest(&fetcher, entry, |done, _| progress.set(done as u64)).await?, None, vec![], Default::default())
        }
    };
    // Memory only, unless a disk was asked for: disks are restored into images of their own.
    let hashes = &all[range.start as usize..range.end as usize];
    tracing::debug!(target: "vmcsnap::restore", ms = t0.elapsed().as_secs_f64() * 1e3, "manifest read");

    // 3. Fetch and write.
    let (distinct, status) = match dest {
        Dest::File(path) => (restore_file(&fetcher, hashes, path, len, progress).await?, None),
        Dest::Qemu { incoming, qmp, .. } => {
            let state = entry.qemu.as_ref().ok_or_else(|| RestoreError::Internal("no QEMU state".into()))?;
            restore_qemu(&fetcher, entry, state, hashes, (tail, ready), incoming, qmp.as_deref(), progress).await?
        }
    };
    tracing::debug!(target: "vmcsnap::restore", ms = t0.elapsed().as_secs_f64() * 1e3, "restored");
    Ok((distinct, fetcher.stats().plus(read), status))
}

/// Writes the pages `hashes` into a new file at `path` (through a partial file renamed at the
/// end); `len` cuts the file to a length that is not a whole number of pages.
async fn restore_file(fetcher: &Fetcher<'_>, hashes: &[PageHash], path: &Path, len: Option<u64>, progress: &mut Progress) -> Result<u64, RestoreError> {
    let tmp = partial_path(path);
    let write_err = |e: std::io::Error| RestoreError::Write { path: path.to_path_buf(), reason: e.to_string() };
    // A stale partial file of ours goes first (unlink does not follow a link planted there);
    // the new one is created, never opened through an existing path or link.
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new().create_new(true).write(true).read(true).open(&tmp).map_err(write_err)?;
    file.set_len(hashes.len() as u64 * PAGE_SIZE as u64).map_err(write_err)?;
    let file = Arc::new(file);
    let distinct = match fill(fetcher, hashes, file.clone(), progress).await {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Some(len) = len {
        if let Err(e) = file.set_len(len) {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
    }
    // 4. Finish: durable, then visible under its name.
    let f2 = file.clone();
    let synced = tokio::task::spawn_blocking(move || f2.sync_all()).await.map_err(|e| RestoreError::Internal(e.to_string()))?;
    if let Err(e) = synced.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(distinct)
}

/// Writes a migration stream of the VM into a QEMU waiting on `incoming`; with its QMP
/// socket, checks the accelerator first and leaves the guest running if it was. `read`: the
/// device state and the first windows, if read already.
#[allow(clippy::too_many_arguments)]
async fn restore_qemu(
    fetcher: &Fetcher<'_>,
    entry: &VmEntry,
    state: &QemuState,
    hashes: &[PageHash],
    (tail, ready): (Option<Vec<u8>>, Vec<Window>),
    incoming: &Path,
    qmp: Option<&Path>,
    progress: &mut Progress,
) -> Result<(u64, Option<String>), RestoreError> {
    let target_err = |m: String| RestoreError::Target(m);
    let mut q = match qmp {
        Some(p) => Some(Qmp::connect(p).await.map_err(|e| target_err(e.to_string()))?),
        None => None,
    };
    if let Some(q) = q.as_mut() {
        check_target(q, &entry.id, state).await?;
    }
    let t0 = Instant::now();
    let tail = match tail {
        Some(t) => t,
        None => fetch_blob(fetcher, &state.device_state).await?,
    };
    tracing::debug!(target: "vmcsnap::restore", ms = t0.elapsed().as_secs_f64() * 1e3, ready = ready.len(), "device state fetched");
    let meta = crate::qemu::stream_meta(state, &entry.blocks);
    // Page index where each block starts.
    let mut starts = Vec::with_capacity(meta.blocks.len());
    let mut at = 0u64;
    for b in &meta.blocks {
        starts.push(at);
        at += b.bytes / PAGE_SIZE as u64;
    }
    let conn = std::os::unix::net::UnixStream::connect(incoming)
        .map_err(|e| target_err(format!("cannot connect to the QEMU waiting on {}: {e}", incoming.display())))?;
    // RAM that is a mapping of a file starts with whatever the file holds (an earlier run of
    // the VM), not zeros: its zero pages are sent too.
    let send_zeros = lazy_unsupported(&state.cmdline).is_some();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Window>(2);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut rb = Rebuilder::start(std::io::BufWriter::with_capacity(1 << 20, conn), meta)?;
        let zero = [0u8; PAGE_SIZE];
        while let Some((base, window, pages)) = rx.blocking_recv() {
            for (i, h) in window.iter().enumerate() {
                let g = base + i as u64;
                let b = starts.partition_point(|&s| s <= g) - 1;
                if h.is_zero() {
                    if send_zeros {
                        rb.page(b, g - starts[b], &zero)?;
                    }
                    continue; // else the destination's RAM starts zeroed
                }
                let data = pages.get(h).ok_or_else(|| std::io::Error::other("page missing from the restore plan"))?;
                rb.page(b, g - starts[b], data)?;
            }
        }
        let w = rb.finish(&tail)?;
        let conn = w.into_inner().map_err(|e| e.into_error())?;
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let fetched = fetch_windows(fetcher, hashes, None, ready, tx, progress).await;
    let written = writer.await.map_err(|e| RestoreError::Internal(e.to_string()))?;
    let distinct = fetched?;
    written.map_err(|e| RestoreError::Write { path: incoming.to_path_buf(), reason: e.to_string() })?;

    tracing::debug!(target: "vmcsnap::restore", ms = t0.elapsed().as_secs_f64() * 1e3, "stream written");
    // QEMU loads the stream; wait until it has, then leave the guest as it was.
    let Some(q) = q.as_mut() else { return Ok((distinct, None)) };
    let t0 = Instant::now();
    let status = loop {
        let s = match q.status().await {
            Ok(s) => s,
            Err(e) => return Err(target_err(format!("QEMU failed to load the snapshot ({e}); it exits on a stream it cannot load — see its log"))),
        };
        if s != "inmigrate" {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(target_err("QEMU did not finish loading the snapshot within 60 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tracing::debug!(target: "vmcsnap::restore", ms = t0.elapsed().as_secs_f64() * 1e3, "QEMU loaded the stream");
    let status = if status == "paused" && state.was_running {
        q.execute("cont", serde_json::json!({})).await.map_err(|e| target_err(e.to_string()))?;
        q.status().await.map_err(|e| target_err(e.to_string()))?
    } else {
        status
    };
    Ok((distinct, Some(status)))
}

/// Largest run of consecutive pages written with one call.
const RUN_BYTES_MAX: usize = 1 << 20;

/// One restore window: first page index, the window's hashes, the fetched pages.
type Window = (u64, Vec<PageHash>, HashMap<PageHash, bytes::Bytes>);

/// Fetches `hashes` window by window, [`RESTORE_WINDOWS_IN_FLIGHT`] at a time, and sends
/// each finished window, in order, to `tx`. With `first` (where each page first appears),
/// only a page's first appearance is fetched; otherwise every distinct page of each window.
/// The `ready` windows (the first ones, fetched already) go first. Returns the number of
/// distinct non-zero pages fetched or found.
async fn fetch_windows(
    fetcher: &Fetcher<'_>,
    hashes: &[PageHash],
    first: Option<&HashMap<PageHash, u64>>,
    ready: Vec<Window>,
    tx: tokio::sync::mpsc::Sender<Window>,
    progress: &mut Progress,
) -> Result<u64, RestoreError> {
    let total = hashes.len() as u64;
    progress.phase("restore", total);
    let window_pages = RESTORE_WINDOW_PAGES;
    let windows = hashes.len().div_ceil(window_pages);
    let mut distinct = std::collections::HashSet::new();
    let skip = ready.len();
    let mut fetches = stream::iter(ready.into_iter().map(Some).chain((skip..windows).map(|_| None)).enumerate())
        .map(move |(w, done)| {
            let base = (w * window_pages) as u64;
            let window = &hashes[w * window_pages..((w + 1) * window_pages).min(hashes.len())];
            async move {
                match done {
                    Some(d) => Ok(d),
                    None => fetch_window(fetcher, window, base, first).await,
                }
            }
        })
        .buffered(RESTORE_WINDOWS_IN_FLIGHT);
    while let Some(r) = fetches.next().await {
        let (base, window, pages) = r?;
        distinct.extend(pages.keys().copied());
        let end = base + window.len() as u64;
        if tx.send((base, window, pages)).await.is_err() {
            break; // the writer failed; its caller reports why
        }
        progress.set(end.min(total));
    }
    Ok(distinct.len() as u64)
}

/// The distinct non-zero pages of `window` (at page `base`) to fetch; with `first`, only
/// those that first appear there.
fn window_need(window: &[PageHash], base: u64, first: Option<&HashMap<PageHash, u64>>) -> Vec<PageHash> {
    let mut need: Vec<PageHash> = window
        .iter()
        .enumerate()
        .filter(|(i, h)| !h.is_zero() && first.is_none_or(|f| f.get(*h) == Some(&(base + *i as u64))))
        .map(|(_, h)| *h)
        .collect();
    need.sort();
    need.dedup();
    need
}

/// Writes every page of `hashes` into `file`. Returns the number of distinct non-zero pages.
/// Each distinct page is fetched once; its later copies are read back from the file.
async fn fill(fetcher: &Fetcher<'_>, hashes: &[PageHash], file: Arc<std::fs::File>, progress: &mut Progress) -> Result<u64, RestoreError> {
    let mut first: HashMap<PageHash, u64> = HashMap::new();
    for (i, h) in hashes.iter().enumerate() {
        if !h.is_zero() {
            first.entry(*h).or_insert(i as u64);
        }
    }
    let first = Arc::new(first);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Window>(2);
    let writer = {
        let first = first.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut copy = vec![0u8; PAGE_SIZE];
            // Consecutive non-zero pages are gathered and written with one call.
            let mut run: Vec<u8> = Vec::with_capacity(RUN_BYTES_MAX);
            let mut run_at = 0u64;
            let flush = |run: &mut Vec<u8>, at: u64| -> std::io::Result<()> {
                if !run.is_empty() {
                    file.write_all_at(run, at)?;
                    run.clear();
                }
                Ok(())
            };
            while let Some((base, window, pages)) = rx.blocking_recv() {
                for (i, h) in window.iter().enumerate() {
                    let off = (base + i as u64) * PAGE_SIZE as u64;
                    if h.is_zero() || run.len() >= RUN_BYTES_MAX || run_at + run.len() as u64 != off {
                        flush(&mut run, run_at)?;
                        run_at = off;
                    }
                    if h.is_zero() {
                        continue; // the file is already zero there
                    }
                    match pages.get(h) {
                        Some(p) => run.extend_from_slice(p),
                        None => {
                            let fo = first.get(h).copied().ok_or_else(|| std::io::Error::other("page missing from the restore plan"))?;
                            flush(&mut run, run_at)?;
                            file.read_exact_at(&mut copy, fo * PAGE_SIZE as u64)?;
                            run_at = off;
                            run.extend_from_slice(&copy);
                        }
                    }
                }
            }
            flush(&mut run, run_at)?;
            Ok(())
        })
    };
    let fetched = fetch_windows(fetcher, hashes, Some(&first), vec![], tx, progress).await;
    let written = writer.await.map_err(|e| RestoreError::Internal(e.to_string()))?;
    let distinct = fetched?;
    written.map_err(|e| RestoreError::Write { path: PathBuf::from("(partial file)"), reason: e.to_string() })?;
    Ok(distinct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_shared_with_a_file_is_seen_in_either_form() {
        let line = |o: &str| vec!["qemu-system-x86_64".to_string(), "-object".to_string(), o.to_string()];
        for shared in [
            "memory-backend-file,id=m0,mem-path=/dev/shm/vm,size=1G,share=on",
            "qom-type=memory-backend-file,id=m0,mem-path=/dev/shm/vm,size=1G,share=yes",
            r#"{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/dev/shm/vm","share":true,"size":1073741824}"#,
        ] {
            assert!(lazy_unsupported(&line(shared)).is_some(), "{shared}");
        }
        for not in [
            "memory-backend-file,id=m0,mem-path=/dev/hugepages,size=1G,share=off",
            "memory-backend-memfd,id=m0,size=1G,share=on",
            r#"{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/dev/hugepages","share":false}"#,
            r#"{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true}"#,
            "{not json",
        ] {
            assert!(lazy_unsupported(&line(not)).is_none(), "{not}");
        }
    }
}

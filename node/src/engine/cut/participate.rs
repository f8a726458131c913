//! A participant's runtime, in three phases:
//! 1. **Resolve**: check the peer's request like any input, find every VM's source (a VM
//!    registered here, or a source this node was given), and the placement members. Nothing
//!    is touched before all of it resolves.
//! 2. **Capture**: one task per VM, each paced by a [`Pacer`]; the [`Participant`] machine
//!    turns commands, capture events and the release deadline into steps and reports.
//! 3. **Seal**: each VM's manifest chunks go through the same uploader, every owner `Sync`s,
//!    and the VM entries are reported in `Done`.

use super::machine::{PartAction, PartEvent, Participant};
use crate::engine::error::SnapshotError;
use crate::engine::upload::{capture_file, from_sink, Uploader, VmCounters, VmPages};
use crate::node::Node;
use crate::engine::fetch::{expand_manifest, Fetcher};
use crate::qemu::capture::{capture, CaptureError, CaptureRequest, DiskBases};
use crate::source::{Captured, Pacer, Source, Step};
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Mutex};
use vmcsnap_dht::Member;
use vmcsnap_protocol::manifest::{build_manifest, validate_name, Block, VmEntry, SNAPSHOT_VMS_MAX};
use vmcsnap_protocol::wire::{CutBegin, CutCommand, CutReport};
use vmcsnap_protocol::PageHash;

/// A participant's failure: the VM concerned, if one, and why.
type PartError = (Option<String>, SnapshotError);

/// One VM to capture: its id, source and (for an image) size in bytes.
type Resolved = (String, Source, u64);

/// A participant's part of a cut: captures `begin.vms` on this host, following the commands
/// on `cmds`, and reports on `reports` (ending with exactly one `Done` or `Failed`).
pub async fn participate(node: Arc<Node>, begin: CutBegin, cmds: mpsc::Receiver<CutCommand>, reports: mpsc::Sender<CutReport>) {
    let Some(_running) = node.drain.enter() else {
        let e = SnapshotError::Stopping(node.config.name.clone());
        let _ = reports.send(CutReport::Failed { vm: None, kind: e.kind(), reason: e.to_string() }).await;
        return;
    };
    let report = match run(&node, &begin, cmds, &reports).await {
        Ok(vms) => CutReport::Done { vms },
        Err((vm, e)) => {
            tracing::warn!(target: "vmcsnap::snapshot", snapshot = %begin.name, vm = ?vm, error = %e, "cut part failed; VMs resumed");
            CutReport::Failed { vm, kind: e.kind(), reason: e.to_string() }
        }
    };
    let _ = reports.send(report).await;
}

async fn run(node: &Arc<Node>, begin: &CutBegin, cmds: mpsc::Receiver<CutCommand>, reports: &mpsc::Sender<CutReport>) -> Result<Vec<VmEntry>, PartError> {
    let t0 = std::time::Instant::now();
    let stage = |s: &str| crate::engine::stage(&begin.name, t0, s);
    let (sources, members) = resolve(node, begin)?;
    let counters: Arc<Vec<VmCounters>> = Arc::new(sources.iter().map(|_| VmCounters::default()).collect());
    let up = Arc::new(Mutex::new(Uploader::new(node, members, begin.replicas as usize, counters.clone())));
    let captured = capture_all(node, begin, &sources, &up, cmds, reports).await?;
    stage("captured");
    let up = Arc::try_unwrap(up).map_err(|_| (None, SnapshotError::Internal("uploader still shared".into())))?.into_inner();
    seal(node, &sources, captured, up, &counters, &stage).await.map_err(|e| (None, e))
}

/// Phase 1: the request checked, every VM's source found, the placement members known.
fn resolve(node: &Arc<Node>, begin: &CutBegin) -> Result<(Vec<Resolved>, Vec<Member>), PartError> {
    let invalid = |m: String| (None, SnapshotError::Invalid(m));
    validate_name("snapshot name", &begin.name).map_err(invalid)?;
    if begin.vms.is_empty() || begin.vms.len() > SNAPSHOT_VMS_MAX {
        return Err(invalid(format!("a cut of {} VMs", begin.vms.len())));
    }
    if begin.replicas == 0 || begin.replicas as usize > begin.placement.len() {
        return Err(invalid(format!("replicas {} over {} placement members", begin.replicas, begin.placement.len())));
    }
    let mut seen = std::collections::HashSet::new();
    for (id, _) in &begin.vms {
        validate_name("VM id", id).map_err(invalid)?;
        if !seen.insert(id.as_str()) {
            return Err(invalid(format!("VM {id} is named twice")));
        }
    }
    let mut sources = Vec::new();
    for (id, source) in &begin.vms {
        let vm_err = |e: SnapshotError| (Some(id.clone()), e);
        let s = match source {
            Some(s) => Source::parse(s).map_err(|e| vm_err(SnapshotError::Invalid(e)))?,
            None => match node.vms.lookup(id).map_err(|e| vm_err(e.into()))? {
                Some(qmp) => Source::Qemu(qmp),
                None => return Err(vm_err(SnapshotError::Invalid(format!("VM {id} is not registered on host {}", node.config.name)))),
            },
        };
        let bytes = s.probe().map_err(|reason| vm_err(SnapshotError::Read { vm: id.clone(), reason }))?;
        sources.push((id.clone(), s, bytes));
    }
    let mut members = Vec::new();
    for id in &begin.placement {
        match node.member(id) {
            Some(m) => members.push(m),
            None => return Err(invalid(format!("placement member {} is unknown on this host", id.short()))),
        }
    }
    members.sort_by_key(|m| m.id);
    Ok((sources, members))
}

/// Phase 2: every VM captured, paced by the cut. Returns them in order.
async fn capture_all(
    node: &Arc<Node>,
    begin: &CutBegin,
    sources: &[Resolved],
    up: &Arc<Mutex<Uploader>>,
    mut cmds: mpsc::Receiver<CutCommand>,
    reports: &mpsc::Sender<CutReport>,
) -> Result<Vec<Captured>, PartError> {
    let (step_tx, step_rx) = watch::channel(Step::Prepare);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for (vi, (id, source, bytes)) in sources.iter().cloned().enumerate() {
        let pacer = Pacer::new(step_rx.clone(), ev_tx.clone(), vi).quieting(node.quiet.clone());
        let (node, up, begin) = (node.clone(), up.clone(), begin.clone());
        tasks.spawn(async move {
            let t0 = std::time::Instant::now();
            let r = capture_one(&node, &up, vi, &id, &source, bytes, &begin, pacer).await;
            (vi, r.map(|mut c| {
                c.stats.capture_ms = t0.elapsed().as_millis() as u64;
                c
            }))
        });
    }
    drop(ev_tx);

    let mut machine = Participant::new(sources.iter().map(|s| s.0.clone()).collect());
    let mut captured: Vec<Option<Captured>> = (0..sources.len()).map(|_| None).collect();
    let mut cmds_open = true;
    // Prepared VMs wait for `Go`, and paused ones for `Release`, only so long, whatever the
    // coordinator does (the machine arms and disarms it).
    let mut deadline: Option<tokio::time::Instant> = None;
    // The node stopping (SIGTERM) aborts the cut, as the initiator would: every VM resumes.
    let mut stopping = std::pin::pin!(node.drain.stopping());
    let mut stop_seen = false;
    // From `Go` until every VM here is paused (each capture then holds it until its VM runs):
    // the node's background work gives the pause the CPU at once (see `Quiet`). And from the
    // `Ready` report until `Go` (a spell of its own): pre-copy's uploads of the first pass then
    // stop flooding the owners' sockets, in which `Go` would wait behind their pages (seen:
    // one host's `Go` 12–138 ms after the others' in first snapshots, every VM's pause that much
    // longer).
    let (mut quiet, mut waiting) = (None, None);
    while !tasks.is_empty() {
        let ev = tokio::select! {
            _ = &mut stopping, if !stop_seen => {
                stop_seen = true;
                PartEvent::Stopping(node.config.name.clone())
            }
            _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => PartEvent::Deadline,
            cmd = cmds.recv(), if cmds_open => {
                cmds_open = cmd.is_some();
                PartEvent::Command(cmd)
            }
            Some((_, reached)) = ev_rx.recv() => PartEvent::Reached(reached),
            Some(joined) = tasks.join_next() => match joined {
                Ok((vi, Ok(c))) => {
                    captured[vi] = Some(c);
                    continue;
                }
                Ok((vi, Err(error))) => PartEvent::CaptureFailed { vm: vi, error },
                Err(e) => PartEvent::TaskFailed(e.to_string()),
            },
        };
        for action in machine.on_event(ev) {
            match action {
                PartAction::Step(s) => {
                    tracing::debug!(target: "vmcsnap::cut", step = ?s, "step");
                    if s == Step::Pause {
                        quiet.get_or_insert_with(|| node.quiet.hold_anew());
                    } else {
                        quiet = None;
                    }
                    waiting = None;
                    step_tx.send_modify(|now| *now = (*now).max(s));
                }
                PartAction::Report(r) => {
                    if matches!(r, CutReport::Ready | CutReport::Paused) {
                        tracing::debug!(target: "vmcsnap::cut", report = ?r, "report");
                    }
                    if matches!(r, CutReport::Paused) {
                        quiet = None;
                    }
                    if matches!(r, CutReport::Ready) && quiet.is_none() {
                        waiting.get_or_insert_with(|| node.quiet.hold());
                    }
                    let _ = reports.send(r).await;
                }
                PartAction::ArmDeadline(wait) => deadline = Some(tokio::time::Instant::now() + wait.limit()),
                PartAction::DisarmDeadline => deadline = None,
            }
        }
    }
    if let Some(f) = machine.take_failure() {
        return Err(f);
    }
    captured.into_iter().map(|c| c.ok_or_else(|| (None, SnapshotError::Internal("a VM capture vanished".into())))).collect()
}

/// Captures one VM, paced by `pacer`, its pages going to `up` as VM `vi`'s.
#[allow(clippy::too_many_arguments)]
async fn capture_one(
    node: &Arc<Node>,
    up: &Mutex<Uploader>,
    vi: usize,
    id: &str,
    source: &Source,
    bytes: u64,
    begin: &CutBegin,
    mut pacer: Pacer,
) -> Result<Captured, SnapshotError> {
    match source {
        Source::File(path) => {
            // An image does not change: it is read after the cut.
            pacer.prepared();
            pacer.wait(Step::Pause).await.map_err(|_| SnapshotError::Aborted)?;
            pacer.paused();
            pacer.wait(Step::Resume).await.map_err(|_| SnapshotError::Aborted)?;
            pacer.resumed();
            let (hashes, stats) = capture_file(up, vi, id, bytes, path).await?;
            Ok(Captured { hashes, blocks: vec![Block { name: "ram".into(), bytes }], stats, qemu: None, extra_pages: vec![] })
        }
        Source::Qemu(qmp) => {
            let bases = Bases { node, begin };
            let req = CaptureRequest {
                vm: id,
                qmp,
                mode: begin.mode,
                max_bandwidth: begin.max_bandwidth,
                disks: &begin.disks,
                snapshot: &begin.name,
                bases: &bases,
                work_dir: &node.config.data_dir,
                tag: std::process::id() ^ vi as u32,
            };
            let mut c = capture(&req, &mut pacer, &VmPages { up, vm: vi, quiet: &node.quiet }, &node.vms).await.map_err(|e| match e {
                CaptureError::Cancelled(_) => SnapshotError::Aborted,
                CaptureError::Sink(e) => from_sink(e),
                source => SnapshotError::Capture { vm: id.to_string(), source },
            })?;
            // The device state is stored like pages, but not counted as the VM's memory.
            let mut upl = up.lock().await;
            for (h, p) in std::mem::take(&mut c.extra_pages) {
                upl.push(h, p, None).await?;
            }
            Ok(c)
        }
    }
}

/// The disk hashes of earlier snapshots, from this node's catalog: only a snapshot placed
/// over this cut's view with at least its replicas (so that the blocks an incremental read
/// takes from it are where this snapshot's record says its pages are).
struct Bases<'a> {
    node: &'a Arc<Node>,
    begin: &'a CutBegin,
}

impl DiskBases for Bases<'_> {
    fn hashes<'a>(&'a self, snapshot: &'a str, vm: &'a str, device: &'a str, size: u64) -> futures::future::BoxFuture<'a, Option<(u64, Vec<PageHash>)>> {
        Box::pin(async move {
            let mut found = self.node.store.catalog_get(snapshot).ok()?;
            if found.len() != 1 {
                return None;
            }
            let record = found.remove(0).record;
            if record.placement != self.begin.placement || record.replicas < self.begin.replicas {
                return None;
            }
            let entry = record.vm(vm)?;
            let (_, first, pages) = entry.disks().into_iter().find(|(d, _, _)| d.device == device && d.size == size)?;
            let fetcher = Fetcher::new(self.node, &record);
            let all = expand_manifest(&fetcher, entry, |_, _| {}).await.ok()?;
            all.get(first as usize..(first + pages) as usize).map(|h| (record.created_unix_ms, h.to_vec()))
        })
    }
}

/// Phase 3: manifests stored, every owner synced; the VM entries for the record.
async fn seal(
    node: &Arc<Node>,
    sources: &[Resolved],
    captured: Vec<Captured>,
    mut up: Uploader,
    counters: &[VmCounters],
    stage: &(dyn Fn(&str) + Sync),
) -> Result<Vec<VmEntry>, SnapshotError> {
    let mut built_vms = Vec::new();
    for c in captured {
        let built = build_manifest(&c.hashes);
        for (h, page) in built.chunks {
            up.push(h, Bytes::from(page), None).await?;
        }
        built_vms.push((c, built.root));
    }
    let owners = up.finish().await?;
    stage("acknowledged");
    crate::engine::upload::sync_owners(node, &owners).await?;
    stage("synced");
    let mut entries = Vec::new();
    for (vi, (c, root)) in built_vms.into_iter().enumerate() {
        let mut stats = c.stats;
        let k = &counters[vi];
        // In live pre-copy a page re-sent with new content is stored too; "new" counts every
        // page stored, so it can exceed the pages the final memory holds.
        stats.pages_new = k.new.load(Ordering::Relaxed);
        stats.pages_dedup = stats.pages_nonzero.saturating_sub(stats.pages_new);
        stats.bytes_sent = k.bytes_sent.load(Ordering::Relaxed);
        let (id, source, _) = &sources[vi];
        entries.push(VmEntry {
            id: id.clone(),
            source: match source {
                Source::File(p) => format!("file:{}", p.display()),
                Source::Qemu(p) => format!("qemu:{}", p.display()),
            },
            host: node.id,
            host_name: node.config.name.clone(),
            blocks: c.blocks,
            manifest: root,
            stats,
            qemu: c.qemu,
        });
    }
    Ok(entries)
}

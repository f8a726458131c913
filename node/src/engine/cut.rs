//! Cluster snapshots as one cut: the initiating node drives one conversation per host that
//! runs VMs of the snapshot (itself included), and each such participant captures its own
//! VMs and uploads their pages to the owners.
//!
//! The cut, for every participant at once (see [`vmcsnap_protocol::wire::CutBegin`]):
//! 1. **Prepare** each VM; with pre-copy, let QEMU run its live rounds until one full pass is
//!    done. Report `Ready`.
//! 2. On `Go` (sent once every participant is ready): pause each VM. With stop-copy QEMU then
//!    copies it; with pre-copy the pause makes the final round start now. Report `Paused`.
//! 3. On `Release` (sent once every VM of the cut is paused): resume each VM as soon as QEMU has
//!    sent all of it. So no VM runs on past the cut before every VM has reached it.
//! 4. Upload, seal manifests, sync owners; report `Done` with the VM entries. The initiating
//!    node commits one record for all of them.
//!
//! **Invariant:** a failure anywhere (a VM, a participant, a silent host) aborts every
//! participant: each resumes its VMs and reports; nothing is committed, because only the
//! initiating node commits and only after every `Done`.

use crate::engine::snapshot::{capture_file, owner_error, SnapshotError, Uploader, VmCounters};
use crate::engine::Progress;
use crate::net::{read_frame, write_frame_open};
use crate::node::Node;
use crate::source::Source;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Mutex};
use vmcsnap_dht::Member;
use vmcsnap_protocol::manifest::{build_manifest, Block, QemuState, VmEntry, VmStats};
use vmcsnap_protocol::wire::{CutBegin, CutCommand, CutReport, DataRequest, DataResponse, CUT_HEARTBEAT_MS, CUT_SILENCE_MAX_MS};
use vmcsnap_protocol::PageHash;

/// Where the cut stands, as every VM capture of a participant sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Prepare (and, with pre-copy, copy live).
    Prepare,
    /// Pause now.
    Go,
    /// Every VM of the cut is paused: resume when captured.
    Release,
    /// Give up: resume, commit nothing.
    Abort,
}

/// What a VM capture tells its participant.
#[derive(Clone, Copy, Debug)]
enum VmEvent {
    Ready,
    Paused,
}

/// Longest a participant keeps its VMs paused waiting for the cut's `Release` after `Go`.
pub const RELEASE_WAIT_MAX: Duration = Duration::from_secs(120);

/// One VM capture's handle on the cut.
pub struct Gate {
    stage: watch::Receiver<Stage>,
    events: mpsc::UnboundedSender<(usize, VmEvent)>,
    vi: usize,
}

impl Gate {
    /// This VM is prepared.
    pub fn ready(&self) {
        let _ = self.events.send((self.vi, VmEvent::Ready));
    }

    /// This VM is paused.
    pub fn paused(&self) {
        let _ = self.events.send((self.vi, VmEvent::Paused));
    }

    /// Waits until the cut reaches `stage`; fails if it is aborted first.
    pub async fn wait(&mut self, stage: Stage) -> Result<(), SnapshotError> {
        loop {
            let now = *self.stage.borrow_and_update();
            if now == Stage::Abort {
                return Err(SnapshotError::Aborted);
            }
            if now >= stage {
                return Ok(());
            }
            if self.stage.changed().await.is_err() {
                return Err(SnapshotError::Aborted);
            }
        }
    }

    /// A receiver of the stage, for work that only needs to notice an abort.
    pub fn watch(&self) -> watch::Receiver<Stage> {
        self.stage.clone()
    }
}

/// Fails if the cut was aborted.
pub fn check_abort(stage: &watch::Receiver<Stage>) -> Result<(), SnapshotError> {
    if *stage.borrow() == Stage::Abort {
        return Err(SnapshotError::Aborted);
    }
    Ok(())
}

/// One VM captured by a participant, before its manifest is built.
struct VmCaptured {
    hashes: Vec<PageHash>,
    blocks: Vec<Block>,
    stats: VmStats,
    qemu: Option<QemuState>,
}

/// A participant's part of a cut: captures `begin.vms` on this host, following the commands
/// on `cmds`, and reports on `reports` (ending with exactly one `Done` or `Failed`).
pub async fn participate(node: Arc<Node>, begin: CutBegin, cmds: mpsc::Receiver<CutCommand>, reports: mpsc::Sender<CutReport>) {
    let report = match participate_inner(&node, &begin, cmds, &reports).await {
        Ok(vms) => CutReport::Done { vms },
        Err((vm, e)) => {
            tracing::warn!(target: "vmcsnap::snapshot", snapshot = %begin.name, vm = ?vm, error = %e, "cut part failed; VMs resumed");
            CutReport::Failed { vm, reason: e.to_string() }
        }
    };
    let _ = reports.send(report).await;
}

type PartError = (Option<String>, SnapshotError);

async fn participate_inner(
    node: &Arc<Node>,
    begin: &CutBegin,
    mut cmds: mpsc::Receiver<CutCommand>,
    reports: &mpsc::Sender<CutReport>,
) -> Result<Vec<VmEntry>, PartError> {
    // A peer's request is checked like any input.
    let invalid = |m: String| (None, SnapshotError::Invalid(m));
    vmcsnap_protocol::manifest::validate_name("snapshot name", &begin.name).map_err(invalid)?;
    if begin.vms.is_empty() || begin.vms.len() > vmcsnap_protocol::manifest::SNAPSHOT_VMS_MAX {
        return Err(invalid(format!("a cut of {} VMs", begin.vms.len())));
    }
    if begin.replicas == 0 || begin.replicas as usize > begin.placement.len() {
        return Err(invalid(format!("replicas {} over {} placement members", begin.replicas, begin.placement.len())));
    }
    let mut seen = std::collections::HashSet::new();
    for (id, _) in &begin.vms {
        vmcsnap_protocol::manifest::validate_name("VM id", id).map_err(invalid)?;
        if !seen.insert(id.as_str()) {
            return Err(invalid(format!("VM {id} is named twice")));
        }
    }
    // Resolve every VM before touching any.
    let mut sources = Vec::new();
    for (id, source) in &begin.vms {
        let s = match source {
            Some(s) => Source::parse(s).map_err(|e| (Some(id.clone()), SnapshotError::Invalid(e)))?,
            None => match node.vms.lookup(id).map_err(|e| (Some(id.clone()), SnapshotError::Internal(e.to_string())))? {
                Some(qmp) => Source::Qemu(qmp),
                None => {
                    return Err((Some(id.clone()), SnapshotError::Invalid(format!("VM {id} is not registered on host {}", node.config.name))))
                }
            },
        };
        let bytes = s.probe().map_err(|reason| (Some(id.clone()), SnapshotError::Read { vm: id.clone(), reason }))?;
        sources.push((id.clone(), s, bytes));
    }
    let mut members = Vec::new();
    for id in &begin.placement {
        match node.member(id) {
            Some(m) => members.push(m),
            None => return Err((None, SnapshotError::Invalid(format!("placement member {} is unknown on this host", id.short())))),
        }
    }
    members.sort_by_key(|m| m.id);
    let counters: Arc<Vec<VmCounters>> = Arc::new(sources.iter().map(|_| VmCounters::default()).collect());
    let up = Arc::new(Mutex::new(Uploader::new(node, members, begin.replicas as usize, counters.clone())));

    let (stage_tx, stage_rx) = watch::channel(Stage::Prepare);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for (vi, (id, source, bytes)) in sources.iter().cloned().enumerate() {
        let mut gate = Gate { stage: stage_rx.clone(), events: ev_tx.clone(), vi };
        let (node, up, mode, bw) = (node.clone(), up.clone(), begin.mode, begin.max_bandwidth);
        tasks.spawn(async move {
            let t0 = std::time::Instant::now();
            let r = match &source {
                Source::File(path) => async {
                    gate.ready();
                    gate.wait(Stage::Go).await?;
                    gate.paused();
                    gate.wait(Stage::Release).await?;
                    let (hashes, stats) = capture_file(&up, vi, &id, bytes, path, &Progress::new(None), &mut 0).await?;
                    Ok(VmCaptured { hashes, blocks: vec![Block { name: "ram".into(), bytes }], stats, qemu: None })
                }
                .await,
                Source::Qemu(qmp) => crate::qemu::capture::capture(&node, &up, vi, &id, qmp, mode, &mut gate, bw)
                    .await
                    .map(|c| VmCaptured { hashes: c.hashes, blocks: c.blocks, stats: c.stats, qemu: Some(c.state) }),
            };
            (vi, r.map(|mut c| {
                c.stats.capture_ms = t0.elapsed().as_millis() as u64;
                c
            }))
        });
    }
    drop(ev_tx);

    let n = sources.len();
    let (mut ready, mut paused) = (0, 0);
    let mut captured: Vec<Option<VmCaptured>> = (0..n).map(|_| None).collect();
    let mut failure: Option<PartError> = None;
    let mut cmds_open = true;
    // Paused VMs wait for `Release` at most this long, whatever the initiating node does.
    let mut release_deadline: Option<tokio::time::Instant> = None;
    while !tasks.is_empty() {
        tokio::select! {
            _ = async { if let Some(d) = release_deadline { tokio::time::sleep_until(d).await } }, if release_deadline.is_some() => {
                release_deadline = None;
                failure.get_or_insert((None, SnapshotError::Invalid(format!("no Release within {} s of Go", RELEASE_WAIT_MAX.as_secs()))));
                stage_tx.send_replace(Stage::Abort);
            }
            cmd = cmds.recv(), if cmds_open => {
                let stage = match cmd {
                    Some(CutCommand::Go) => Stage::Go,
                    Some(CutCommand::Release) => Stage::Release,
                    Some(CutCommand::Heartbeat) => continue,
                    Some(CutCommand::Abort { reason }) => {
                        failure.get_or_insert((None, SnapshotError::Invalid(format!("aborted by the initiating node: {reason}"))));
                        Stage::Abort
                    }
                    None => {
                        cmds_open = false;
                        failure.get_or_insert((None, SnapshotError::Invalid("the initiating node went away".into())));
                        Stage::Abort
                    }
                };
                match stage {
                    Stage::Go if release_deadline.is_none() => release_deadline = Some(tokio::time::Instant::now() + RELEASE_WAIT_MAX),
                    Stage::Release | Stage::Abort => release_deadline = None,
                    _ => {}
                }
                stage_tx.send_modify(|s| *s = (*s).max(stage));
            }
            Some((_, ev)) = ev_rx.recv() => {
                match ev {
                    VmEvent::Ready => { ready += 1; if ready == n { let _ = reports.send(CutReport::Ready).await; } }
                    VmEvent::Paused => { paused += 1; if paused == n { let _ = reports.send(CutReport::Paused).await; } }
                }
            }
            Some(joined) = tasks.join_next() => {
                match joined {
                    Ok((vi, Ok(c))) => captured[vi] = Some(c),
                    Ok((vi, Err(e))) => {
                        if failure.is_some() && !matches!(e, SnapshotError::Aborted) {
                            tracing::error!(target: "vmcsnap::snapshot", vm = %sources[vi].0, error = %e, "VM capture failed during the abort");
                        }
                        if failure.is_none() {
                            // Tell the initiating node at once, so the other hosts resume too.
                            let _ = reports.send(CutReport::Failed { vm: Some(sources[vi].0.clone()), reason: e.to_string() }).await;
                            failure = Some((Some(sources[vi].0.clone()), e));
                        }
                        stage_tx.send_replace(Stage::Abort);
                    }
                    Err(e) => {
                        failure.get_or_insert((None, SnapshotError::Internal(format!("capture task failed: {e}"))));
                        stage_tx.send_replace(Stage::Abort);
                    }
                }
            }
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }

    // Seal: manifest chunks go through the same uploader, then every owner syncs.
    let mut up = match Arc::try_unwrap(up) {
        Ok(m) => m.into_inner(),
        Err(_) => return Err((None, SnapshotError::Internal("uploader still shared".into()))),
    };
    let mut built_vms = Vec::new();
    for c in captured {
        let Some(c) = c else { return Err((None, SnapshotError::Internal("a VM capture vanished".into()))) };
        let built = build_manifest(&c.hashes);
        for (h, page) in built.chunks {
            up.push(h, Bytes::from(page), None).await.map_err(|e| (None, e))?;
        }
        built_vms.push((c, built.root));
    }
    let members = up.finish().await.map_err(|e| (None, e))?;
    futures::future::try_join_all(members.iter().map(|m| async move {
        match node.call(m, DataRequest::Sync).await.map_err(|e| owner_error(m, e))? {
            DataResponse::Synced => Ok(()),
            _ => Err(SnapshotError::Protocol(m.id.short())),
        }
    }))
    .await
    .map_err(|e| (None, e))?;
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

/// The initiating node's handle on one participant.
pub struct Session {
    /// The participant.
    pub host: Member,
    /// Its name, for messages.
    pub host_name: String,
    /// The VMs it captures.
    pub vms: Vec<String>,
    tx: mpsc::Sender<CutCommand>,
}

impl Session {
    /// Sends a command; a participant that is gone has already reported so.
    pub async fn send(&self, cmd: CutCommand) {
        let _ = self.tx.send(cmd).await;
    }
}

/// Starts a participant for `begin` on `host` (this node runs it in-process). Its reports
/// arrive on `reports` tagged with `index`; a participant that goes silent or whose stream
/// breaks is reported as `Failed`.
pub async fn start_session(
    node: &Arc<Node>,
    host: Member,
    begin: CutBegin,
    index: usize,
    reports: mpsc::Sender<(usize, Option<CutReport>)>,
) -> Session {
    let (tx, cmd_rx) = mpsc::channel::<CutCommand>(8);
    let host_name = node.host_name(&host.id);
    let vms = begin.vms.iter().map(|(id, _)| id.clone()).collect();
    let (rep_tx, mut rep_rx) = mpsc::channel::<CutReport>(8);
    if host.id == node.id {
        tokio::spawn(participate(node.clone(), begin, cmd_rx, rep_tx));
    } else {
        let node = node.clone();
        let member = host.clone();
        tokio::spawn(async move {
            match node.open_session(&member, &DataRequest::Cut(begin)).await {
                Ok((send, recv)) => bridge(send, recv, cmd_rx, rep_tx).await,
                Err(e) => {
                    let _ = rep_tx.send(CutReport::Failed { vm: None, reason: format!("cannot start the cut there: {e}") }).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(r) = rep_rx.recv().await {
            if reports.send((index, Some(r))).await.is_err() {
                return;
            }
        }
        let _ = reports.send((index, None)).await; // this participant has ended
    });
    Session { host, host_name, vms, tx }
}

/// Carries a cut's conversation over a QUIC stream, both ways, with heartbeats: frames from
/// `outgoing` go out, frames read come in on `incoming`. Used on both sides, with `O`/`I` the
/// side's outgoing and incoming message types.
async fn bridge<O, I>(mut send: quinn::SendStream, mut recv: quinn::RecvStream, mut outgoing: mpsc::Receiver<O>, incoming: mpsc::Sender<I>)
where
    O: serde::Serialize + Send + Sync + 'static + HeartbeatMsg,
    I: serde::de::DeserializeOwned + Send + 'static + HeartbeatMsg,
{
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(CUT_HEARTBEAT_MS));
        loop {
            tokio::select! {
                m = outgoing.recv() => match m {
                    Some(m) => {
                        let last = m.is_final();
                        if write_frame_open(&mut send, &m).await.is_err() { break; }
                        if last { let _ = send.finish(); break; }
                    }
                    None => { let _ = send.finish(); break; }
                },
                _ = tick.tick() => {
                    if write_frame_open(&mut send, &O::heartbeat()).await.is_err() { break; }
                }
            }
        }
    });
    loop {
        match tokio::time::timeout(Duration::from_millis(CUT_SILENCE_MAX_MS), read_frame::<I>(&mut recv)).await {
            Ok(Ok(m)) if m.is_heartbeat() => {}
            Ok(Ok(m)) => {
                let last = m.is_final();
                if incoming.send(m).await.is_err() || last {
                    break;
                }
            }
            Ok(Err(e)) => {
                let _ = incoming.send(I::lost(&format!("the connection broke: {e}"))).await;
                break;
            }
            Err(_) => {
                let _ = incoming.send(I::lost(&format!("no word for {} s (host down?)", CUT_SILENCE_MAX_MS / 1000))).await;
                break;
            }
        }
    }
    // Nothing more comes in: say so at once, then let the writer drain what is queued.
    drop(incoming);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// What [`bridge`] needs to know of a cut message.
pub trait HeartbeatMsg: Sized {
    /// The heartbeat message.
    fn heartbeat() -> Self;
    /// Whether this is a heartbeat.
    fn is_heartbeat(&self) -> bool;
    /// Whether this ends the conversation from its sender's side.
    fn is_final(&self) -> bool;
    /// The message standing for "the other side is gone".
    fn lost(reason: &str) -> Self;
}

impl HeartbeatMsg for CutCommand {
    fn heartbeat() -> Self {
        CutCommand::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, CutCommand::Heartbeat)
    }
    fn is_final(&self) -> bool {
        false
    }
    fn lost(reason: &str) -> Self {
        CutCommand::Abort { reason: format!("the initiating node is gone: {reason}") }
    }
}

impl HeartbeatMsg for CutReport {
    fn heartbeat() -> Self {
        CutReport::Heartbeat
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, CutReport::Heartbeat)
    }
    fn is_final(&self) -> bool {
        matches!(self, CutReport::Done { .. })
    }
    fn lost(reason: &str) -> Self {
        CutReport::Failed { vm: None, reason: reason.to_string() }
    }
}

/// Serves a participant's side of a cut on a data-plane stream.
pub async fn serve(node: Arc<Node>, begin: CutBegin, mut send: quinn::SendStream, recv: quinn::RecvStream) {
    // A peer names only VMs registered here: never a file or socket of its choosing.
    if begin.vms.iter().any(|(_, source)| source.is_some()) {
        let _ = write_frame_open(&mut send, &CutReport::Failed { vm: None, reason: "a remote cut may only name VMs registered on this host".into() }).await;
        let _ = send.finish();
        return;
    }
    let (cmd_tx, cmd_rx) = mpsc::channel::<CutCommand>(8);
    let (rep_tx, rep_rx) = mpsc::channel::<CutReport>(8);
    let work = tokio::spawn(participate(node, begin, cmd_rx, rep_tx));
    bridge(send, recv, rep_rx, cmd_tx).await;
    let _ = work.await;
}

//! Capturing a running QEMU VM: the node becomes the VM's migration destination.
//!
//! 1. Over QMP: check the VM is running or paused and not migrating; read its QEMU version,
//!    accelerator and command line (from `/proc/PID/cmdline`, PID from the socket's peer
//!    credentials); turn off [`super::CAPABILITIES_OFF`]; raise `max-bandwidth`.
//! 2. Listen on a unix socket in the data directory; `stop` first for stop-copy;
//!    `migrate unix:SOCK`.
//! 3. A blocking thread parses the stream as it arrives, hashes every page and appends the
//!    non-zero ones to a spool file (unlinked, in the data directory), so QEMU sends at stream
//!    speed whatever the owners' pace; the async side keeps the VM's page map (last copy
//!    wins) and pushes the spooled pages to the owners.
//! 4. As soon as QEMU reports the migration `completed`, `cont` the VM if it was running —
//!    while the upload may still go on. The snapshot commits only after every page is
//!    durable on its owners.
//!    Whatever fails, the VM is resumed if it was running and the migration cancelled.

use super::qmp::Qmp;
use super::stream::{self, StreamError};
use crate::engine::cut::{check_abort, Gate, Stage};
use crate::engine::snapshot::{SnapshotError, Uploader};
use crate::engine::Progress;
use crate::node::Node;
use bytes::Bytes;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use vmcsnap_protocol::manifest::{Block, CaptureMode, QemuState, VmStats};
use vmcsnap_protocol::{hash_page, is_zero_page, PageHash, PAGE_SIZE, ZERO_HASH};

/// Page records handed from the parser thread to the uploader in one message. The queue of
/// such messages is unbounded on purpose (records are 48 bytes; the pages are in the spool),
/// so that the VM's pause never waits on the network.
pub const CAPTURE_BATCH_PAGES: usize = 256;
/// Time for QEMU to connect to the node's socket after `migrate`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for QEMU to report the migration finished after the stream ended.
pub const COMPLETE_TIMEOUT: Duration = Duration::from_secs(60);

/// One VM captured.
pub struct Captured {
    /// Page hashes in block order.
    pub hashes: Vec<PageHash>,
    /// RAM blocks.
    pub blocks: Vec<Block>,
    /// Counters (zero, non-zero, total, pause).
    pub stats: VmStats,
    /// What a restore needs.
    pub state: QemuState,
}

fn qemu_err(vm: &str, reason: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Qemu { vm: vm.to_string(), reason: reason.to_string() }
}

/// Captures VM `vm` (index `vi` in the snapshot) through its QMP socket.
#[allow(clippy::too_many_arguments)]
pub async fn capture(
    node: &Arc<Node>,
    up: &Mutex<Uploader>,
    vi: usize,
    vm: &str,
    qmp_path: &Path,
    mode: CaptureMode,
    gate: &mut Gate,
    max_bandwidth: Option<u64>,
) -> Result<Captured, SnapshotError> {
    let progress = &Progress::new(None);
    let mut q = Qmp::connect(qmp_path).await.map_err(|e| qemu_err(vm, e))?;
    let status = q.status().await.map_err(|e| qemu_err(vm, e))?;
    let was_running = match status.as_str() {
        "running" => true,
        "paused" => false,
        other => return Err(qemu_err(vm, format!("VM is {other}; it must be running or paused (after a migration, `cont` it first)"))),
    };
    let info = q.migrate_info().await.map_err(|e| qemu_err(vm, e))?;
    if let Some(st) = info.get("status").and_then(|s| s.as_str()) {
        if matches!(st, "active" | "setup" | "pre-switchover" | "device" | "postcopy-active" | "cancelling") {
            return Err(qemu_err(vm, format!("a migration is already {st}")));
        }
    }
    let v = q.execute("query-version", json!({})).await.map_err(|e| qemu_err(vm, e))?;
    let qemu_version = format!(
        "{}.{}.{}",
        v["qemu"]["major"].as_u64().unwrap_or(0),
        v["qemu"]["minor"].as_u64().unwrap_or(0),
        v["qemu"]["micro"].as_u64().unwrap_or(0)
    );
    let kvm = q.execute("query-kvm", json!({})).await.map_err(|e| qemu_err(vm, e))?;
    let accel = if kvm["enabled"].as_bool().unwrap_or(false) { "kvm" } else { "tcg" }.to_string();
    let pid = q.pid().ok_or_else(|| qemu_err(vm, "cannot tell which process serves the QMP socket"))?;
    let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| qemu_err(vm, format!("cannot read QEMU's command line: {e}")))?
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();

    // Capabilities that change the stream's format: off.
    let caps = q.execute("query-migrate-capabilities", json!({})).await.map_err(|e| qemu_err(vm, e))?;
    let off: Vec<serde_json::Value> = caps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"].as_bool() == Some(true))
        .filter_map(|c| c["capability"].as_str())
        .filter(|c| super::CAPABILITIES_OFF.contains(c))
        .map(|c| json!({"capability": c, "state": false}))
        .collect();
    if !off.is_empty() {
        tracing::info!(target: "vmcsnap::snapshot", vm, caps = ?off, "turning off migration capabilities vmcsnap cannot capture");
        q.execute("migrate-set-capabilities", json!({ "capabilities": off })).await.map_err(|e| qemu_err(vm, e))?;
    }
    let params = q.execute("query-migrate-parameters", json!({})).await.map_err(|e| qemu_err(vm, e))?;
    let old_bandwidth = params["max-bandwidth"].as_u64();
    let old_downtime = params["downtime-limit"].as_u64();
    let live_bandwidth = match mode {
        CaptureMode::PreCopy => max_bandwidth.unwrap_or(super::CAPTURE_BANDWIDTH),
        CaptureMode::StopCopy => super::CAPTURE_BANDWIDTH,
    };
    q.execute("migrate-set-parameters", json!({ "max-bandwidth": live_bandwidth, "downtime-limit": super::CAPTURE_DOWNTIME_LIMIT_MS }))
        .await
        .map_err(|e| qemu_err(vm, e))?;

    let sock = node.config.data_dir.join(format!("capture-{vm}-{}.sock", std::process::id() ^ vi as u32));
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| qemu_err(vm, format!("cannot listen on {}: {e}", sock.display())))?;

    let spool_path = node.config.data_dir.join(format!("spool-{vm}-{}", std::process::id() ^ vi as u32));
    let spool = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&spool_path)
        .map_err(|e| qemu_err(vm, format!("cannot create the spool file {}: {e}", spool_path.display())))?;
    // Unlinked at once: it disappears with the last handle, whatever happens.
    let _ = std::fs::remove_file(&spool_path);

    let mut paused_at: Option<(Instant, u64)> = None;
    let mut resumed_at = None;
    let mut journaled = false;
    let abort = gate.watch();
    if was_running {
        // Before anything can pause it (QEMU itself may, in pre-copy): a node that dies from
        // here on resumes the VM when it starts again.
        node.vms.note_paused(vm, qmp_path);
        journaled = true;
    }
    let result = async {
        if mode == CaptureMode::StopCopy {
            gate.ready();
            gate.wait(Stage::Go).await?;
            if was_running {
                let t = (Instant::now(), unix_us());
                q.execute("stop", json!({})).await.map_err(|e| qemu_err(vm, e))?;
                paused_at = Some(t);
            }
            gate.paused();
        }
        q.execute("migrate", json!({ "uri": format!("unix:{}", sock.display()) })).await.map_err(|e| qemu_err(vm, e))?;
        let (conn, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
            .await
            .map_err(|_| qemu_err(vm, "QEMU did not connect to the capture socket"))?
            .map_err(|e| qemu_err(vm, e))?;
        let conn = conn.into_std().map_err(|e| qemu_err(vm, e))?;
        conn.set_nonblocking(false).map_err(|e| qemu_err(vm, e))?;
        let spool_w = spool.try_clone().map_err(|e| qemu_err(vm, e))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Entry>>();
        let mut parser = tokio::task::spawn_blocking(move || parse_to_spool(conn, spool_w, tx));
        // The VM resumes as soon as QEMU has sent everything and every VM of the cut is
        // paused: the stream is parsed and spooled at stream speed, while the owners take the
        // pages at their own pace.
        // In stop-copy the VM waits for the stream: hashing and sending pages then would only
        // compete with it for the CPU, so the upload starts once the VM runs again.
        let (resumed_tx, resumed_rx) = tokio::sync::oneshot::channel::<()>();
        let resume = async {
            let _resumed_tx = resumed_tx; // dropped (and so signalled) whenever this ends
            let r = async {
                if mode == CaptureMode::PreCopy {
                    let self_paused = match live_rounds(&mut q, vm, gate).await {
                        Ok(p) => p,
                        Err(e) => {
                            // When QEMU gave up, the stream's own fault says more than its
                            // "failed": the parser ends at once (QEMU closed the socket).
                            if let Ok(Ok(Err(pe))) = tokio::time::timeout(Duration::from_secs(2), &mut parser).await {
                                return Err(qemu_err(vm, pe));
                            }
                            return Err(e);
                        }
                    };
                    if was_running {
                        paused_at = Some(match self_paused {
                            Ok(t) => t,
                            Err(ready_at) => {
                                // The final round starts now, on every host of the cut. The
                                // pause counts from the command (QEMU needs a moment to stop
                                // the vCPUs).
                                let t = (Instant::now(), unix_us());
                                q.execute("stop", json!({})).await.map_err(|e| qemu_err(vm, e))?;
                                // Still throttled, QEMU cannot have finished since: if it has,
                                // it paused the VM on its own while it was ready (from then on,
                                // an upper bound).
                                let info = q.migrate_info().await.map_err(|e| qemu_err(vm, e))?;
                                if matches!(info.get("status").and_then(|s| s.as_str()), Some("device" | "completed" | "pre-switchover")) {
                                    ready_at
                                } else {
                                    t
                                }
                            }
                        });
                    }
                    // What is left goes at full speed: the VM waits for it.
                    let _ = q.execute("migrate-set-parameters", json!({ "max-bandwidth": super::CAPTURE_BANDWIDTH })).await;
                    gate.paused();
                }
                // An abort ends the wait for the stream too: the VM must not stay paused for it.
                let parsed = tokio::select! {
                    r = &mut parser => r.map_err(|e| SnapshotError::Internal(e.to_string()))?.map_err(|e| qemu_err(vm, e))?,
                    _ = aborted(abort.clone()) => return Err(SnapshotError::Aborted),
                };
                let t0 = Instant::now();
                let downtime = loop {
                    let info = q.migrate_info().await.map_err(|e| qemu_err(vm, e))?;
                    match info.get("status").and_then(|s| s.as_str()) {
                        Some("completed") => break info.get("downtime").and_then(|d| d.as_u64()),
                        Some("failed") | Some("cancelled") => {
                            return Err(qemu_err(vm, format!("QEMU reports the migration {}", info["status"])));
                        }
                        _ if t0.elapsed() > COMPLETE_TIMEOUT => return Err(qemu_err(vm, "QEMU did not finish the migration")),
                        _ => tokio::time::sleep(Duration::from_millis(2)).await,
                    }
                };
                // One cut: no VM runs on before every VM of the snapshot is paused.
                gate.wait(Stage::Release).await?;
                if was_running {
                    q.execute("cont", json!({})).await.map_err(|e| qemu_err(vm, e))?;
                    resumed_at = Some(Instant::now());
                }
                Ok::<_, SnapshotError>((parsed, downtime))
            }
            .await;
            if r.is_err() {
                // Stop QEMU sending at once, so that the parser (and the upload) end too.
                let _ = q.execute("migrate_cancel", json!({})).await;
            }
            r
        };
        let drain = async {
            if mode == CaptureMode::StopCopy {
                let _ = resumed_rx.await;
            }
            drain(up, vi, rx, &spool, progress, &abort).await
        };
        let (resumed, drained) = tokio::join!(resume, drain);
        let (parsed, downtime) = resumed?;
        let mut maps = drained?;
        // Every block gets a full-length map (pages never sent are zero).
        maps.resize_with(parsed.meta.blocks.len(), Vec::new);
        for (m, b) in maps.iter_mut().zip(&parsed.meta.blocks) {
            m.resize((b.len / PAGE_SIZE as u64) as usize, ZERO_HASH);
        }
        Ok(((parsed, maps), downtime))
    }
    .await;
    drop(listener);
    let _ = std::fs::remove_file(&sock);

    // Whatever happened: no migration left running, the VM as it was, the old bandwidth.
    if result.is_err() {
        let _ = q.execute("migrate_cancel", json!({})).await;
    }
    let mut resume_err = None;
    if was_running && resumed_at.is_none() {
        resume_err = Some("QEMU did not settle within 5 s".to_string());
        for _ in 0..500 {
            match q.status().await {
                Ok(s) if s == "running" => {
                    resume_err = None;
                    break;
                }
                Ok(s) if matches!(s.as_str(), "paused" | "postmigrate") => {
                    resume_err = q.execute("cont", json!({})).await.err().map(|e| e.to_string());
                    break;
                }
                Err(e) => {
                    resume_err = Some(e.to_string());
                    break;
                }
                // finish-migrate, cancelling: wait for it to settle
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    if journaled && resume_err.is_none() {
        node.vms.note_resumed(vm);
    }
    if let Some(e) = &resume_err {
        // The journal keeps the VM: the node's next start tries again.
        tracing::error!(target: "vmcsnap::snapshot", vm, error = %e, "could not resume the VM");
    }
    let pause_ms = paused_at.map(|(t, _)| resumed_at.unwrap_or_else(Instant::now).duration_since(t).as_millis() as u64);
    if let (Some(b), Some(d)) = (old_bandwidth, old_downtime) {
        let _ = q.execute("migrate-set-parameters", json!({ "max-bandwidth": b, "downtime-limit": d })).await;
    }
    if let Some(e) = resume_err {
        let what = if result.is_ok() { "captured" } else { "aborted" };
        return Err(qemu_err(vm, format!("{what}, but could not resume the VM: {e}")));
    }
    let ((parsed, hashes_by_block), downtime) = result?;

    let mut stats = VmStats { pause_ms: pause_ms.or(downtime), paused_unix_us: paused_at.map(|(_, u)| u), ..Default::default() };
    let mut hashes = Vec::new();
    for h in hashes_by_block {
        hashes.extend(h);
    }
    stats.pages_total = hashes.len() as u64;
    stats.pages_zero = hashes.iter().filter(|h| h.is_zero()).count() as u64;
    stats.pages_nonzero = stats.pages_total - stats.pages_zero;
    let (device_state, tail_pages) = super::blob_chunks(&parsed.tail);
    let mut upl = up.lock().await;
    for (h, p) in device_state.chunks.iter().zip(tail_pages) {
        if !h.is_zero() {
            upl.push(*h, Bytes::from(p), None).await?;
        }
    }
    drop(upl);
    let blocks = parsed.meta.blocks.iter().map(|b| Block { name: b.name.clone(), bytes: b.len }).collect();
    let state = QemuState {
        qmp: qmp_path.display().to_string(),
        head: parsed.meta.head,
        machine: parsed.meta.machine,
        ram_section: parsed.meta.ram_section,
        footers: parsed.meta.footers,
        device_state,
        qemu_version,
        accel,
        cmdline,
        mode,
        was_running,
    };
    Ok(Captured { hashes, blocks, stats, state })
}

/// Resolves once the cut is aborted (or its stage can no longer change).
async fn aborted(mut stage: tokio::sync::watch::Receiver<Stage>) {
    while *stage.borrow_and_update() != Stage::Abort {
        if stage.changed().await.is_err() {
            return;
        }
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Unsent bytes left in pre-copy's first pass at which the live copy is held (see
/// [`live_rounds`]); what is left then goes in the final round, while the VM is paused.
pub const HOLD_REMAINING_BYTES: u64 = 8 << 20;
/// QEMU's `max-bandwidth` while a live copy is held, bytes/s: so low that QEMU never finds the
/// copy converged, so it never pauses the VM on its own before the cut's `Go`.
pub const HOLD_BANDWIDTH: u64 = 4096;

/// Pre-copy's live rounds: waits until QEMU has (nearly) made one full pass over the VM's
/// memory, then holds the copy there — by throttling it, since QEMU would otherwise pause an
/// idle VM on its own the moment the pass ends, long before the other VMs of the cut are
/// ready — and reports the VM ready; then waits for the cut's `Go`. If QEMU still finished on
/// its own (the hold came too late), it paused the VM itself: returns when that was first
/// seen.
/// `Ok(Ok(t))`: QEMU paused the VM itself at `t`; `Ok(Err(t))`: the VM runs, ready since `t`.
async fn live_rounds(q: &mut Qmp, vm: &str, gate: &mut Gate) -> Result<Result<(Instant, u64), (Instant, u64)>, SnapshotError> {
    let mut self_paused = None;
    let abort = gate.watch();
    loop {
        check_abort(&abort)?;
        let info = q.migrate_info().await.map_err(|e| qemu_err(vm, e))?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("failed") | Some("cancelled") => return Err(qemu_err(vm, format!("QEMU reports the migration {}", info["status"]))),
            Some("device") | Some("completed") | Some("pre-switchover") => {
                self_paused = Some((Instant::now(), unix_us()));
                break;
            }
            Some("active") => {
                let ram = &info["ram"];
                let passes_done = ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 2;
                let near_end = ram["remaining"].as_u64().is_some_and(|r| r <= HOLD_REMAINING_BYTES) && ram["transferred"].as_u64().unwrap_or(0) > 0;
                if passes_done || near_end {
                    q.execute("migrate-set-parameters", json!({ "max-bandwidth": HOLD_BANDWIDTH })).await.map_err(|e| qemu_err(vm, e))?;
                    break;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ready_at = (Instant::now(), unix_us());
    gate.ready();
    // No QMP round trip while waiting: `Go` must be acted on the moment it arrives (a busy
    // QEMU can take a long while to answer).
    gate.wait(Stage::Go).await?;
    Ok(self_paused.ok_or(ready_at))
}

/// One page record: block, page index, and where its bytes are in the spool file (`None` for
/// a zero page).
type Entry = (u32, u64, Option<u64>);

/// Parses the stream, appending non-zero pages to `spool`; sends the page records in batches
/// (the spool is flushed before each batch is sent). Hashing happens on the other side, so
/// this thread — the one QEMU waits on — only copies.
fn parse_to_spool(
    conn: std::os::unix::net::UnixStream,
    spool: std::fs::File,
    tx: tokio::sync::mpsc::UnboundedSender<Vec<Entry>>,
) -> Result<stream::Parsed, StreamError> {
    use std::io::Write;
    let reader = std::io::BufReader::with_capacity(1 << 20, conn);
    let mut w = std::io::BufWriter::with_capacity(CAPTURE_BATCH_PAGES * PAGE_SIZE, spool);
    let mut off = 0u64;
    let mut batch: Vec<Entry> = Vec::with_capacity(CAPTURE_BATCH_PAGES);
    let spool_err = |e: std::io::Error| StreamError::Sink(format!("spool file: {e}"));
    let parsed = stream::parse(reader, |b, i, d| {
        let entry = match d {
            Some(d) if !is_zero_page(d) => {
                w.write_all(d).map_err(spool_err)?;
                off += PAGE_SIZE as u64;
                (b as u32, i, Some(off - PAGE_SIZE as u64))
            }
            _ => (b as u32, i, None),
        };
        batch.push(entry);
        if batch.len() >= CAPTURE_BATCH_PAGES {
            w.flush().map_err(spool_err)?;
            tx.send(std::mem::replace(&mut batch, Vec::with_capacity(CAPTURE_BATCH_PAGES)))
                .map_err(|_| StreamError::Sink("the snapshot stopped".into()))?;
        }
        Ok(())
    })?;
    w.flush().map_err(spool_err)?;
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
    Ok(parsed)
}

/// Keeps each block's page map (last copy wins) and pushes non-zero pages, read back from the
/// spool, to the owners.
async fn drain(
    up: &Mutex<Uploader>,
    vi: usize,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Entry>>,
    spool: &std::fs::File,
    progress: &Progress,
    abort: &tokio::sync::watch::Receiver<Stage>,
) -> Result<Vec<Vec<PageHash>>, SnapshotError> {
    use std::os::unix::fs::FileExt;
    let mut maps: Vec<Vec<PageHash>> = Vec::new();
    let mut records = 0u64;
    while let Some(batch) = rx.recv().await {
        check_abort(abort)?;
        // The batch's non-zero pages sit one after another in the spool: one read, then hash
        // them on the blocking pool.
        let offs: Vec<u64> = batch.iter().filter_map(|e| e.2).collect();
        let (first, data, hashes) = match (offs.first(), offs.last()) {
            (Some(&first), Some(&last)) => {
                let spool = spool.try_clone().map_err(|e| SnapshotError::Internal(format!("spool file: {e}")))?;
                let (data, hashes) = tokio::task::spawn_blocking(move || -> std::io::Result<(Bytes, Vec<PageHash>)> {
                    let mut buf = vec![0u8; (last - first) as usize + PAGE_SIZE];
                    spool.read_exact_at(&mut buf, first)?;
                    let hashes = buf.chunks_exact(PAGE_SIZE).map(hash_page).collect();
                    Ok((Bytes::from(buf), hashes))
                })
                .await
                .map_err(|e| SnapshotError::Internal(e.to_string()))?
                .map_err(|e| SnapshotError::Internal(format!("spool file: {e}")))?;
                (first, data, hashes)
            }
            _ => (0, Bytes::new(), Vec::new()),
        };
        let mut up = up.lock().await;
        for (b, i, off) in batch {
            let b = b as usize;
            if maps.len() <= b {
                maps.resize_with(b + 1, Vec::new);
            }
            let m = &mut maps[b];
            if m.len() <= i as usize {
                m.resize(i as usize + 1, ZERO_HASH);
            }
            match off {
                Some(off) => {
                    let at = (off - first) as usize;
                    let h = hashes[at / PAGE_SIZE];
                    m[i as usize] = h;
                    up.push(h, data.slice(at..at + PAGE_SIZE), Some(vi)).await?;
                }
                None => m[i as usize] = ZERO_HASH,
            }
            records += 1;
        }
        progress.set(records);
    }
    Ok(maps)
}

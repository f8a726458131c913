//! Lazy restore: the guest runs as soon as its device state is loaded, and its memory follows
//! (QEMU postcopy with this node as the source; the stream in [`crate::qemu::postcopy`]).
//!
//! States, each with its own failure:
//! 1. **Ready**: the launched QEMU accepts `postcopy-ram` (else the restore is eager, and says
//!    so) and the VM is journaled (`lazy:VM` in the node's metadata) before any byte is sent.
//! 2. **Running**: head, advice, RAM block list, then the device state in one package; QEMU
//!    loads it and runs the guest. A failure before this point kills the QEMU, as an eager
//!    restore does.
//! 3. **Streaming**: pages QEMU asks for (a vCPU or device touched them) go first, each from
//!    this node's store, else its owners, verified against its hash; between requests the
//!    rest is pushed window by window, in memory order. Zero pages are sent only when asked
//!    for (QEMU's RAM starts empty and reads as zero once the stream ends). Memory backed by
//!    huge pages goes a host page at a time (QEMU places whole host pages): a host page
//!    with any non-zero page is pushed whole, zero pages included; the launched QEMU's `info
//!    ramblock` gives the sizes, asked when the recorded command line names `mem-path` or
//!    `hugetlb`.
//! 4. **Resident**: the `ram` section's end and `EOF`; QEMU unregisters userfaultfd and says
//!    `completed`. The journal entry goes.
//!
//! If pages cannot be had, or the node dies, QEMU holds the migration in `postcopy-paused`:
//! the guest waits on the missing pages and never runs on memory that is not the snapshot's.
//! A restore whose stream broke while its node lives resumes it at once ([`RESUME_NOW`]
//! tries); then, and after a node's death, the node retries every [`RECOVER_RETRY`] (and at
//! start, from the journal): `migrate-recover` onto a new socket, QEMU's bitmap of the pages it
//! has, `POSTCOPY_RESUME`, then the rest.

use super::error::RestoreError;
use super::fetch::{accel_mismatch, expand_manifest, fetch_blob, forget_elsewhere, not_inmigrate, Fetcher};
use super::{Progress, RESTORE_WINDOWS_IN_FLIGHT, RESTORE_WINDOW_PAGES};
use crate::node::Node;
use crate::qemu::keeper;
use crate::qemu::postcopy::{read_message, RpMessage, Source, PART_PAGES_MAX};
use crate::qemu::qmp::Qmp;
use crate::qemu::stream::StreamMeta;
use futures::{stream, StreamExt};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmcsnap_protocol::manifest::{Block, CommitRecord, QemuState, VmEntry};
use vmcsnap_protocol::{PageHash, PAGE_SIZE};

/// Journal prefix of lazy restores under way on this host.
const LAZY_PREFIX: &[u8] = b"lazy:";
/// Time QEMU has to load the device state and run the guest.
pub const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// Time QEMU has to say `completed` after the stream's end.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts to resume a paused lazy restore.
pub const RECOVER_RETRY: Duration = Duration::from_secs(10);
/// Attempts a restore makes at once to resume its stream when it broke off, before it says
/// so and leaves it to the node's retries; and the pause before each.
const RESUME_NOW: usize = 3;
/// See [`RESUME_NOW`].
const RESUME_NOW_PAUSE: Duration = Duration::from_millis(500);
/// Buffers queued for the socket (each at most [`PART_PAGES_MAX`] pages): a page request waits
/// behind at most this many.
const SEND_QUEUE: usize = 2;
/// Fetched windows waiting to be pushed (besides the one being pushed).
const WINDOWS_QUEUED: usize = 2;
/// The RAM sent before the guest may run: the first [`EARLY_PAGES`] of this block, an x86
/// guest's first MiB (real-mode memory: interrupt table, BIOS data, option ROMs, the BIOS
/// shadow). QEMU reads some of it while it loads the device state, before the guest runs
/// (under TCG, 0xCA000 and 0xCB000 in the option ROM area, likely the VAPIC's); each page asked for there was a round trip on
/// the way to running.
const EARLY_BLOCK: &str = "pc.ram";
/// See [`EARLY_BLOCK`].
const EARLY_PAGES: u64 = 256;

/// What a lazy restore reads before it starts (while its QEMU starts, when it can): the
/// manifest, the device state, and the early pages ([`EARLY_BLOCK`]) it has.
pub struct Prepared {
    /// The VM's page hashes, RAM blocks first.
    pub hashes: Vec<PageHash>,
    /// The recorded device state.
    pub tail: Vec<u8>,
    /// The non-zero early pages that could be fetched (the others are asked for, or pushed,
    /// later).
    pub early: HashMap<PageHash, bytes::Bytes>,
    /// Where those came from.
    pub stats: super::fetch::FetchStats,
}

/// Reads what [`restore`] needs of `entry`; `on_chunks` sees the manifest's progress.
pub async fn prepare(node: &Arc<Node>, record: &CommitRecord, entry: &VmEntry, on_chunks: impl FnMut(usize, &[PageHash])) -> Result<Prepared, RestoreError> {
    let state = entry.qemu.as_ref().ok_or_else(|| RestoreError::Internal("no QEMU state".into()))?;
    let fetcher = Fetcher::new(node, record);
    let hashes = expand_manifest(&fetcher, entry, on_chunks).await?;
    let tail = fetch_blob(&fetcher, &state.device_state).await?;
    let mut need: Vec<PageHash> = hashes.get(early_range(&entry.ram_blocks())).unwrap_or_default().iter().filter(|h| !h.is_zero()).copied().collect();
    need.sort();
    need.dedup();
    // Best effort: what cannot be had now is had later, as any other page.
    let early = if need.is_empty() { HashMap::new() } else { fetcher.fetch(need).await.unwrap_or_default() };
    Ok(Prepared { hashes, tail, early, stats: fetcher.stats() })
}

/// The global page indexes of the early pages among RAM `blocks`.
fn early_range(blocks: &[Block]) -> std::ops::Range<usize> {
    let mut at = 0u64;
    for b in blocks {
        let pages = b.bytes / PAGE_SIZE as u64;
        if b.name == EARLY_BLOCK {
            return at as usize..(at + pages.min(EARLY_PAGES)) as usize;
        }
        at += pages;
    }
    0..0
}

/// What a lazy restore journals: enough to resume it after a crash.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Journal {
    /// Snapshot name (or `NAME@RECORD`) as restored.
    name: String,
    vm: String,
    qmp: PathBuf,
    /// Host page size of each RAM block as the launched QEMU has it (empty: 4 KiB each).
    #[serde(default)]
    page_sizes: Vec<u64>,
}

/// What a finished lazy restore reports.
pub struct Served {
    /// From the restore's start until QEMU ran the guest.
    pub running_ms: u64,
    /// How the pages went (of a resumed stream: its second connection's).
    pub stats: ServeStats,
    /// Why and how the stream was resumed, if it broke off once.
    pub resumed: Option<String>,
}

/// How one postcopy stream's pages went.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeStats {
    /// Pages QEMU asked for before they had been pushed.
    pub requested: u64,
    /// Where the pages came from.
    pub fetched: super::fetch::FetchStats,
}

/// Why a lazy restore did not happen.
pub enum LazyError {
    /// QEMU refused postcopy (before anything was sent): restore eagerly instead.
    Refused(String),
    /// It failed before the guest ran (the caller kills the QEMU).
    Failed(RestoreError),
    /// It failed after the guest ran: QEMU holds it paused in postcopy, and this node keeps
    /// trying to resume it (the QEMU must live on).
    Paused(RestoreError),
}

impl From<RestoreError> for LazyError {
    fn from(e: RestoreError) -> Self {
        LazyError::Failed(e)
    }
}

/// Restores VM `vm` of `record` lazily into the QEMU `target` launched (waiting on its
/// incoming socket). Returns once all memory is resident; `t0` is the restore's start.
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    node: &Arc<Node>,
    name: &str,
    record: &CommitRecord,
    vm: &str,
    prepared: Prepared,
    target: &crate::qemu::launch::Launched,
    keeper: Option<keeper::Keeper>,
    t0: Instant,
    progress: Progress,
) -> Result<Served, LazyError> {
    let (incoming, qmp) = (&target.incoming, &target.qmp);
    let entry = record.vm(vm).ok_or_else(|| RestoreError::Internal(format!("no VM {vm}")))?;
    let state = entry.qemu.as_ref().ok_or_else(|| RestoreError::Internal("no QEMU state".into()))?;
    let target_err = |m: String| LazyError::Failed(RestoreError::Target(m));
    let ksock = keeper::socket_of(&node.config.data_dir, vm);
    // Every command goes through the keeper, which started beside QEMU: one monitor client,
    // and its start off the way to running.
    let mut keeper = match keeper {
        Some(k) => k,
        None => keeper::Keeper::spawn(qmp, &ksock).map_err(LazyError::Refused)?,
    };
    if let Err(e) = keeper.ready().await {
        keeper.kill().await;
        return Err(LazyError::Refused(e));
    }
    tracing::debug!(target: "vmcsnap::restore", vm, ms = t0.elapsed().as_secs_f64() * 1e3, "keeper started");
    if let Err(e) = check_target_through(&ksock, vm, state).await {
        keeper.kill().await;
        return Err(target_err(e));
    }
    let meta = crate::qemu::stream_meta(state, &entry.blocks);
    let page_sizes = match host_page_sizes(&ksock, state, &meta).await {
        Ok(p) => p,
        Err(e) => {
            keeper.kill().await;
            return Err(LazyError::Refused(e));
        }
    };
    // `events`: the keeper ends when QEMU says the migration completed or failed.
    let on = serde_json::json!({ "execute": "migrate-set-capabilities", "arguments": { "capabilities": [
        { "capability": "postcopy-ram", "state": true },
        { "capability": "events", "state": true },
    ] } });
    if let Err(e) = keeper::call(&ksock, on).await {
        // The restore goes on eagerly, through a monitor of its own.
        keeper.kill().await;
        return Err(LazyError::Refused(e));
    }
    keeper.detach(); // the guest may run from here: the keeper must outlive this node
    tracing::debug!(target: "vmcsnap::restore", vm, ms = t0.elapsed().as_secs_f64() * 1e3, "postcopy set");
    let conn = UnixStream::connect(incoming).map_err(|e| target_err(format!("cannot connect to the QEMU waiting on {}: {e}", incoming.display())))?;
    // Journaled before QEMU gets a byte: from the package on, the guest may run.
    let journal = Journal { name: name.to_string(), vm: vm.to_string(), qmp: qmp.to_path_buf(), page_sizes: page_sizes.clone() };
    let key = [LAZY_PREFIX, vm.as_bytes()].concat();
    let bytes = serde_json::to_vec(&journal).map_err(|e| RestoreError::Internal(e.to_string()))?;
    node.store.meta_put(&key, &bytes).map_err(RestoreError::from)?;
    tracing::debug!(target: "vmcsnap::restore", vm, ms = t0.elapsed().as_secs_f64() * 1e3, "journaled");
    // The source must not vanish while the guest runs: the stream is served by a task of its
    // own, which a caller that goes away does not cancel.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let Prepared { hashes, tail, early, stats: early_stats } = prepared;
    let serving = tokio::spawn(serve(node.clone(), record.clone(), meta, page_sizes, hashes, conn, Start::New { tail, early, ready: ready_tx }, progress));
    // 2. Running.
    let running = async {
        let _ = ready_rx.await;
        tracing::debug!(target: "vmcsnap::restore", vm, ms = t0.elapsed().as_secs_f64() * 1e3, "device state sent");
        let deadline = Instant::now() + RUNNING_TIMEOUT;
        let status = serde_json::json!({ "execute": "query-status" });
        loop {
            match keeper::call(&ksock, status.clone()).await {
                Ok(s) if s["status"] == "running" => return Ok(()),
                Ok(_) if Instant::now() > deadline => return Err(format!("QEMU did not run the guest within {RUNNING_TIMEOUT:?}")),
                Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(e) => return Err(format!("QEMU failed to load the snapshot ({e}); it exits on a stream it cannot load — see its log")),
            }
        }
    };
    let running_ms = match running.await {
        Ok(()) => t0.elapsed().as_millis() as u64,
        Err(e) => {
            serving.abort();
            let _ = node.store.meta_delete(&key);
            return Err(LazyError::Failed(RestoreError::Qemu(e)));
        }
    };
    tracing::info!(target: "vmcsnap::restore", vm, ms = running_ms, "guest running; memory follows");
    // 3. and 4.
    let served = serving.await.map_err(|e| LazyError::Paused(RestoreError::Internal(e.to_string())))?;
    let (mut stats, resumed) = match served {
        Ok(r) => {
            wait_completed(qmp, &ksock).await.map_err(|e| LazyError::Paused(RestoreError::Qemu(e)))?;
            (r, None)
        }
        Err(e) => {
            // QEMU holds the guest in postcopy-paused (its log says why the stream broke).
            // Resumed at once, a few times, on a new connection with the pages QEMU lacks;
            // then left to the node's retries.
            tracing::warn!(target: "vmcsnap::restore", vm, error = %e, "lazy restore lost its stream mid-way; QEMU holds the guest in postcopy, resuming it");
            let resumed = resume_now(node, &journal).await;
            // Read after QEMU had time to say why it paused.
            let log = crate::qemu::launch::log_tail(&target.log);
            let said = if log.is_empty() { String::new() } else { format!("; QEMU said: {log}") };
            match resumed {
                Ok(r) => {
                    tracing::info!(target: "vmcsnap::restore", vm, qemu_log = %log, "lazy restore resumed and completed");
                    (r, Some(format!("the stream to QEMU broke off once ({e}{said}) and was resumed")))
                }
                Err(last) if last == VM_GONE => {
                    // Not paused: QEMU ended (with `-no-reboot`, a guest that panicked or shut
                    // down ends it too). The retry finds it gone and drops the journal entry.
                    tokio::spawn(retry(node.clone(), journal));
                    return Err(LazyError::Paused(RestoreError::Qemu(format!(
                        "VM {vm} ran, but its QEMU exited before all its memory was delivered ({e}{said}): the guest shut down or crashed (its console says which), or QEMU was ended; nothing of it runs"
                    ))));
                }
                Err(last) => {
                    tokio::spawn(retry(node.clone(), journal));
                    return Err(LazyError::Paused(RestoreError::Qemu(format!(
                        "VM {vm} runs, but its memory could not all be delivered ({e}{said}; resuming: {last}); QEMU holds it paused in postcopy (its vCPUs wait for the missing pages, nothing runs on wrong memory) and this node tries again every {} s",
                        RECOVER_RETRY.as_secs()
                    ))));
                }
            }
        }
    };
    stats.fetched.pages_local += early_stats.pages_local;
    stats.fetched.pages_shared += early_stats.pages_shared;
    stats.fetched.bytes_fetched += early_stats.bytes_fetched;
    let _ = node.store.meta_delete(&key);
    Ok(Served { running_ms, stats, resumed })
}

/// Tries [`RESUME_NOW`] times, [`RESUME_NOW_PAUSE`] apart, to resume the paused restore `j`
/// to the end; the pages' stats of the try that did, or the last try's error.
async fn resume_now(node: &Arc<Node>, j: &Journal) -> Result<ServeStats, String> {
    let mut last = String::new();
    for _ in 0..RESUME_NOW {
        tokio::time::sleep(RESUME_NOW_PAUSE).await;
        match recover(node, j).await {
            Ok(("completed", stats)) => return Ok(stats),
            Ok(("completed before", _)) => return Ok(ServeStats::default()),
            Ok((other, _)) => return Err(other.to_string()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// [`super::fetch::check_target`] through the keeper on `ksock`.
async fn check_target_through(ksock: &Path, vm: &str, state: &QemuState) -> Result<(), String> {
    let kvm = keeper::call(ksock, serde_json::json!({ "execute": "query-kvm" })).await?;
    let accel = if kvm["enabled"].as_bool().unwrap_or(false) { "kvm" } else { "tcg" };
    if accel != state.accel {
        return Err(accel_mismatch(vm, &state.accel, accel));
    }
    let status = keeper::call(ksock, serde_json::json!({ "execute": "query-status" })).await?;
    match status["status"].as_str().unwrap_or("unknown") {
        "inmigrate" => Ok(()),
        s => Err(not_inmigrate(s)),
    }
}

/// The host page size of each RAM block of `meta` in the QEMU behind the keeper on `ksock`, in
/// bytes, from its `info ramblock`: asked only when the recorded command line backs memory by
/// a file or huge pages (`mem-path`, `hugetlb`), empty otherwise (4 KiB pages). A size the push
/// cannot send a host page at a time is an error (the restore is then eager).
async fn host_page_sizes(ksock: &Path, state: &QemuState, meta: &StreamMeta) -> Result<Vec<u64>, String> {
    if !state.cmdline.iter().any(|a| a.contains("mem-path") || a.contains("hugetlb")) {
        return Ok(Vec::new());
    }
    let ask = serde_json::json!({ "execute": "human-monitor-command", "arguments": { "command-line": "info ramblock" } });
    let out = keeper::call(ksock, ask).await.map_err(|e| format!("QEMU's RAM blocks (`info ramblock`): {e}"))?;
    let sizes = ramblock_page_sizes(out.as_str().unwrap_or_default(), &meta.blocks)?;
    let starts = Layout::of(meta).starts;
    for ((b, &size), start) in meta.blocks.iter().zip(&sizes).zip(starts) {
        let pages = size / PAGE_SIZE as u64;
        if pages > 1 && (!(RESTORE_WINDOW_PAGES as u64).is_multiple_of(pages) || !start.is_multiple_of(pages) || !b.bytes.is_multiple_of(size)) {
            return Err(format!("RAM block {} has host pages of {} KiB, which the lazy restore cannot send whole", b.name, size >> 10));
        }
    }
    Ok(sizes)
}

/// The host page size of each of `blocks` in QEMU's `info ramblock` table `text` (a header,
/// then one line per block: name, page size as `4 KiB` or `2 MiB`, offsets and lengths).
fn ramblock_page_sizes(text: &str, blocks: &[Block]) -> Result<Vec<u64>, String> {
    let mut sizes = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(n), Some(unit)) = (f.first(), f.get(1), f.get(2)) else { continue };
        let unit: u64 = match *unit {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(format!("QEMU's `info ramblock` line {line:?} has no page size")),
        };
        let n: f64 = n.parse().map_err(|_| format!("QEMU's `info ramblock` line {line:?} has no page size"))?;
        sizes.insert(name.to_string(), (n * unit as f64) as u64);
    }
    blocks.iter().map(|b| sizes.get(&b.name).copied().ok_or_else(|| format!("QEMU's `info ramblock` does not list RAM block {}", b.name))).collect()
}

/// Polls QEMU until its incoming migration is `completed` (through the keeper while it holds
/// the monitor; it lets go on completion).
async fn wait_completed(qmp: &Path, ksock: &Path) -> Result<(), String> {
    let deadline = Instant::now() + COMPLETE_TIMEOUT;
    loop {
        let s = match keeper::call(ksock, serde_json::json!({ "execute": "query-migrate" })).await {
            Ok(m) => m["status"].as_str().unwrap_or("none").to_string(),
            Err(_) if !ksock.exists() => {
                let mut q = Qmp::connect(qmp).await.map_err(|e| e.to_string())?;
                q.migrate_status().await.map_err(|e| e.to_string())?
            }
            Err(e) => e,
        };
        match s.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => return Err(format!("QEMU's incoming migration ended {s}; see its log")),
            _ if Instant::now() > deadline => return Err(format!("QEMU's incoming migration is still {s} after the whole stream")),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a stream starts.
enum Start {
    /// A fresh QEMU: head, advice, RAM list, the `early` pages it has (pre-copy), package with
    /// `tail`; `ready` once that is sent.
    New { tail: Vec<u8>, early: HashMap<PageHash, bytes::Bytes>, ready: tokio::sync::oneshot::Sender<()> },
    /// A paused migration, on the channel `migrate-recover` opened.
    Resume,
}

/// Serves one postcopy stream on `conn` until QEMU has every page.
#[allow(clippy::too_many_arguments)]
async fn serve(
    node: Arc<Node>,
    record: CommitRecord,
    meta: StreamMeta,
    page_sizes: Vec<u64>,
    hashes: Vec<PageHash>,
    conn: UnixStream,
    start: Start,
    mut progress: Progress,
) -> Result<ServeStats, RestoreError> {
    let io_err = |what: &str, e: std::io::Error| RestoreError::Qemu(format!("{what}: {e}"));
    let fetcher = Fetcher::new(&node, &record).for_push();
    let Layout { starts, names, bitmap_max } = Layout::of(&meta);
    // Pages per host page of each block: QEMU places whole host pages.
    let host: Vec<u64> = (0..meta.blocks.len()).map(|b| page_sizes.get(b).map_or(1, |s| (s / PAGE_SIZE as u64).max(1))).collect();
    let Channels { mut rp_rx, tx, free, writer } = channels(conn, bitmap_max)?;
    let mut sent = vec![false; hashes.len()];
    let mut src = begin(start, &meta, &host, &names, &starts, &hashes, &mut sent, &tx, &mut rp_rx).await?;

    // Windows that hold a page QEMU lacks, fetched ahead in memory order.
    let wanted: Vec<usize> = (0..hashes.len().div_ceil(RESTORE_WINDOW_PAGES))
        .filter(|w| (w * RESTORE_WINDOW_PAGES..((w + 1) * RESTORE_WINDOW_PAGES).min(hashes.len())).any(|i| !sent[i] && !hashes[i].is_zero()))
        .collect();
    progress.phase("memory", hashes.len() as u64);
    let fetcher = &fetcher;
    let hashes = &hashes;
    let mut windows = stream::iter(wanted)
        .map(|w| async move {
            let base = w * RESTORE_WINDOW_PAGES;
            let window = &hashes[base..(base + RESTORE_WINDOW_PAGES).min(hashes.len())];
            let mut need: Vec<PageHash> = window.iter().filter(|h| !h.is_zero()).copied().collect();
            need.sort();
            need.dedup();
            fetcher.fetch(need).await.map(|pages| (base, pages))
        })
        .buffered(RESTORE_WINDOWS_IN_FLIGHT);
    let mut last_block: Option<String> = None;
    let mut requested = 0u64;
    let (rate, push_start, mut pushed) = (node.config.lazy_push_rate, Instant::now(), 0u64);
    // Fetches for QEMU's requests run beside the window fetches, and every one of them is
    // polled by this one loop: awaiting a request's fetch while window fetches sit unpolled
    // would leave their answers unread, and the connection's flow control would then hold
    // back the request's answer too, for ever.
    let mut asked = futures::stream::FuturesUnordered::new();
    let mut windows_done = false;
    // When the push may send its next part (the cap), if it is waiting.
    let mut push_due: Option<tokio::time::Instant> = None;
    // The window being pushed: its base, pages, and how far it got; and windows fetched
    // since. The window fetches are polled all along (at most [`WINDOWS_QUEUED`] wait).
    let mut pushing: Option<(usize, HashMap<PageHash, bytes::Bytes>, usize)> = None;
    let mut queued: std::collections::VecDeque<(usize, HashMap<PageHash, bytes::Bytes>)> = Default::default();

    loop {
        if pushing.is_none() {
            pushing = queued.pop_front().map(|(base, pages)| (base, pages, base));
        }
        if windows_done && pushing.is_none() && asked.is_empty() {
            break;
        }
        let push_ready = pushing.is_some() && push_due.is_none_or(|d| d <= tokio::time::Instant::now());
        tokio::select! {
            biased;
            m = rp_rx.recv() => {
                match m.ok_or_else(|| RestoreError::Qemu("QEMU's return path closed".into()))? {
                    Ok(RpMessage::ReqPages { block, offset, len }) => {
                        tracing::trace!(target: "vmcsnap::restore", ?block, offset, len, "QEMU asks for pages");
                        if let Some(b) = block {
                            last_block = Some(b);
                        }
                        let (b, idx) = requested_pages(last_block.as_deref(), offset, len, &names, &meta, &starts, &host)?;
                        let mut need: Vec<PageHash> = idx.iter().map(|g| hashes[*g as usize]).filter(|h| !h.is_zero()).collect();
                        need.sort();
                        need.dedup();
                        asked.push(async move {
                            let pages = if need.is_empty() { Ok(HashMap::new()) } else { fetcher.fetch_urgent(need).await };
                            pages.map(|p| (b, idx, p))
                        });
                    }
                    Ok(RpMessage::Shut(v)) => return Err(RestoreError::Qemu(format!("QEMU ended the migration before it had every page (code {v}); see its log"))),
                    Ok(_) => {}
                    Err(e) => {
                        let have = sent.iter().filter(|s| **s).count();
                        let what = format!("QEMU's return path, with {have} of {} pages sent", hashes.len());
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            return Err(RestoreError::Qemu(format!("{what}: QEMU closed the connection")));
                        }
                        return Err(io_err(&what, e));
                    }
                }
            }
            Some(r) = asked.next(), if !asked.is_empty() => {
                let (b, idx, pages) = r?;
                for g in idx {
                    if sent[g as usize] {
                        continue; // pushed meanwhile, or asked for twice
                    }
                    write_page(&mut src, b, g - starts[b], &hashes[g as usize], &pages)?;
                    sent[g as usize] = true;
                    requested += 1;
                }
                src.end_part().map_err(|e| io_err("stream", e))?;
                let next = spare(&free);
                send(&tx, std::mem::replace(src.writer(), next)).await?;
            }
            _ = async { if let Some(d) = push_due { tokio::time::sleep_until(d).await } }, if pushing.is_some() && !push_ready => {
                push_due = None;
            }
            _ = std::future::ready(()), if push_ready => {
                // One part of the window being pushed.
                let (base, pages, at) = pushing.take().expect("pushing");
                let end = (base + RESTORE_WINDOW_PAGES).min(hashes.len());
                let (g, in_part) = push_part(&mut src, &starts, &host, hashes, &mut sent, &pages, at..end)?;
                src.end_part().map_err(|e| io_err("stream", e))?;
                let next = spare(&free);
                send(&tx, std::mem::replace(src.writer(), next)).await?;
                pushed += (in_part * PAGE_SIZE) as u64;
                if rate > 0 {
                    push_due = Some(tokio::time::Instant::from_std(push_start + Duration::from_secs_f64(pushed as f64 / rate as f64)));
                }
                if g < end {
                    pushing = Some((base, pages, g));
                } else {
                    progress.set(end as u64);
                }
            }
            w = windows.next(), if !windows_done && queued.len() < WINDOWS_QUEUED => {
                match w {
                    None => windows_done = true,
                    Some(w) => {
                        let (base, pages) = w?;
                        tracing::trace!(target: "vmcsnap::restore", base, pages = pages.len(), "window fetched");
                        queued.push_back((base, pages));
                    }
                }
            }
        }
    }
    // 4. Resident: the end of RAM and of the stream.
    finish(src, tx, writer, &mut rp_rx).await?;
    progress.set(hashes.len() as u64);
    Ok(ServeStats { requested, fetched: fetcher.stats() })
}

/// Where a stream's RAM blocks start (page index), their names, and the largest bitmap QEMU
/// may send for one (its pages, in bits, rounded up, plus the length).
struct Layout {
    starts: Vec<u64>,
    names: HashMap<String, usize>,
    bitmap_max: usize,
}

impl Layout {
    fn of(meta: &StreamMeta) -> Self {
        let starts = meta
            .blocks
            .iter()
            .scan(0u64, |at, b| {
                let s = *at;
                *at += b.bytes / PAGE_SIZE as u64;
                Some(s)
            })
            .collect();
        let names = meta.blocks.iter().enumerate().map(|(i, b)| (b.name.clone(), i)).collect();
        let bitmap_max = meta.blocks.iter().map(|b| (b.bytes / PAGE_SIZE as u64).div_ceil(64) as usize * 8).max().unwrap_or(0) + 8;
        Self { starts, names, bitmap_max }
    }
}

/// Ends the stream once every page is resident: its last part, the writer's flush, then
/// QEMU's `SHUT` (zero pages it still asks for meanwhile read as zero once it unregisters).
async fn finish(
    src: Source<Vec<u8>>,
    tx: ToQemu,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    rp_rx: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<RpMessage>>,
) -> Result<(), RestoreError> {
    let out = src.finish().map_err(|e| RestoreError::Qemu(format!("stream: {e}")))?;
    send(&tx, out).await?;
    drop(tx);
    writer.await.map_err(|e| RestoreError::Internal(e.to_string()))?.map_err(|e| RestoreError::Qemu(format!("writing to QEMU: {e}")))?;
    let _ = tokio::time::timeout(COMPLETE_TIMEOUT, async {
        while let Some(Ok(m)) = rp_rx.recv().await {
            if matches!(m, RpMessage::Shut(_)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// The connection of a lazy restore to the RAM pages: for a fresh QEMU, the head, advice, RAM
/// list, early pages and device-state package; for a paused one, the bitmaps of the pages it
/// has. What QEMU has is marked in `sent`; `host` holds each block's pages per host page.
#[allow(clippy::too_many_arguments)]
async fn begin(
    start: Start,
    meta: &StreamMeta,
    host: &[u64],
    names: &HashMap<String, usize>,
    starts: &[u64],
    hashes: &[PageHash],
    sent: &mut [bool],
    tx: &ToQemu,
    rp_rx: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::Result<RpMessage>>,
) -> Result<Source<Vec<u8>>, RestoreError> {
    let io_err = |what: &str, e: std::io::Error| RestoreError::Qemu(format!("{what}: {e}"));
    Ok(match start {
        Start::New { tail, early, ready } => {
            // Zero pages and the fetched ones go; a page whose fetch failed is had later.
            let mut pages = Vec::new();
            for g in early_range(&meta.blocks).take_while(|g| *g < hashes.len()) {
                let h = &hashes[g];
                let data = if h.is_zero() {
                    None
                } else {
                    match early.get(h) {
                        Some(d) => Some(&d[..]),
                        None => continue,
                    }
                };
                let b = starts.partition_point(|&s| s <= g as u64) - 1;
                if host[b] > 1 {
                    continue; // huge pages go whole, once QEMU listens
                }
                pages.push((b, g as u64 - starts[b], data));
                sent[g] = true;
            }
            let page_sizes = host.iter().map(|h| h * PAGE_SIZE as u64).collect();
            let mut s = Source::start_with(Vec::new(), meta.clone(), page_sizes, pages).map_err(|e| io_err("stream", e))?;
            s.package(&tail).map_err(|e| io_err("device state", e))?;
            send(tx, std::mem::take(s.writer())).await?;
            let _ = ready.send(());
            s
        }
        Start::Resume => {
            let mut s = Source::resume(Vec::new(), meta.clone()).map_err(|e| io_err("stream", e))?;
            send(tx, std::mem::take(s.writer())).await?;
            let mut bitmaps = 0;
            while bitmaps < meta.blocks.len() {
                match rp_rx.recv().await {
                    Some(Ok(RpMessage::RecvBitmap { block, bitmap })) => {
                        let b = *names.get(&block).ok_or_else(|| RestoreError::Qemu(format!("QEMU sent the bitmap of an unknown block {block}")))?;
                        let pages = meta.blocks[b].bytes / PAGE_SIZE as u64;
                        for i in 0..pages {
                            if bitmap.get((i / 8) as usize).is_some_and(|byte| byte >> (i % 8) & 1 == 1) {
                                sent[(starts[b] + i) as usize] = true;
                            }
                        }
                        bitmaps += 1;
                    }
                    Some(Ok(_)) => {} // requests from before the pause come again after it
                    Some(Err(e)) => return Err(io_err("QEMU's return path", e)),
                    None => return Err(RestoreError::Qemu("QEMU's return path closed".into())),
                }
            }
            s.send_resume().map_err(|e| io_err("stream", e))?;
            send(tx, std::mem::take(s.writer())).await?;
            loop {
                match rp_rx.recv().await {
                    Some(Ok(RpMessage::ResumeAck(_))) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(io_err("QEMU's return path", e)),
                    None => return Err(RestoreError::Qemu("QEMU's return path closed".into())),
                }
            }
            let have = sent.iter().filter(|s| **s).count();
            tracing::info!(target: "vmcsnap::restore", pages_resident = have, pages = sent.len(), "lazy restore resumed");
            s
        }
    })
}

/// The bytes for QEMU (see [`send`]), and why the writer stopped if it did (QEMU closed the
/// connection: its log says why).
struct ToQemu {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    why: Arc<std::sync::OnceLock<String>>,
}

/// A postcopy connection's channels (see [`channels`]).
struct Channels {
    /// Return-path messages, as read.
    rp_rx: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<RpMessage>>,
    /// Bytes for QEMU.
    tx: ToQemu,
    /// Part buffers the writer is done with, to be written again.
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    /// The writer; ends once `tx` is dropped and all is written.
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The two directions of a postcopy connection: return-path messages read on a thread of
/// their own, and bytes written on a blocking thread. Dropping the sender ends the write side,
/// so that QEMU sees the stream end (and pauses, unless it had it all).
fn channels(conn: UnixStream, bitmap_max: usize) -> Result<Channels, RestoreError> {
    let mut reader = conn.try_clone().map_err(|e| RestoreError::Qemu(format!("cannot read QEMU's return path: {e}")))?;
    let (rp_tx, rp_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || loop {
        let m = read_message(&mut reader, bitmap_max);
        let end = m.is_err();
        if rp_tx.send(m).is_err() || end {
            break;
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(SEND_QUEUE);
    let why = Arc::new(std::sync::OnceLock::new());
    let tx = ToQemu { tx, why: why.clone() };
    let (free_tx, free) = std::sync::mpsc::channel();
    let mut wconn = conn;
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        while let Some(mut b) = rx.blocking_recv() {
            if let Err(e) = wconn.write_all(&b) {
                // Said before `rx` goes, so that the failed send finds it.
                let _ = why.set(e.to_string());
                return Err(e);
            }
            if b.capacity() >= PART_BYTES {
                b.clear();
                let _ = free_tx.send(b);
            }
        }
        wconn.shutdown(std::net::Shutdown::Write)
    });
    Ok(Channels { rp_rx, tx, free, writer })
}

/// Bytes of a full part section: its pages, each behind its 8-byte record header, and room for
/// the section's own header, the block's name and the end.
const PART_BYTES: usize = PART_PAGES_MAX * (PAGE_SIZE + 8) + 4096;

/// The buffer the next part is written into: one the writer is done with, or a new one of a
/// part's size (a part grown from an empty buffer is copied each time the buffer doubles).
fn spare(free: &std::sync::mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    free.try_recv().unwrap_or_else(|_| Vec::with_capacity(PART_BYTES))
}

/// Writes the host pages of `range` QEMU lacks that are not all zero, until about
/// [`PART_PAGES_MAX`] pages, from the fetched `pages`: a 4 KiB page, or every page of a huge
/// one (`host`: pages per host page of each block). Returns where it stopped and how many
/// pages it wrote.
#[allow(clippy::too_many_arguments)]
fn push_part(
    src: &mut Source<Vec<u8>>,
    starts: &[u64],
    host: &[u64],
    hashes: &[PageHash],
    sent: &mut [bool],
    pages: &HashMap<PageHash, bytes::Bytes>,
    range: std::ops::Range<usize>,
) -> Result<(usize, usize), RestoreError> {
    let (mut g, end) = (range.start, range.end);
    let mut written = 0;
    while g < end && written < PART_PAGES_MAX {
        let b = starts.partition_point(|&s| s <= g as u64) - 1;
        let n = host[b] as usize;
        if n > 1 && (!(g as u64 - starts[b]).is_multiple_of(n as u64) || g + n > end) {
            return Err(RestoreError::Internal(format!("the push reached page {g} inside a host page of {n} pages")));
        }
        if !sent[g] && hashes[g..g + n].iter().any(|h| !h.is_zero()) {
            for i in g..g + n {
                write_page(src, b, i as u64 - starts[b], &hashes[i], pages)?;
                sent[i] = true;
            }
            written += n;
        }
        g += n;
    }
    Ok((g, written))
}

/// The block and global page indexes of a page request (`block`: the request's, or the last
/// named one), widened to whole host pages (`host`: pages per host page of each block).
fn requested_pages(
    block: Option<&str>,
    offset: u64,
    len: u32,
    names: &HashMap<String, usize>,
    meta: &StreamMeta,
    starts: &[u64],
    host: &[u64],
) -> Result<(usize, Vec<u64>), RestoreError> {
    let bname = block.ok_or_else(|| RestoreError::Qemu("QEMU asked for pages without naming a block".into()))?;
    let b = *names.get(bname).ok_or_else(|| RestoreError::Qemu(format!("QEMU asked for pages of an unknown block {bname}")))?;
    let hp = host[b].max(1);
    let (first, n) = (offset / PAGE_SIZE as u64, (len as u64).div_ceil(PAGE_SIZE as u64).max(1));
    let (first, n) = (first / hp * hp, (first + n).div_ceil(hp) * hp - first / hp * hp);
    let pages_in_block = meta.blocks[b].bytes / PAGE_SIZE as u64;
    if first + n > pages_in_block {
        return Err(RestoreError::Qemu(format!("QEMU asked for pages {first}+{n} of block {bname}, which has {pages_in_block}")));
    }
    Ok((b, (first..first + n).map(|i| starts[b] + i).collect()))
}

/// Writes page `index` of block `b`, whose hash is `h`, from the fetched `pages` (zero pages
/// as such).
fn write_page(src: &mut Source<Vec<u8>>, b: usize, index: u64, h: &PageHash, pages: &HashMap<PageHash, bytes::Bytes>) -> Result<(), RestoreError> {
    let data = if h.is_zero() { None } else { Some(&pages.get(h).ok_or_else(|| RestoreError::Internal("a fetched page went missing".into()))?[..]) };
    src.page(b, index, data).map_err(|e| RestoreError::Qemu(format!("stream: {e}")))
}

/// Queues bytes for the socket to QEMU.
async fn send(tx: &ToQemu, b: Vec<u8>) -> Result<(), RestoreError> {
    tx.tx.send(b).await.map_err(|_| {
        let why = tx.why.get().map_or("its writer ended", |w| w.as_str());
        RestoreError::Qemu(format!("the stream to QEMU broke off: {why}"))
    })
}

/// Resumes every lazy restore this node journaled and did not finish (it died mid-way).
pub async fn recover_journaled(node: Arc<Node>) {
    let Ok(entries) = node.store.meta_prefix(LAZY_PREFIX) else { return };
    for (_, v) in entries {
        match serde_json::from_slice::<Journal>(&v) {
            Ok(j) => {
                tokio::spawn(retry(node.clone(), j));
            }
            Err(e) => tracing::warn!(target: "vmcsnap::restore", error = %e, "unreadable lazy-restore journal entry"),
        }
    }
}

/// Tries to resume a paused lazy restore until it is done or the VM is gone.
async fn retry(node: Arc<Node>, j: Journal) {
    let key = [LAZY_PREFIX, j.vm.as_bytes()].concat();
    // The first try waits for the members to be known again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    loop {
        match recover(&node, &j).await {
            Ok((done, _)) => {
                tracing::info!(target: "vmcsnap::restore", vm = %j.vm, outcome = done, "lazy restore ended");
                let _ = node.store.meta_delete(&key);
                if done.starts_with("completed") {
                    // The VM runs on this host (the restore that launched it may never have
                    // said so, its caller gone with the node).
                    if let Err(e) = node.vms.add(&j.vm, &j.qmp) {
                        tracing::warn!(target: "vmcsnap::restore", vm = %j.vm, error = %e, "cannot register the restored VM");
                    }
                    node.publish_state();
                    if let Some(me) = node.member(&node.id) {
                        forget_elsewhere(&node, &j.vm, &me).await;
                    }
                }
                return;
            }
            Err(e) => tracing::warn!(target: "vmcsnap::restore", vm = %j.vm, error = %e, retry_s = RECOVER_RETRY.as_secs(), "lazy restore still paused"),
        }
        tokio::time::sleep(RECOVER_RETRY).await;
    }
}

/// How [`recover`] says that the restored VM's QEMU is gone (its monitor socket with it).
const VM_GONE: &str = "VM gone";

/// One attempt at resuming `j`. `Ok` says how it ended (the journal entry can go), with the
/// pages' stats of a stream it served to the end.
async fn recover(node: &Arc<Node>, j: &Journal) -> Result<(&'static str, ServeStats), String> {
    let none = ServeStats::default();
    if !j.qmp.exists() {
        return Ok((VM_GONE, none));
    }
    let sock = node.config.data_dir.join(format!("recover-{}.sock", j.vm));
    let _ = std::fs::remove_file(&sock);
    let recover = serde_json::json!({ "exec-oob": "migrate-recover", "arguments": { "uri": format!("unix:{}", sock.display()) } });
    let ksock = keeper::socket_of(&node.config.data_dir, &j.vm);
    if ksock.exists() {
        // The keeper's monitor answers out of band even if QEMU's main loop is stuck behind a
        // vCPU waiting for a page.
        if let Err(e) = keeper::call(&ksock, recover).await {
            let status = keeper::call(&ksock, serde_json::json!({ "execute": "query-migrate" })).await;
            return match status.as_ref().map(|m| m["status"].as_str().unwrap_or("none")) {
                Ok("completed") => Ok(("completed before", none)),
                Ok("failed") => Ok(("QEMU's migration failed", none)),
                _ => Err(format!("migrate-recover: {e} (migration: {status:?})")),
            };
        }
    } else {
        // No keeper: QEMU's migration is over, or QEMU is gone.
        let mut q = match Qmp::connect(&j.qmp).await {
            Ok(q) => q,
            Err(_) if !j.qmp.exists() => return Ok((VM_GONE, none)),
            Err(e) => return Err(e.to_string()),
        };
        let status = q.migrate_status().await.map_err(|e| e.to_string())?;
        match status.as_str() {
            "postcopy-paused" => {}
            "completed" => return Ok(("completed before", none)),
            "postcopy-active" | "postcopy-recover" => return Err(format!("QEMU's migration is {status}; waiting for it to pause")),
            other => return Ok((if other == "failed" { "QEMU's migration failed" } else { "no migration" }, none)),
        }
        let plain = serde_json::json!({ "uri": format!("unix:{}", sock.display()) });
        q.execute("migrate-recover", plain).await.map_err(|e| e.to_string())?;
    }
    let t0 = Instant::now();
    let conn = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => return Err(format!("QEMU's recovery socket {}: {e}", sock.display())),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let record = node.find_record(&j.name).await.map_err(|e| e.to_string())?;
    let entry = record.vm(&j.vm).ok_or_else(|| format!("snapshot {} has no VM {}", j.name, j.vm))?;
    let state = entry.qemu.as_ref().ok_or("no QEMU state")?;
    let meta = crate::qemu::stream_meta(state, &entry.blocks);
    let hashes = {
        let fetcher = Fetcher::new(node, &record);
        let mut h = expand_manifest(&fetcher, entry, |_, _| {}).await.map_err(|e| e.to_string())?;
        h.truncate(entry.ram_pages() as usize); // memory only: its disks were restored first
        h
    };
    let stats = serve(node.clone(), record.clone(), meta, j.page_sizes.clone(), hashes, conn, Start::Resume, Progress::new(None)).await.map_err(|e| e.to_string())?;
    wait_completed(&j.qmp, &keeper::socket_of(&node.config.data_dir, &j.vm)).await?;
    let _ = std::fs::remove_file(&sock);
    Ok(("completed", stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(name: &str, pages: u64) -> Block {
        Block { name: name.into(), bytes: pages * PAGE_SIZE as u64 }
    }

    #[test]
    fn the_early_pages_are_the_first_mib_of_pc_ram() {
        assert_eq!(early_range(&[block("pc.ram", 65536), block("vga.vram", 4096)]), 0..256);
        // Wherever the block sits among the others.
        assert_eq!(early_range(&[block("vga.vram", 4096), block("pc.ram", 2048)]), 4096..4352);
        // A guest smaller than a MiB, one of a page, and one without `pc.ram`.
        assert_eq!(early_range(&[block("pc.ram", 100)]), 0..100);
        assert_eq!(early_range(&[block("pc.ram", 1)]), 0..1);
        assert!(early_range(&[block("mem0", 65536)]).is_empty());
    }

    #[test]
    fn page_sizes_come_from_qemus_ramblock_table() {
        let text = "              Block Name    PSize              Offset               Used              Total\r\n                      m0    2 MiB  0x0000000000000000 0x0000000008000000 0x0000000008000000\r\n   0000:00:02.0/vga.vram    4 KiB  0x0000000008080000 0x0000000001000000 0x0000000001000000\r\n";
        let blocks = [block("m0", 32768), block("0000:00:02.0/vga.vram", 4096)];
        assert_eq!(ramblock_page_sizes(text, &blocks), Ok(vec![2 << 20, 4096]));
        let missing = ramblock_page_sizes(text, &[block("pc.ram", 8)]).expect_err("not listed");
        assert!(missing.contains("pc.ram"), "{missing}");
        assert!(ramblock_page_sizes("head\n m0 2 parsecs 0x0\n", &blocks).is_err(), "no unit");
    }

    #[test]
    fn huge_pages_go_whole_zero_pages_included_and_all_zero_ones_not_at_all() {
        use crate::qemu::stream::StreamMeta;
        let hp = 512usize;
        let meta = StreamMeta {
            head: b"QEVM\0\0\0\x03".to_vec(),
            machine: "m".into(),
            ram_section: (2, 0, 4),
            footers: false,
            blocks: vec![block("m0", 3 * hp as u64), block("vga", 4)],
        };
        let mut hashes = vec![vmcsnap_protocol::ZERO_HASH; 3 * hp + 4];
        let data = vec![7u8; PAGE_SIZE];
        let h = vmcsnap_protocol::hash_page(&data);
        hashes[1] = h; // host page 0: one non-zero page
        hashes[2 * hp + 5] = h; // host page 2
        hashes[3 * hp + 1] = h; // vga, 4 KiB pages
        let pages: HashMap<PageHash, bytes::Bytes> = [(h, bytes::Bytes::from(data))].into_iter().collect();
        let (starts, host) = (vec![0, 3 * hp as u64], vec![hp as u64, 1]);
        let mut sent = vec![false; hashes.len()];
        let mut src = Source::start_with(Vec::new(), meta.clone(), vec![2 << 20, 4096], std::iter::empty()).expect("start");
        let (g, n) = push_part(&mut src, &starts, &host, &hashes, &mut sent, &pages, 0..hashes.len()).expect("push");
        assert_eq!((g, n), (hp, hp), "one whole host page, more than a part's pages");
        assert!(sent[..hp].iter().all(|s| *s), "host page 0 whole");
        let (g, n) = push_part(&mut src, &starts, &host, &hashes, &mut sent, &pages, g..hashes.len()).expect("push");
        assert_eq!((g, n), (3 * hp, hp), "host page 2");
        assert!(!sent[hp..2 * hp].iter().any(|s| *s), "the all-zero host page 1 is not pushed");
        let (g, n) = push_part(&mut src, &starts, &host, &hashes, &mut sent, &pages, g..hashes.len()).expect("push");
        assert_eq!((g, n), (hashes.len(), 1), "4 KiB pages one by one, zero ones left out");
        // Pushing from inside a host page is a bug, not a stream QEMU would fail on.
        assert!(push_part(&mut src, &starts, &host, &hashes, &mut vec![false; hashes.len()], &pages, 3..hashes.len()).is_err());
        // A request for one 4 KiB page of a huge page is a request for all of it.
        let names: HashMap<String, usize> = [("m0".to_string(), 0), ("vga".to_string(), 1)].into_iter().collect();
        let (b, idx) = requested_pages(Some("m0"), (hp as u64 + 3) * 4096, 4096, &names, &meta, &starts, &host).expect("request");
        assert_eq!((b, idx.first().copied(), idx.len()), (0, Some(hp as u64), hp));
        let (b, idx) = requested_pages(Some("vga"), 4096, 4096, &names, &meta, &starts, &host).expect("request");
        assert_eq!((b, idx), (1, vec![3 * hp as u64 + 1]));
    }
}

//! `--wait` on `snapshot delete` and `cluster remove`: follows the background work the change
//! starts on every member (garbage collection, repair) until each live member has run a cycle
//! that began after the change to its end, with progress on a terminal and `--json` events.
//!
//! A member's figures come from `cluster status` (each member's own `Stats`), polled every
//! [`POLL`]: when it last learned of a change its work acts on, and when its last whole cycle
//! began, both on its own clock. The change reaches every live member before `delete` or
//! `remove` returns (members it did not reach are not waited for: they act on it once they
//! learn it).

use crate::{call, cli_error, NodeArg, PROGRESS_EVENT_EVERY};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use vmcsnap_protocol::control::{ControlRequest, ControlResult, ErrorKind, MemberStatus};
use vmcsnap_protocol::NodeId;

/// How often the members' figures are read.
const POLL: Duration = Duration::from_millis(500);

/// The background work to follow.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Work {
    /// Garbage collection, after a deletion.
    Gc,
    /// Repair, after a removal.
    Repair,
}

impl Work {
    fn phase(self) -> &'static str {
        match self {
            Work::Gc => "garbage collection",
            Work::Repair => "repair",
        }
    }

    fn figures(self, m: &MemberStatus) -> Option<Figures> {
        match self {
            Work::Gc => m.gc.as_ref().map(|g| Figures { state: g.state.clone(), done: g.done_began_unix_ms >= g.changed_unix_ms, bytes: g.reclaimed_bytes, copies: 0 }),
            Work::Repair => {
                m.repair.as_ref().map(|r| Figures { state: r.state.clone(), done: r.done_began_unix_ms >= r.changed_unix_ms, bytes: r.bytes_sent, copies: r.copies_made })
            }
        }
    }
}

/// One member's figures for the work followed.
struct Figures {
    state: String,
    /// Its last whole cycle began after the last change it learned.
    done: bool,
    /// Bytes freed (GC) or sent (repair) since it started.
    bytes: u64,
    /// Copies made (repair) since it started.
    copies: u64,
}

/// What the wait saw, summed over the members it waited for.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Waited {
    /// Members that ran a cycle to its end (the live ones, at the end).
    pub members: usize,
    /// Garbage collection: bytes freed (all copies). Repair: bytes sent.
    pub bytes: u64,
    /// Repair: copies made.
    pub copies: u64,
    /// Wall time of the wait, s.
    pub seconds: f64,
}

/// Every member's figures for `work` before the change (what the wait's totals count from).
pub(crate) type Baseline = HashMap<NodeId, (u64, u64)>;

/// Reads the baseline: call before making the change.
pub(crate) async fn baseline(common: &NodeArg, work: Work) -> anyhow::Result<Baseline> {
    let ControlResult::Cluster(c) = call(common, ControlRequest::ClusterStatus).await? else {
        return Err(cli_error(ErrorKind::Internal, "node answered with the wrong result"));
    };
    Ok(c.members.iter().filter_map(|m| work.figures(m).map(|f| (m.id, (f.bytes, f.copies)))).collect())
}

/// Waits until every live member (but `skip`) has run `work` to the end of a cycle that began
/// after the last change it learned. Members that go down meanwhile are not waited for.
/// Totals count from `start`.
pub(crate) async fn wait(common: &NodeArg, work: Work, skip: Option<NodeId>, mut start: Baseline) -> anyhow::Result<Waited> {
    let t0 = Instant::now();
    let bar = (!common.json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} members done, {elapsed}; {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        b.set_prefix(work.phase());
        b
    });
    let mut last_event: Option<((usize, usize), Instant)> = None;
    loop {
        let ControlResult::Cluster(c) = call(common, ControlRequest::ClusterStatus).await? else {
            return Err(cli_error(ErrorKind::Internal, "node answered with the wrong result"));
        };
        let live: Vec<(&MemberStatus, Figures)> =
            c.members.iter().filter(|m| m.alive && Some(m.id) != skip).filter_map(|m| work.figures(m).map(|f| (m, f))).collect();
        for (m, f) in &live {
            start.entry(m.id).or_insert((f.bytes, f.copies));
        }
        let n_done = live.iter().filter(|(_, f)| f.done).count();
        let busy: Vec<String> = live.iter().filter(|(_, f)| !f.done).map(|(m, f)| format!("{}: {}", m.name, f.state)).collect();
        let due = match &last_event {
            Some((seen, at)) => *seen != (n_done, live.len()) || at.elapsed() >= PROGRESS_EVENT_EVERY * 4,
            None => true,
        };
        if common.json && due {
            eprintln!("{}", serde_json::json!({ "progress": { "phase": work.phase(), "done": n_done, "total": live.len(), "waiting_for": busy } }));
            last_event = Some(((n_done, live.len()), Instant::now()));
        }
        if let Some(b) = &bar {
            b.set_length(live.len() as u64);
            b.set_position(n_done as u64);
            b.set_message(busy.join("; "));
        }
        if n_done == live.len() {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let since = |m: &MemberStatus| start.get(&m.id).copied().unwrap_or_default();
            let bytes = live.iter().map(|(m, f)| f.bytes.saturating_sub(since(m).0)).sum();
            let copies = live.iter().map(|(m, f)| f.copies.saturating_sub(since(m).1)).sum();
            return Ok(Waited { members: live.len(), bytes, copies, seconds: t0.elapsed().as_secs_f64() });
        }
        tokio::time::sleep(POLL).await;
    }
}

//! The coordinator's runtime: starts one session per participant, feeds their reports to the
//! [`Coordinator`] machine and carries out its actions (broadcast a command, report progress)
//! until the cut has an outcome.

use super::machine::{CoordAction, Coordinator, Expected, Outcome};
use super::transport::{start_session, Session};
use super::ABORT_WAIT;
use crate::engine::error::SnapshotError;
use crate::engine::Progress;
use crate::node::Node;
use std::sync::Arc;
use tokio::sync::mpsc;
use vmcsnap_dht::Member;
use vmcsnap_protocol::manifest::VmEntry;
use vmcsnap_protocol::wire::{CutBegin, CutReport};

/// Reports from participants, by index; `None` once a participant has ended.
const REPORT_QUEUE: usize = 64;

/// A running cut. Keep it until the snapshot is committed: dropping it ends every
/// participant's conversation.
pub struct Cut {
    sessions: Vec<Session>,
    reports: mpsc::Receiver<(usize, Option<CutReport>)>,
    machine: Coordinator,
    pending: Vec<CoordAction>,
}

impl Cut {
    /// Starts a participant on each host of `parts` (host, its part of the cut).
    pub async fn start(node: &Arc<Node>, parts: Vec<(Member, CutBegin)>) -> Self {
        let (tx, reports) = mpsc::channel(REPORT_QUEUE);
        let mut sessions = Vec::new();
        let mut expected = Vec::new();
        for (i, (host, begin)) in parts.into_iter().enumerate() {
            expected.push(Expected { host: host.id, host_name: node.host_name(&host.id), vms: begin.vms.iter().map(|(id, _)| id.clone()).collect() });
            sessions.push(start_session(node, host, begin, i, tx.clone()).await);
        }
        let (machine, pending) = Coordinator::new(expected);
        Self { sessions, reports, machine, pending }
    }

    /// Runs the cut to its outcome: every participant's VM entries (in the order of the
    /// parts), or the first failure once every participant has ended or [`ABORT_WAIT`] ran out.
    pub async fn run(&mut self, progress: &mut Progress) -> Result<Vec<Vec<VmEntry>>, SnapshotError> {
        let first = std::mem::take(&mut self.pending);
        self.apply(first, progress).await;
        let mut abort_deadline = None;
        loop {
            if let Some(outcome) = self.machine.take_outcome() {
                return match outcome {
                    Outcome::Done(entries) => Ok(entries),
                    Outcome::Failed(e) => Err(e),
                };
            }
            if self.machine.is_aborting() && abort_deadline.is_none() {
                abort_deadline = Some(tokio::time::Instant::now() + ABORT_WAIT);
            }
            let next = match abort_deadline {
                None => self.reports.recv().await,
                Some(d) => tokio::time::timeout_at(d, self.reports.recv()).await.unwrap_or(None),
            };
            let actions = match next {
                Some((i, report)) => self.machine.on_report(i, report),
                None if self.machine.is_aborting() => {
                    // Every conversation is gone, or the wait ran out.
                    self.machine.give_up();
                    vec![]
                }
                None => self.machine.abort(SnapshotError::Internal("every participant ended without finishing".into())),
            };
            self.apply(actions, progress).await;
        }
    }

    async fn apply(&self, actions: Vec<CoordAction>, progress: &mut Progress) {
        for a in actions {
            match a {
                CoordAction::Broadcast(cmd) => {
                    tracing::debug!(target: "vmcsnap::cut", ?cmd, "broadcast");
                    futures::future::join_all(self.sessions.iter().map(|s| s.send(cmd.clone()))).await;
                }
                CoordAction::Phase(phase, total) => progress.phase(phase, total),
                CoordAction::Progress(done) => progress.set(done),
            }
        }
    }
}

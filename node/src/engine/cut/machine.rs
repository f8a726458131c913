//! The cut's two state machines, as pure transition functions: no socket, no QEMU, no clock.
//! The runtimes in [`super::coordinate`] and [`super::participate`] feed them events and carry
//! out the actions they return.
//!
//! **Coordinator** (the initiating node), per participant: `Ready` → `Paused` → `Done`, each
//! exactly once and in that order; `Go` goes to every participant once all are ready, `Release`
//! once all are paused. Anything else — a report out of turn, `Done` with other VMs, a
//! participant that fails, ends or goes silent — aborts the whole cut: `Abort` to every
//! participant, then the coordinator waits for each to end (so that the error comes back only
//! once every VM that can run again does), and the outcome is that first failure.
//!
//! **Participant** (each host with VMs of the cut): its captures report `Prepared` and
//! `Paused`; the participant reports `Ready` when all are prepared and `Paused` when all are
//! paused. `Ready` arms the go deadline (a prepared pre-copy VM is not held for ever); `Go`
//! moves every capture to [`Step::Pause`] and arms the release deadline, `Release` to
//! [`Step::Resume`]. `Abort`, a silent or vanished initiator, either deadline, or a
//! failed capture moves every capture to [`Step::Cancel`] (they resume their VMs); the first
//! failure is what the participant reports.

use crate::engine::error::SnapshotError;
use crate::source::{Reached, Step};
use vmcsnap_protocol::control::ErrorKind;
use vmcsnap_protocol::manifest::VmEntry;
use vmcsnap_protocol::wire::{CutCommand, CutReport};
use vmcsnap_protocol::NodeId;

/// One participant, as the coordinator expects it.
#[derive(Clone, Debug)]
pub struct Expected {
    /// Its node.
    pub host: NodeId,
    /// Its name, for messages.
    pub host_name: String,
    /// The VMs it was asked to capture, in order.
    pub vms: Vec<String>,
}

/// What the coordinator's runtime does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordAction {
    /// Send this command to every participant at once.
    Broadcast(CutCommand),
    /// Progress: a new phase of `total` units.
    Phase(&'static str, u64),
    /// Progress: units done in the current phase.
    Progress(u64),
}

/// How a cut ended, for the coordinator.
#[derive(Debug)]
pub enum Outcome {
    /// Every participant is done: their VM entries, per participant.
    Done(Vec<Vec<VmEntry>>),
    /// The cut was aborted; every participant has ended (or was given up on).
    Failed(SnapshotError),
}

/// The initiating node's view of a cut.
#[derive(Debug)]
pub struct Coordinator {
    parts: Vec<Expected>,
    ready: Vec<bool>,
    paused: Vec<bool>,
    ended: Vec<bool>,
    results: Vec<Option<Vec<VmEntry>>>,
    released: bool,
    vms_done: usize,
    /// Set once the cut is aborted: the failure to report once every participant ended.
    failure: Option<SnapshotError>,
    outcome: Option<Outcome>,
}

impl Coordinator {
    /// A cut over `parts`, and the first action (the "prepare" phase).
    pub fn new(parts: Vec<Expected>) -> (Self, Vec<CoordAction>) {
        let n = parts.len();
        let c = Self {
            parts,
            ready: vec![false; n],
            paused: vec![false; n],
            ended: vec![false; n],
            results: (0..n).map(|_| None).collect(),
            released: false,
            vms_done: 0,
            failure: None,
            outcome: None,
        };
        (c, vec![CoordAction::Phase("prepare", n as u64)])
    }

    /// Whether the cut is being aborted (waiting for participants to end).
    pub fn is_aborting(&self) -> bool {
        self.failure.is_some()
    }

    /// The outcome, once there is one (taken once).
    pub fn take_outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    /// Participant `i` reported `report`; `None`: it ended (its conversation is over).
    pub fn on_report(&mut self, i: usize, report: Option<CutReport>) -> Vec<CoordAction> {
        if i >= self.parts.len() || self.outcome.is_some() {
            return vec![];
        }
        if self.is_aborting() {
            if report.is_none() {
                self.ended[i] = true;
                self.end_abort_if_all_ended();
            }
            return vec![];
        }
        let n = self.parts.len() as u64;
        match report {
            None => {
                self.ended[i] = true;
                if self.results[i].is_none() {
                    return self.fail_part(i, None, ErrorKind::Peer, "ended without reporting");
                }
                vec![]
            }
            Some(CutReport::Heartbeat) => vec![],
            Some(CutReport::Ready) => {
                if std::mem::replace(&mut self.ready[i], true) {
                    return self.fail_part(i, None, ErrorKind::Peer, "said Ready twice");
                }
                let k = count(&self.ready);
                let mut out = vec![CoordAction::Progress(k)];
                if k == n {
                    // Every participant at once: the pauses start together.
                    out.push(CoordAction::Broadcast(CutCommand::Go));
                    out.push(CoordAction::Phase("pause", n));
                }
                out
            }
            Some(CutReport::Paused) => {
                if !self.ready.iter().all(|r| *r) || std::mem::replace(&mut self.paused[i], true) {
                    return self.fail_part(i, None, ErrorKind::Peer, "said Paused out of turn");
                }
                let k = count(&self.paused);
                let mut out = vec![CoordAction::Progress(k)];
                if k == n {
                    self.released = true;
                    out.push(CoordAction::Broadcast(CutCommand::Release));
                    let total_vms = self.parts.iter().map(|p| p.vms.len() as u64).sum();
                    out.push(CoordAction::Phase("upload", total_vms));
                }
                out
            }
            Some(CutReport::Done { vms }) => {
                // Only after the cut, once, and only the VMs this host was asked for, as its own.
                let p = &self.parts[i];
                let as_asked = vms.iter().map(|v| v.id.as_str()).eq(p.vms.iter().map(|v| v.as_str()));
                if !self.released || self.results[i].is_some() || !as_asked || vms.iter().any(|v| v.host != p.host) {
                    return self.fail_part(i, None, ErrorKind::Peer, "reported VMs it was not asked for, or out of turn");
                }
                self.vms_done += vms.len();
                self.results[i] = Some(vms);
                if self.results.iter().all(|r| r.is_some()) {
                    self.outcome = Some(Outcome::Done(self.results.iter_mut().map(|r| r.take().unwrap_or_default()).collect()));
                }
                vec![CoordAction::Progress(self.vms_done as u64)]
            }
            Some(CutReport::Failed { vm, kind, reason }) => self.fail_part(i, vm.as_deref(), kind, &reason),
        }
    }

    /// The cut fails for a reason outside any one report.
    pub fn abort(&mut self, error: SnapshotError) -> Vec<CoordAction> {
        if self.outcome.is_some() || self.is_aborting() {
            return vec![];
        }
        let reason = error.to_string();
        self.failure = Some(error);
        self.end_abort_if_all_ended();
        vec![CoordAction::Broadcast(CutCommand::Abort { reason })]
    }

    /// Stops waiting for participants to end (the abort's wait ran out, or every
    /// conversation is gone): the outcome is the failure.
    pub fn give_up(&mut self) {
        if let Some(f) = self.failure.take() {
            self.outcome = Some(Outcome::Failed(f));
        } else if self.outcome.is_none() {
            self.outcome = Some(Outcome::Failed(SnapshotError::Internal("every participant ended without finishing".into())));
        }
    }

    fn fail_part(&mut self, i: usize, vm: Option<&str>, kind: ErrorKind, reason: &str) -> Vec<CoordAction> {
        let p = &self.parts[i];
        let e = SnapshotError::participant(&p.host_name, vm, &p.vms, kind, reason);
        self.abort(e)
    }

    fn end_abort_if_all_ended(&mut self) {
        if self.ended.iter().all(|e| *e) {
            self.give_up();
        }
    }
}

fn count(v: &[bool]) -> u64 {
    v.iter().filter(|b| **b).count() as u64
}

/// What the participant's runtime sees happen.
#[derive(Debug)]
pub enum PartEvent {
    /// A command from the initiating node; `None`: its conversation is gone.
    Command(Option<CutCommand>),
    /// A capture reached a point.
    Reached(Reached),
    /// Capture `vm` (an index) failed.
    CaptureFailed {
        /// Its index.
        vm: usize,
        /// Why.
        error: SnapshotError,
    },
    /// A capture task died without a result.
    TaskFailed(String),
    /// The armed deadline passed.
    Deadline,
    /// This host is shutting down (named).
    Stopping(String),
}

/// What a participant waits for under a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `Go`, after reporting `Ready` ([`super::GO_WAIT_MAX`]).
    Go,
    /// `Release`, after `Go` ([`super::RELEASE_WAIT_MAX`]).
    Release,
}

impl Wait {
    /// How long.
    pub fn limit(self) -> std::time::Duration {
        match self {
            Wait::Go => super::GO_WAIT_MAX,
            Wait::Release => super::RELEASE_WAIT_MAX,
        }
    }
}

/// What the participant's runtime does next.
#[derive(Debug, PartialEq, Eq)]
pub enum PartAction {
    /// Move every capture to at least this step.
    Step(Step),
    /// Send this report to the initiating node.
    Report(CutReport),
    /// Start (or restart) the deadline for this wait.
    ArmDeadline(Wait),
    /// Stop the deadline.
    DisarmDeadline,
}

/// One participant's view of a cut.
#[derive(Debug)]
pub struct Participant {
    vms: Vec<String>,
    prepared: usize,
    paused: usize,
    armed: Option<Wait>,
    /// The first failure: the VM concerned, if one, and why.
    failure: Option<(Option<String>, SnapshotError)>,
}

impl Participant {
    /// A participant capturing `vms`.
    pub fn new(vms: Vec<String>) -> Self {
        Self { vms, prepared: 0, paused: 0, armed: None, failure: None }
    }

    /// The first failure, if any (taken once every capture ended).
    pub fn take_failure(&mut self) -> Option<(Option<String>, SnapshotError)> {
        self.failure.take()
    }

    /// Feeds one event.
    pub fn on_event(&mut self, ev: PartEvent) -> Vec<PartAction> {
        match ev {
            PartEvent::Command(Some(CutCommand::Heartbeat)) => vec![],
            PartEvent::Command(Some(CutCommand::Go)) => {
                let mut out = self.arm(Wait::Release);
                out.push(PartAction::Step(Step::Pause));
                out
            }
            PartEvent::Command(Some(CutCommand::Release)) => {
                let mut out = self.disarm();
                out.push(PartAction::Step(Step::Resume));
                out
            }
            PartEvent::Command(Some(CutCommand::Abort { reason })) => {
                self.cancel(None, SnapshotError::Invalid(format!("aborted by the initiating node: {reason}")))
            }
            PartEvent::Command(None) => self.cancel(None, SnapshotError::Invalid("the initiating node went away".into())),
            PartEvent::Stopping(host) => self.cancel(None, SnapshotError::Stopping(host)),
            PartEvent::Deadline => {
                let what = match self.armed {
                    None => return vec![],
                    Some(Wait::Go) => "no Go within {} s of Ready",
                    Some(Wait::Release) => "no Release within {} s of Go",
                };
                let secs = self.armed.map(|w| w.limit().as_secs()).unwrap_or(0);
                self.cancel(None, SnapshotError::Invalid(what.replace("{}", &secs.to_string())))
            }
            PartEvent::Reached(Reached::Prepared) => {
                self.prepared += 1;
                if self.prepared == self.vms.len() {
                    let mut out = if self.armed.is_none() { self.arm(Wait::Go) } else { vec![] };
                    out.push(PartAction::Report(CutReport::Ready));
                    out
                } else {
                    vec![]
                }
            }
            PartEvent::Reached(Reached::Paused) => {
                self.paused += 1;
                if self.paused == self.vms.len() {
                    vec![PartAction::Report(CutReport::Paused)]
                } else {
                    vec![]
                }
            }
            PartEvent::CaptureFailed { vm, error } => {
                let id = self.vms.get(vm).cloned();
                if self.failure.is_some() {
                    if !matches!(error, SnapshotError::Aborted) {
                        tracing::error!(target: "vmcsnap::snapshot", vm = ?id, error = %error, "VM capture failed during the abort");
                    }
                    return vec![PartAction::Step(Step::Cancel)];
                }
                // Tell the initiating node at once, so the other hosts resume too.
                let report = CutReport::Failed { vm: id.clone(), kind: error.kind(), reason: error.to_string() };
                let mut out = self.cancel(id, error);
                out.insert(0, PartAction::Report(report));
                out
            }
            PartEvent::TaskFailed(reason) => self.cancel(None, SnapshotError::Internal(format!("capture task failed: {reason}"))),
        }
    }

    /// Arms the deadline for `wait`, unless it is armed for it already.
    fn arm(&mut self, wait: Wait) -> Vec<PartAction> {
        if self.armed == Some(wait) {
            return vec![];
        }
        self.armed = Some(wait);
        vec![PartAction::ArmDeadline(wait)]
    }

    fn disarm(&mut self) -> Vec<PartAction> {
        if self.armed.take().is_some() {
            vec![PartAction::DisarmDeadline]
        } else {
            vec![]
        }
    }

    fn cancel(&mut self, vm: Option<String>, error: SnapshotError) -> Vec<PartAction> {
        self.failure.get_or_insert((vm, error));
        let mut out = self.disarm();
        out.push(PartAction::Step(Step::Cancel));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcsnap_protocol::manifest::{ManifestRoot, VmStats};

    fn node(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn parts() -> Vec<Expected> {
        vec![
            Expected { host: node(1), host_name: "n1".into(), vms: vec!["a".into(), "b".into()] },
            Expected { host: node(2), host_name: "n2".into(), vms: vec!["c".into()] },
        ]
    }

    fn entry(id: &str, host: NodeId) -> VmEntry {
        VmEntry {
            id: id.into(),
            source: String::new(),
            host,
            host_name: String::new(),
            blocks: vec![],
            manifest: ManifestRoot { pages: 0, depth: 0, top: vec![] },
            stats: VmStats::default(),
            qemu: None,
        }
    }

    fn done(c: &mut Coordinator, i: usize, ids: &[&str], host: NodeId) -> Vec<CoordAction> {
        c.on_report(i, Some(CutReport::Done { vms: ids.iter().map(|id| entry(id, host)).collect() }))
    }

    fn broadcasts(actions: &[CoordAction]) -> Vec<CutCommand> {
        actions.iter().filter_map(|a| if let CoordAction::Broadcast(c) = a { Some(c.clone()) } else { None }).collect()
    }

    fn aborted(actions: &[CoordAction]) -> bool {
        broadcasts(actions).iter().any(|c| matches!(c, CutCommand::Abort { .. }))
    }

    /// Drives a coordinator through ready and paused for every participant.
    fn to_released(c: &mut Coordinator) {
        assert!(broadcasts(&c.on_report(0, Some(CutReport::Ready))).is_empty());
        assert_eq!(broadcasts(&c.on_report(1, Some(CutReport::Ready))), vec![CutCommand::Go]);
        assert!(broadcasts(&c.on_report(1, Some(CutReport::Paused))).is_empty());
        assert_eq!(broadcasts(&c.on_report(0, Some(CutReport::Paused))), vec![CutCommand::Release]);
    }

    fn failure(c: &mut Coordinator) -> String {
        match c.take_outcome() {
            Some(Outcome::Failed(e)) => e.to_string(),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_cut_in_order_commits_every_entry() {
        let (mut c, first) = Coordinator::new(parts());
        assert_eq!(first, vec![CoordAction::Phase("prepare", 2)]);
        to_released(&mut c);
        assert!(c.on_report(0, Some(CutReport::Heartbeat)).is_empty());
        done(&mut c, 1, &["c"], node(2));
        assert!(c.take_outcome().is_none());
        done(&mut c, 0, &["a", "b"], node(1));
        match c.take_outcome() {
            Some(Outcome::Done(r)) => {
                assert_eq!(r[0].iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
                assert_eq!(r[1][0].id, "c");
            }
            other => panic!("expected done, got {other:?}"),
        }
    }

    #[test]
    fn out_of_order_reports_abort_the_cut() {
        // Paused before everyone was ready.
        let (mut c, _) = Coordinator::new(parts());
        c.on_report(0, Some(CutReport::Ready));
        assert!(aborted(&c.on_report(0, Some(CutReport::Paused))));
        // Ready twice.
        let (mut c, _) = Coordinator::new(parts());
        c.on_report(0, Some(CutReport::Ready));
        assert!(aborted(&c.on_report(0, Some(CutReport::Ready))));
        // Done before Release.
        let (mut c, _) = Coordinator::new(parts());
        c.on_report(0, Some(CutReport::Ready));
        c.on_report(1, Some(CutReport::Ready));
        assert!(aborted(&done(&mut c, 1, &["c"], node(2))));
        c.on_report(0, None);
        c.on_report(1, None);
        assert!(failure(&mut c).contains("out of turn"));
    }

    #[test]
    fn done_with_the_wrong_vms_aborts() {
        for (ids, host) in [(&["a"][..], node(1)), (&["b", "a"][..], node(1)), (&["a", "b", "c"][..], node(1)), (&["a", "b"][..], node(2))] {
            let (mut c, _) = Coordinator::new(parts());
            to_released(&mut c);
            assert!(aborted(&done(&mut c, 0, ids, host)), "{ids:?} from {host:?} was accepted");
            c.on_report(0, None);
            c.on_report(1, None);
            let e = failure(&mut c);
            assert!(e.contains("host n1") && e.contains("not asked for"), "{e}");
        }
    }

    #[test]
    fn a_silent_or_vanished_participant_aborts_and_the_error_waits_for_every_end() {
        let (mut c, _) = Coordinator::new(parts());
        c.on_report(0, Some(CutReport::Ready));
        // The transport reports silence as a failure, then the end of the conversation.
        let a = c.on_report(1, Some(CutReport::Failed { vm: None, kind: ErrorKind::Unavailable, reason: "no word for 6 s (host down?)".into() }));
        assert!(aborted(&a));
        assert!(c.is_aborting());
        assert!(c.on_report(1, None).is_empty());
        // Participant 0 has not ended yet: no outcome, whatever else it says.
        assert!(c.take_outcome().is_none());
        assert!(c.on_report(0, Some(CutReport::Paused)).is_empty());
        assert!(c.take_outcome().is_none());
        c.on_report(0, None);
        let e = failure(&mut c);
        assert!(e.contains("host n2") && e.contains("no word") && e.contains("its VMs: c"), "{e}");
    }

    #[test]
    fn a_participant_ending_without_done_aborts() {
        let (mut c, _) = Coordinator::new(parts());
        to_released(&mut c);
        assert!(aborted(&c.on_report(0, None)));
        c.on_report(1, None);
        assert!(failure(&mut c).contains("ended without reporting"));
    }

    #[test]
    fn abort_from_every_phase_keeps_the_first_failure() {
        // Before anything, after Go, after Release, mid-Done.
        for step in 0..4 {
            let (mut c, _) = Coordinator::new(parts());
            if step >= 1 {
                c.on_report(0, Some(CutReport::Ready));
                c.on_report(1, Some(CutReport::Ready));
            }
            if step >= 2 {
                c.on_report(0, Some(CutReport::Paused));
                c.on_report(1, Some(CutReport::Paused));
            }
            if step >= 3 {
                done(&mut c, 1, &["c"], node(2));
            }
            let a = c.on_report(0, Some(CutReport::Failed { vm: Some("b".into()), kind: ErrorKind::Qemu, reason: "QEMU refused stop".into() }));
            assert!(aborted(&a), "step {step}");
            // A second failure neither broadcasts again nor replaces the first.
            assert!(c.abort(SnapshotError::Aborted).is_empty());
            c.on_report(0, None);
            c.on_report(1, None);
            let e = failure(&mut c);
            assert!(e.contains("host n1") && e.contains("VM b: QEMU refused stop"), "step {step}: {e}");
        }
    }

    #[test]
    fn giving_up_on_an_abort_reports_its_failure() {
        let (mut c, _) = Coordinator::new(parts());
        c.abort(SnapshotError::Invalid("operator".into()));
        assert!(c.take_outcome().is_none());
        c.give_up();
        assert_eq!(failure(&mut c), "operator");
        // All conversations gone before any outcome: a failure too.
        let (mut c, _) = Coordinator::new(parts());
        c.give_up();
        assert!(failure(&mut c).contains("without finishing"));
    }

    fn steps(actions: &[PartAction]) -> Vec<Step> {
        actions.iter().filter_map(|a| if let PartAction::Step(s) = a { Some(*s) } else { None }).collect()
    }

    fn reports(actions: &[PartAction]) -> Vec<CutReport> {
        actions.iter().filter_map(|a| if let PartAction::Report(r) = a { Some(r.clone()) } else { None }).collect()
    }

    #[test]
    fn a_participant_reports_when_all_its_vms_are_there() {
        let mut p = Participant::new(vec!["a".into(), "b".into()]);
        assert!(p.on_event(PartEvent::Reached(Reached::Prepared)).is_empty());
        let ready = p.on_event(PartEvent::Reached(Reached::Prepared));
        assert_eq!(ready, vec![PartAction::ArmDeadline(Wait::Go), PartAction::Report(CutReport::Ready)]);
        let go = p.on_event(PartEvent::Command(Some(CutCommand::Go)));
        assert_eq!(go, vec![PartAction::ArmDeadline(Wait::Release), PartAction::Step(Step::Pause)]);
        // A repeated Go does not re-arm the deadline.
        assert_eq!(p.on_event(PartEvent::Command(Some(CutCommand::Go))), vec![PartAction::Step(Step::Pause)]);
        p.on_event(PartEvent::Reached(Reached::Paused));
        assert_eq!(reports(&p.on_event(PartEvent::Reached(Reached::Paused))), vec![CutReport::Paused]);
        assert_eq!(p.on_event(PartEvent::Command(Some(CutCommand::Release))), vec![PartAction::DisarmDeadline, PartAction::Step(Step::Resume)]);
        // The deadline firing late (a race with Release) changes nothing.
        assert!(p.on_event(PartEvent::Deadline).is_empty());
        assert!(p.take_failure().is_none());
    }

    #[test]
    fn a_participant_cancels_on_abort_silence_and_the_deadline() {
        let cases: Vec<(PartEvent, &str)> = vec![
            (PartEvent::Command(Some(CutCommand::Abort { reason: "host n2 failed".into() })), "aborted by the initiating node: host n2 failed"),
            (PartEvent::Command(None), "the initiating node went away"),
            (PartEvent::Deadline, "no Release within 120 s of Go"),
        ];
        for (ev, msg) in cases {
            let mut p = Participant::new(vec!["a".into()]);
            p.on_event(PartEvent::Reached(Reached::Prepared));
            p.on_event(PartEvent::Command(Some(CutCommand::Go)));
            let a = p.on_event(ev);
            assert_eq!(steps(&a), vec![Step::Cancel], "{msg}");
            assert!(a.contains(&PartAction::DisarmDeadline), "{msg}");
            let (vm, e) = p.take_failure().expect("a failure");
            assert_eq!(vm, None);
            assert_eq!(e.to_string(), msg);
        }
    }

    #[test]
    fn a_prepared_participant_waits_for_go_only_so_long() {
        let mut p = Participant::new(vec!["a".into()]);
        // No deadline while preparing (pre-copy's first pass takes as long as the VM needs).
        assert!(p.on_event(PartEvent::Deadline).is_empty());
        let ready = p.on_event(PartEvent::Reached(Reached::Prepared));
        assert!(ready.contains(&PartAction::ArmDeadline(Wait::Go)));
        // A coordinator that heartbeats but never says Go cannot hold the VMs.
        assert!(p.on_event(PartEvent::Command(Some(CutCommand::Heartbeat))).is_empty());
        let a = p.on_event(PartEvent::Deadline);
        assert_eq!(steps(&a), vec![Step::Cancel]);
        let (_, e) = p.take_failure().expect("failure");
        assert_eq!(e.to_string(), format!("no Go within {} s of Ready", super::super::GO_WAIT_MAX.as_secs()));
    }

    #[test]
    fn a_failed_capture_is_reported_at_once_and_only_the_first_counts() {
        let mut p = Participant::new(vec!["a".into(), "b".into()]);
        let a = p.on_event(PartEvent::CaptureFailed { vm: 1, error: SnapshotError::Invalid("QMP gone".into()) });
        assert_eq!(reports(&a), vec![CutReport::Failed { vm: Some("b".into()), kind: ErrorKind::Invalid, reason: "QMP gone".into() }]);
        assert_eq!(steps(&a), vec![Step::Cancel]);
        // The other capture then ends cancelled: no second report.
        let a = p.on_event(PartEvent::CaptureFailed { vm: 0, error: SnapshotError::Aborted });
        assert!(reports(&a).is_empty());
        let a = p.on_event(PartEvent::Command(Some(CutCommand::Abort { reason: "x".into() })));
        assert!(reports(&a).is_empty());
        let (vm, e) = p.take_failure().expect("failure");
        assert_eq!((vm.as_deref(), e.to_string().as_str()), (Some("b"), "QMP gone"));
    }
}
